"""Activation sources: synthetic ground truth, backbone streams, an on-disk cache."""

from lightning_interp.data.cache import ActivationCache, ActivationCacheWriter, expected_norm_scale
from lightning_interp.data.datamodule import ActivationDataModule, CachedActivations
from lightning_interp.data.synthetic import (
    SparseSuperposition,
    SyntheticActivations,
    mean_max_cosine_similarity,
)

__all__ = [
    "ActivationCache",
    "ActivationCacheWriter",
    "ActivationDataModule",
    "CachedActivations",
    "SparseSuperposition",
    "SyntheticActivations",
    "expected_norm_scale",
    "mean_max_cosine_similarity",
]
