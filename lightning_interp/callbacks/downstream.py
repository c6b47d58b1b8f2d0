"""Callbacks that evaluate and export the dictionaries a training module trains.

Both work with :class:`~lightning_interp.modules.DictionaryModule` (one dictionary: logs
``val/...``, writes ``<dirpath>/dictionary/``) and
:class:`~lightning_interp.modules.MultiDictionaryModule` (logs ``val/<name>/...``, writes
``<dirpath>/<name>/dictionary/``), through the module's ``named_learners()``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L

from lightning_interp.dictionaries import Dictionary
from lightning_interp.dictionaries.serialization import atomic_write
from lightning_interp.metrics.downstream import (
    CrossEntropyLossRecovered,
    SplicedKLDivergence,
    SpliceTarget,
    has_lm_head,
    splice_evaluation_many,
)


def _sites(dictionary: Dictionary, data: Any) -> tuple[str | None, str | None]:
    """``(site, site_out)`` of a dictionary: its provenance, else the data module's sites.

    A data module yielding ``(inputs, targets)`` pairs (two sites, ``batch_format:
    auto``) trains a transcoder from its first site to its second.
    """
    provenance = dictionary.config.provenance
    site, site_out = provenance.site, provenance.site_out
    backbone = getattr(data, "backbone", None)
    if site is None and backbone is not None:
        sites = backbone.resolve_sites(data.hparams.get("sites") or data.site)
        pairs = len(sites) == 2 and data.hparams.get("batch_format", "auto") == "auto"
        site, site_out = (sites[0], sites[1]) if pairs else (data.site, None)
    return site, site_out


class DownstreamMetrics(L.Callback):
    """After each validation, splice each dictionary into the backbone and log CE metrics.

    Needs a datamodule with ``backbone``, ``site`` and ``downstream_inputs()`` (such as
    :class:`~lightning_interp.data.lm_datamodule.LanguageModelActivations`) whose backbone
    has an LM head; otherwise it logs nothing and says why once (encoders such as BERT
    or MiniLM get the reconstruction metrics only). A transcoder (``site_out`` in its
    provenance, or a data module yielding ``(inputs, targets)`` pairs) reads its site and
    replaces ``site_out``.
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
        data = trainer.datamodule
        backbone = getattr(data, "backbone", None)
        if backbone is None or not hasattr(data, "downstream_inputs") or not has_lm_head(backbone):
            self._skip(pl_module, "no causal-LM backbone in the data (reconstruction only)")
            return
        targets: dict[str | None, SpliceTarget] = {}
        for name, learner in pl_module.named_learners():
            dictionary = learner.dictionary
            site, site_out = _sites(dictionary, data)
            if site_out is None and dictionary.d_out != dictionary.d_in:
                self._skip(pl_module, f"{name or 'dictionary'} maps to another site: set site_out")
                continue
            metrics = CrossEntropyLossRecovered(), SplicedKLDivergence()
            targets[name] = SpliceTarget(dictionary, site, site_out, *metrics)
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

    def _inputs(self, data: Any) -> list[dict[str, Any]]:
        # The held-out contexts do not change during a run: tokenize them once.
        if self._cached_for is not data:
            self._cached_inputs, self._cached_for = data.downstream_inputs(), data
        return self._cached_inputs


class ExportDictionary(L.Callback):
    """At the end of fit, save each dictionary and its final validation metrics.

    Writes ``<dirpath>/dictionary/`` (``config.json`` + ``model.safetensors``, loadable with
    :func:`lightning_interp.load_dictionary`, provenance filled from the datamodule) and
    ``<dirpath>/metrics.json`` with ``fvu``, ``l0``, ``dead_fraction``,
    ``ce_loss_recovered`` (null without an LM head), ``delta_lm_loss`` and
    ``tokens_trained``. A multi-dictionary run writes the same under
    ``<dirpath>/<name>/`` for each dictionary.

    Args:
        dirpath: Output folder.
    """

    def __init__(self, dirpath: str = "runs/dictionary") -> None:
        self.dirpath = Path(dirpath)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Save (on global rank 0 only)."""
        if not trainer.is_global_zero:
            return
        data = trainer.datamodule
        hparams: Any = getattr(data, "hparams", {})
        metrics = trainer.callback_metrics
        for name, learner in pl_module.named_learners():
            dictionary = learner.dictionary
            folder = self.dirpath if name is None else self.dirpath / name
            prefix = "val" if name is None else f"val/{name}"
            if getattr(data, "backbone", None) is not None:
                provenance = dictionary.config.provenance
                provenance.backbone = provenance.backbone or hparams.get("model")
                provenance.site, provenance.site_out = _sites(dictionary, data)
                provenance.dataset = provenance.dataset or hparams.get("text")
                provenance.context_size = provenance.context_size or hparams.get("context_size")
            dictionary.save_pretrained(folder / "dictionary")

            def value(key: str, prefix: str = prefix) -> float | None:
                if f"{prefix}/{key}" not in metrics:
                    return None
                number = float(metrics[f"{prefix}/{key}"])
                return None if math.isnan(number) else number

            summary = {
                "fvu": value("fvu"),
                "l0": value("l0"),
                "dead_fraction": value("dead_fraction"),
                "ce_loss_recovered": value("ce_loss_recovered"),
                "delta_lm_loss": value("delta_lm_loss"),
                "tokens_trained": int(learner.tokens_seen),
            }
            text = json.dumps(summary, indent=2) + "\n"
            atomic_write(folder / "metrics.json", lambda p, text=text: p.write_text(text))
            print(f"dictionary: {folder / 'dictionary'}")
            print(f"metrics: {folder / 'metrics.json'} {json.dumps(summary)}")
