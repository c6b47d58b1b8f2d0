"""The contract every data module that yields activations implements, and what they share.

:class:`ActivationSource` is what training modules and callbacks read from a data module,
and all they read: its frozen backbone (``None`` for a cache), the sites it serves and
their widths, the provenance it stamps on a dictionary, the scale it applies to each site,
and the inputs downstream metrics need. A module fills a dictionary's ``d_in`` (and a
transcoder's ``d_out``) and provenance from it at setup, so a recipe names each site once
and never types a width.

A data module attached to a Trainer puts its backbone on the trainer's root device
(``trainer.strategy.root_device``: the GPU of this DDP rank, or the CPU), so the backbone's
forward, the expensive part of every step, runs where training runs. Its provenance names
the Hub ids behind ``offline:`` aliases, so model cards link to the real model and say
what the data really were.
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from lightning_interp.backbones import Backbone
from lightning_interp.backbones.offline import OFFLINE_MODELS
from lightning_interp.data.offline import canonical_dataset_id, canonical_model_id


@runtime_checkable
class ActivationSource(Protocol):
    """A data module (or any object) that serves activations of named sites.

    Implemented by :class:`~lightning_interp.data.LanguageModelDataModule`,
    :class:`~lightning_interp.data.VisionModelDataModule`,
    :class:`~lightning_interp.data.ActivationDataModule` (a cache: no backbone) and
    :class:`~lightning_interp.data.EmbeddingDataModule`. The batches of an activation data
    module are mappings ``{site: rows}`` in the order of :attr:`sites` (see
    :mod:`~lightning_interp.data.batches`); the embedding data module, which serves concept
    heads, yields labelled embeddings of its one site, ``"embeddings"``. The properties may
    set the source up (load its backbone, open its cache) on first use. Check an object
    with :func:`activation_source` (``isinstance`` works too, but on Python < 3.12 it reads
    every property).

    Attributes:
        backbone: The frozen :class:`~lightning_interp.backbones.Backbone` the activations
            come from, ``None`` when it holds none (a cache, or not loaded).
    """

    backbone: Backbone | None

    @property
    def sites(self) -> list[str]:
        """Canonical names of the sites served, in batch order."""
        ...

    @property
    def site_widths(self) -> dict[str, int]:
        """Width of each served site's activations."""
        ...

    @property
    def provenance(self) -> dict[str, Any]:
        """Provenance fields to stamp on a dictionary (``backbone``, ``dataset``, ...).

        Keys as in :class:`~lightning_interp.dictionaries.config.Provenance`; the sites and
        scales are given by :attr:`sites` and :attr:`scales`.
        """
        ...

    @property
    def scales(self) -> dict[str, float]:
        """Site -> factor every batch's rows are multiplied by (empty: raw activations)."""
        ...

    def downstream_inputs(self) -> list[dict[str, Tensor]]:
        """Model inputs (token batches) for spliced downstream metrics; empty if none."""
        ...


#: The members of :class:`ActivationSource` (what :func:`activation_source` checks).
SOURCE_MEMBERS = ("backbone", "sites", "site_widths", "provenance", "scales", "downstream_inputs")


def activation_source(obj: Any) -> ActivationSource | None:
    """``obj`` if it implements :class:`ActivationSource`, else ``None``.

    Checked without reading any member: on Python < 3.12 ``isinstance`` with a protocol
    evaluates every property, which would load a backbone or estimate scales.
    """
    if obj is None:
        return None
    for name in SOURCE_MEMBERS:
        try:
            inspect.getattr_static(obj, name)
        except AttributeError:
            return None
    return obj


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


class BackboneSites:
    """Mixin of the data modules that own a backbone: the widths of their sites, read from it.

    The class gives ``backbone`` and ``sites`` (canonical); the widths come from
    :meth:`~lightning_interp.backbones.Backbone.site_width` (the modules' shapes, no forward).
    """

    backbone: Backbone | None
    sites: list[str]

    @property
    def site(self) -> str:
        """The (first) site, canonical."""
        return self.sites[0]

    @property
    def site_widths(self) -> dict[str, int]:
        """Width of each site's activations."""
        sites = self.sites  # sets the data module up, so the backbone is loaded
        return {site: self.backbone.site_width(site) for site in sites}
