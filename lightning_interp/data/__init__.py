"""Activation sources: synthetic ground truth, backbone streams, an on-disk cache."""

from lightning_interp.data.buffer import ShufflingBuffer
from lightning_interp.data.cache import ActivationCache, ActivationCacheWriter, expected_norm_scale
from lightning_interp.data.datamodule import ActivationDataModule, CachedActivations
from lightning_interp.data.images import ImageActivations
from lightning_interp.data.stream import ActivationStream
from lightning_interp.data.synthetic import (
    SparseSuperposition,
    SyntheticActivations,
    mean_max_cosine_similarity,
)
from lightning_interp.data.tokens import (
    TextPosition,
    chat_contexts,
    pack_texts,
    special_token_ids,
    special_token_mask,
)

__all__ = [
    "ActivationCache",
    "ActivationStream",
    "ActivationCacheWriter",
    "ActivationDataModule",
    "CachedActivations",
    "ImageActivations",
    "ShufflingBuffer",
    "SparseSuperposition",
    "SyntheticActivations",
    "TextPosition",
    "chat_contexts",
    "expected_norm_scale",
    "mean_max_cosine_similarity",
    "pack_texts",
    "special_token_ids",
    "special_token_mask",
]
