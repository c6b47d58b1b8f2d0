"""Activation sources: synthetic ground truth, backbone streams, an on-disk cache, data modules.

Every data module here that yields activations implements
:class:`~lightning_interp.data.source.ActivationSource`; batches are ``{site: rows}``
(:mod:`~lightning_interp.data.batches`).
"""

from lightning_interp.backbones.special_tokens import special_token_ids, special_token_mask
from lightning_interp.data.batches import inputs_and_targets, sites_read, split_batch
from lightning_interp.data.buffer import ShufflingBuffer
from lightning_interp.data.cache import (
    ActivationCache,
    ActivationCacheWriter,
    CachedActivations,
    expected_norm_scale,
)
from lightning_interp.data.datamodule import ActivationDataModule
from lightning_interp.data.embedding_datamodule import EmbeddingDataModule
from lightning_interp.data.image_datamodule import VisionModelDataModule
from lightning_interp.data.images import ImageActivations
from lightning_interp.data.lm_datamodule import LanguageModelDataModule
from lightning_interp.data.multimodal_datamodule import ImageTextActivations, ImageTextDataModule
from lightning_interp.data.source import ActivationSource, activation_source
from lightning_interp.data.stream import ActivationStream
from lightning_interp.data.synthetic import (
    SparseSuperposition,
    SyntheticActivations,
    mean_max_cosine_similarity,
)
from lightning_interp.data.tokens import TextPosition, chat_contexts, pack_texts

__all__ = [
    "ActivationCache",
    "ActivationCacheWriter",
    "ActivationDataModule",
    "ActivationSource",
    "ActivationStream",
    "CachedActivations",
    "EmbeddingDataModule",
    "ImageActivations",
    "ImageTextActivations",
    "ImageTextDataModule",
    "LanguageModelDataModule",
    "ShufflingBuffer",
    "SparseSuperposition",
    "SyntheticActivations",
    "TextPosition",
    "VisionModelDataModule",
    "activation_source",
    "chat_contexts",
    "expected_norm_scale",
    "inputs_and_targets",
    "mean_max_cosine_similarity",
    "pack_texts",
    "sites_read",
    "special_token_ids",
    "special_token_mask",
    "split_batch",
]
