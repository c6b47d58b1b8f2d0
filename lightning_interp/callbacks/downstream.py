"""Callbacks that evaluate and export the dictionary a DictionaryModule trains."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L

from lightning_interp.metrics.downstream import (
    CrossEntropyLossRecovered,
    SplicedKLDivergence,
    has_lm_head,
    splice_evaluation,
)


class DownstreamMetrics(L.Callback):
    """After each validation, splice the dictionary into the backbone and log CE metrics.

    Needs a datamodule with ``backbone``, ``site`` and ``downstream_inputs()`` (such as
    :class:`~lightning_interp.data.lm_datamodule.LanguageModelActivations`) whose backbone
    has an LM head; otherwise it logs nothing and says why once.
    """

    def __init__(self) -> None:
        self._warned = False

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log ``val/ce_loss_recovered``, ``val/delta_lm_loss`` and ``val/kl_divergence``."""
        data = trainer.datamodule
        backbone = getattr(data, "backbone", None)
        if backbone is None or not hasattr(data, "downstream_inputs") or not has_lm_head(backbone):
            if not self._warned:
                self._warned = True
                pl_module.print("downstream metrics skipped: no causal-LM backbone in the data")
            return
        ce, kl = CrossEntropyLossRecovered(), SplicedKLDivergence()
        was_training = pl_module.dictionary.training
        pl_module.dictionary.eval()
        for inputs in data.downstream_inputs():
            splice_evaluation(
                backbone, pl_module.dictionary, data.site, inputs, ce_metric=ce, kl_metric=kl
            )
        pl_module.dictionary.train(was_training)
        values = ce.compute_all()
        pl_module.log("val/ce_loss_recovered", float(values["ce_loss_recovered"]))
        pl_module.log("val/delta_lm_loss", float(values["delta_lm_loss"]))
        pl_module.log("val/kl_divergence", float(kl.compute()))


class ExportDictionary(L.Callback):
    """At the end of fit, save the dictionary and its final validation metrics.

    Writes ``<dirpath>/dictionary/`` (``config.json`` + ``model.safetensors``, loadable with
    :func:`lightning_interp.load_dictionary`, provenance filled from the datamodule) and
    ``<dirpath>/metrics.json`` with ``fvu``, ``l0``, ``dead_fraction``,
    ``ce_loss_recovered`` (null without an LM head) and ``tokens_trained``.

    Args:
        dirpath: Output folder.
    """

    def __init__(self, dirpath: str = "runs/dictionary") -> None:
        self.dirpath = Path(dirpath)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Save (on global rank 0 only)."""
        if not trainer.is_global_zero:
            return
        dictionary = pl_module.dictionary
        data = trainer.datamodule
        hparams: Any = getattr(data, "hparams", {})
        if getattr(data, "backbone", None) is not None:
            provenance = dictionary.config.provenance
            provenance.backbone = provenance.backbone or hparams.get("model")
            provenance.site = provenance.site or data.site
            provenance.dataset = provenance.dataset or hparams.get("text")
            provenance.context_size = provenance.context_size or hparams.get("context_size")
        dictionary.save_pretrained(self.dirpath / "dictionary")
        metrics = trainer.callback_metrics

        def value(name: str) -> float | None:
            if name not in metrics:
                return None
            number = float(metrics[name])
            return None if math.isnan(number) else number

        summary = {
            "fvu": value("val/fvu"),
            "l0": value("val/l0"),
            "dead_fraction": value("val/dead_fraction"),
            "ce_loss_recovered": value("val/ce_loss_recovered"),
            "delta_lm_loss": value("val/delta_lm_loss"),
            "tokens_trained": int(pl_module.tokens_seen),
        }
        (self.dirpath / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"dictionary: {self.dirpath / 'dictionary'}")
        print(f"metrics: {self.dirpath / 'metrics.json'} {json.dumps(summary)}")
