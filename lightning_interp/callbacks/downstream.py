"""Callbacks that evaluate and export the dictionaries a training module trains.

Both work with :class:`~lightning_interp.modules.DictionaryModule` (one dictionary: logs
``val/...``, writes ``<dirpath>/dictionary/``) and
:class:`~lightning_interp.modules.MultiDictionaryModule` (logs ``val/<name>/...``, writes
``<dirpath>/<name>/dictionary/``), through the module's ``named_learners()``.
:class:`ExportDictionary` lives in :mod:`lightning_interp.callbacks.export` and is
importable from here too.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn

from lightning_interp.callbacks.export import ExportDictionary
from lightning_interp.data.batches import sites_read
from lightning_interp.data.source import ActivationSource, activation_source
from lightning_interp.dictionaries import Dictionary
from lightning_interp.metrics.downstream import (
    CrossEntropyLossRecovered,
    SplicedKLDivergence,
    SpliceTarget,
    has_lm_head,
    splice_evaluation_many,
)


class DownstreamMetrics(L.Callback):
    """After each validation, splice each dictionary into the backbone and log CE metrics.

    Needs a data module that is an :class:`~lightning_interp.data.source.ActivationSource`
    with a backbone that has an LM head and ``downstream_inputs()`` to splice over (such as
    :class:`~lightning_interp.data.LanguageModelDataModule`); otherwise it logs nothing and
    says why once (encoders such as BERT or MiniLM get the reconstruction metrics only). A
    transcoder (``site_out`` in its provenance, or data serving a pair of sites) reads its
    site and replaces ``site_out``.
    """

    def __init__(self) -> None:
        self._warned: set[str] = set()
        self._cached_for: Any = None
        self._cached_inputs: list[dict[str, Any]] = []

    def _skip(self, pl_module: L.LightningModule, reason: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            pl_module.print(f"downstream metrics skipped: {reason}")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log ``ce_loss_recovered``, ``delta_lm_loss`` and ``kl_divergence`` per dictionary."""
        if trainer.sanity_checking:
            return
        data = activation_source(trainer.datamodule)
        backbone = data.backbone if data is not None else None
        if backbone is None or not has_lm_head(backbone):
            self._skip(pl_module, "no causal-LM backbone in the data (reconstruction only)")
            return
        targets: dict[str | None, SpliceTarget] = {}
        for name, learner in pl_module.named_learners():
            dictionary = learner.dictionary
            provenance = dictionary.config.provenance
            site, site_out = sites_read(provenance.site, provenance.site_out, data.sites)
            if site_out is None and dictionary.d_out != dictionary.d_in:
                self._skip(pl_module, f"{name or 'dictionary'} maps to another site: set site_out")
                continue
            metrics = CrossEntropyLossRecovered(), SplicedKLDivergence()
            targets[name] = SpliceTarget(_on_raw_activations(dictionary), site, site_out, *metrics)
        modes = {name: target.dictionary.training for name, target in targets.items()}
        for target in targets.values():
            target.dictionary.eval()
        # Each rank evaluates its share of the contexts; the metrics sum across ranks.
        for batch in self._inputs(data)[trainer.global_rank :: trainer.world_size]:
            splice_evaluation_many(backbone, list(targets.values()), batch)
        for name, target in targets.items():
            target.dictionary.train(modes[name])
            prefix = "val" if name is None else f"val/{name}"
            values = target.ce_metric.compute_all()
            pl_module.log(f"{prefix}/ce_loss_recovered", float(values["ce_loss_recovered"]))
            pl_module.log(f"{prefix}/delta_lm_loss", float(values["delta_lm_loss"]))
            pl_module.log(f"{prefix}/kl_divergence", float(target.kl_metric.compute()))

    def _inputs(self, data: ActivationSource) -> list[dict[str, Any]]:
        # The held-out contexts do not change during a run: tokenize them once.
        if self._cached_for is not data:
            self._cached_inputs, self._cached_for = data.downstream_inputs(), data
        return self._cached_inputs


class _OnRawActivations(nn.Module):
    """``dictionary(s_in * x) / s_out``: a dictionary trained on scaled rows, fed raw ones.

    The splice reads raw activations from the backbone; this is what the export's folded
    weights compute (:meth:`~lightning_interp.dictionaries.Dictionary.with_scale_folded`),
    without copying the weights at every validation.
    """

    def __init__(self, dictionary: Dictionary) -> None:
        super().__init__()
        provenance = dictionary.config.provenance
        self.dictionary = dictionary
        self.scale_in = float(provenance.activation_scale)
        self.scale_out = float(provenance.output_scale)
        self.train(dictionary.training)

    @property
    def device(self) -> torch.device:  # noqa: D102 (where the splice sends the rows)
        return self.dictionary.device

    @property
    def dtype(self) -> torch.dtype:  # noqa: D102
        return self.dictionary.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.dictionary(x * self.scale_in) / self.scale_out


def _on_raw_activations(dictionary: Dictionary) -> Dictionary | _OnRawActivations:
    provenance = dictionary.config.provenance
    if provenance.activation_scale == 1.0 and provenance.output_scale == 1.0:
        return dictionary
    return _OnRawActivations(dictionary)


__all__ = ["DownstreamMetrics", "ExportDictionary"]
