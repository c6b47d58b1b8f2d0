"""What every data module that owns a backbone shares: its device, and what it records.

A data module attached to a Trainer puts its backbone on the trainer's root device
(``trainer.strategy.root_device``: the GPU of this DDP rank, or the CPU), so the backbone's
forward, the expensive part of every step, runs where training runs. Its provenance names
the Hub ids behind ``offline:`` aliases, so model cards link to the real model and say
what the data really were.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_interp.backbones.offline import OFFLINE_MODELS
from lightning_interp.data.offline import canonical_dataset_id, canonical_model_id


def root_device(datamodule: Any) -> torch.device | None:
    """The root device of the Trainer ``datamodule`` is attached to (``None``: not attached)."""
    trainer = getattr(datamodule, "trainer", None)
    strategy = getattr(trainer, "strategy", None)
    return None if strategy is None else torch.device(strategy.root_device)


def source_provenance(model: str, data: str, **fields: Any) -> dict[str, Any]:
    """Provenance fields of activations computed by ``model`` over ``data``.

    Args:
        model: The model as configured (a Hub id, a folder or an ``offline:`` alias).
        data: The data source as configured.
        **fields: More fields (``context_size``, ...).

    Returns:
        ``{"backbone": <Hub id>, "dataset": <Hub id or description>, **fields, "extra":
        {...}}``, keys as in :class:`~lightning_interp.dictionaries.config.Provenance`;
        ``extra`` keeps the configured names (still loadable) and how offline weights
        differ from the Hub's.

    Example:
        >>> source_provenance("offline:minilm", "hf:imdb:test")["backbone"]
        'sentence-transformers/all-MiniLM-L6-v2'
    """
    extra: dict[str, Any] = {"backbone_source": model, "dataset_source": data}
    if model in OFFLINE_MODELS and OFFLINE_MODELS[model].note:
        extra["backbone_weights"] = OFFLINE_MODELS[model].note
    return {
        "backbone": canonical_model_id(model),
        "dataset": canonical_dataset_id(data),
        **fields,
        "extra": extra,
    }
