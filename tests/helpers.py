"""Shared builders for tests."""

from __future__ import annotations

from functools import partial

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_interp import create_dictionary, list_architectures
from lightning_interp.data import SparseSuperposition, SyntheticActivations
from lightning_interp.dictionaries.registry import get_architecture_example, get_dictionary_class
from lightning_interp.modules import DictionaryModule


def example_kwargs(architecture: str) -> dict:
    """The config fields an architecture registered for small tests (``example_kwargs``).

    Each architecture supplies them beside its own code, with the planted-dictionary FVU it
    reaches (``recovery_fvu``), so tests parametrised by ``list_architectures()`` pick up a
    new one without an edit, as timm's tests read each model's ``test_input_size``.
    """
    return dict(get_architecture_example(architecture).kwargs)


def planted_data(seed: int = 0) -> SparseSuperposition:
    """64 unit atoms in 32 dimensions, about 3 active per row, with an offset to centre."""
    return SparseSuperposition(
        d=32, n_features=64, firing_probability=3 / 64, offset_norm=1.0, seed=seed
    )


def small_dictionary(architecture: str, d_in: int = 32, d_latent: int = 128, **overrides):
    kwargs = {**example_kwargs(architecture), **overrides}
    return create_dictionary(architecture, d_in=d_in, d_latent=d_latent, **kwargs)


def sparse_architectures() -> list[str]:
    """Architectures with a sparse training path (a ``sparse_training`` switch)."""
    return [
        name
        for name in list_architectures()
        if hasattr(small_dictionary(name, d_in=8, d_latent=16), "sparse_training")
    ]


def transcoding_architectures() -> list[str]:
    """Architectures that accept ``d_out`` and ``skip_connection`` (not autoencoder-only ones)."""
    return [
        name for name in list_architectures() if get_dictionary_class(name).supports_transcoding
    ]


def loader(data: SparseSuperposition, batch_size: int, num_batches: int, seed: int) -> DataLoader:
    return DataLoader(SyntheticActivations(data, batch_size, num_batches, seed), batch_size=None)


def make_module(dictionary, lr: float = 3e-3, **kwargs) -> DictionaryModule:
    defaults = dict(dead_tokens_threshold=20_000, warmup_steps=20, decay_fraction=0.2)
    return DictionaryModule(
        dictionary, optimizer=partial(torch.optim.Adam, lr=lr), **{**defaults, **kwargs}
    )


def quiet_trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**defaults, **kwargs})
