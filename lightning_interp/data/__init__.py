"""Activation sources: synthetic ground truth now; backbone streams and caches later."""

from lightning_interp.data.synthetic import (
    SparseSuperposition,
    SyntheticActivations,
    mean_max_cosine_similarity,
)

__all__ = ["SparseSuperposition", "SyntheticActivations", "mean_max_cosine_similarity"]
