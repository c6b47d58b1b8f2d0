"""Export the dictionaries a training module trained, with their final metrics.

:class:`ExportDictionary` ends every fit the same way, however it stopped (the data ran out,
``max_epochs`` or ``max_steps``): a validation pass if the last one is stale, then each
dictionary's weights and a ``metrics.json``, into the trainer's ``default_root_dir`` as the
run resolves it (so ``--trainer.default_root_dir=X`` moves the export), never over another
run's export. It saves each dictionary as the training module holds it: the module took its
provenance from the data module at setup, and the activation scale when training started.
"""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path
from typing import Any

import lightning as L

from lightning_interp._io import atomic_write, check_folder_name, safe_join
from lightning_interp.errors import NonFiniteError, OutputExistsError
from lightning_interp.modules.guards import nonfinite_parameters

METRICS_FILE = "metrics.json"


def run_final_validation(trainer: L.Trainer) -> bool:
    """Run the fit's validation loop once more, now (from ``on_train_end``).

    The same loop Lightning runs during fit, with every callback's validation hooks (so
    :class:`~lightning_interp.callbacks.DownstreamMetrics` adds CE loss recovered), and the
    results land in ``trainer.callback_metrics``.

    Returns:
        Whether any validation batch ran (``False``: the run has no validation data).
    """
    if not trainer.enable_validation:
        return False
    loop = trainer.fit_loop.epoch_loop.val_loop
    trainer.validating = True
    try:
        loop.run()
    finally:
        trainer.training = True
    return sum(trainer.num_val_batches) > 0


def _owner(folder: Path) -> str | None:
    """The ``run_id`` recorded in ``folder/metrics.json`` (``None``: absent or unreadable)."""
    try:
        return str(json.loads((folder / METRICS_FILE).read_text(encoding="utf-8"))["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def learner_folders(root: Path, pl_module: L.LightningModule) -> dict[str | None, Path]:
    """Each dictionary's output folder: ``root`` for a single one, else ``root/<name>``."""
    return {
        name: root if name is None else safe_join(root, check_folder_name(name, "name"))
        for name, _ in pl_module.named_learners()
    }


class ExportDictionary(L.Callback):
    """At the end of fit, save each dictionary and its final validation metrics.

    Writes ``<dirpath>/dictionary/`` (``config.json`` + ``model.safetensors``, loadable with
    :func:`lightning_interp.load_dictionary`; with the provenance the training module took
    from the data module, and an activation scale the training data applied folded into the
    weights, so the saved dictionary takes raw activations) and ``<dirpath>/metrics.json``:

    - ``fvu``, ``l0``: the final validation pass;
    - ``dead_fraction``: latents that did not fire in the last ``dead_window_tokens``
      *training* tokens (the module's ``dead_tokens_threshold``, or every token trained
      when the run was shorter), the number Gao et al. (2024), sparsify and
      dictionary_learning report; ``dead_fraction_val``: latents that never fired on the
      validation set (higher on a small set);
    - ``ce_loss_recovered``, ``delta_lm_loss`` (``null`` without an LM head);
    - ``tokens_trained``, ``skipped_batches`` (``on_nonfinite="skip"``) and ``run_id``.

    A multi-dictionary run writes the same under ``<dirpath>/<name>/`` for each dictionary.

    Every run ends with an evaluation: if no validation ran after the last training step
    (``max_steps`` stops mid-epoch, where Lightning does not validate), the validation
    loop runs once more before the export. Dictionaries holding NaN or Inf weights are not
    written (:class:`~lightning_interp.errors.NonFiniteError`, nothing exported).

    An existing export in the folder is replaced only by the run that wrote it (resumed
    from its checkpoint: the run id is kept in checkpoints) or with ``overwrite=True``;
    otherwise the fit stops at its start with
    :class:`~lightning_interp.errors.OutputExistsError`, before any training.

    Args:
        dirpath: Output folder. Default: the trainer's ``default_root_dir``, read when the
            run starts, so ``--trainer.default_root_dir=runs/x`` exports to ``runs/x``.
        overwrite: Replace an export left by another run.
        final_validation: Run the closing validation pass when the last one is stale.
    """

    def __init__(
        self, dirpath: str | None = None, overwrite: bool = False, final_validation: bool = True
    ) -> None:
        self.dirpath = dirpath
        self.overwrite = overwrite
        self.final_validation = final_validation
        self.run_id = uuid.uuid4().hex
        self._validated_at: int | None = None

    # ------------------------------------------------------------------ where
    def output_dir(self, trainer: L.Trainer) -> Path:
        """The export folder of this run (``dirpath``, else ``trainer.default_root_dir``)."""
        return Path(self.dirpath if self.dirpath is not None else trainer.default_root_dir)

    def _folders(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        return learner_folders(self.output_dir(trainer), pl_module)

    def state_dict(self) -> dict[str, Any]:
        """The run id, kept in checkpoints so a resumed run may replace its own export."""
        return {"run_id": self.run_id}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Adopt the run id of the checkpoint being resumed."""
        self.run_id = str(state_dict.get("run_id", self.run_id))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Refuse, before training, a folder holding another run's export."""
        self._validated_at = None
        for folder in self._folders(trainer, pl_module).values():
            if not ((folder / "dictionary").exists() or (folder / METRICS_FILE).exists()):
                continue
            owner = _owner(folder)
            if owner == self.run_id:
                continue  # this run, resumed: its export is replaced
            if not self.overwrite:
                raise OutputExistsError(
                    f"{folder} already holds the export of another run "
                    f"({'run ' + owner if owner else 'no run id'}); give this run its own "
                    f"folder (--trainer.default_root_dir=runs/NAME or ExportDictionary's "
                    f"dirpath), delete the old one, or set ExportDictionary's overwrite: true"
                )
            pl_module.print(f"{folder}: replacing the export of run {owner} (overwrite=True)")

    # ------------------------------------------------------------------ final evaluation
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Remember the step of the last validation."""
        if not trainer.sanity_checking:
            self._validated_at = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Validate once more if the last validation is older than the last step."""
        if not self.final_validation or self._validated_at == trainer.global_step:
            return
        if not run_final_validation(trainer):
            pl_module.print(
                "no validation data: metrics.json reports training-window numbers only "
                "(give the data module validation rows, e.g. val_tokens)"
            )

    # ------------------------------------------------------------------ export
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Save (on global rank 0 only), unless a dictionary holds non-finite weights."""
        folders = self._folders(trainer, pl_module)
        learners = dict(pl_module.named_learners())
        broken = {
            name: bad
            for name, learner in learners.items()
            if (bad := nonfinite_parameters([("", learner.dictionary)]))
        }
        if broken:
            which = "; ".join(f"{name or 'dictionary'}: {bad}" for name, bad in broken.items())
            raise NonFiniteError(
                f"not exporting to {self.output_dir(trainer)}: weights hold NaN or Inf after "
                f"{trainer.global_step} steps ({which}); nothing was written. Rerun with "
                f"on_nonfinite='raise' (the default) to stop at the first bad batch or loss, "
                f"lower the learning rate, or train in 32-true precision"
            )
        if not trainer.is_global_zero:
            return
        for name, learner in learners.items():
            folder = folders[name]
            summary = self._summary(trainer, pl_module, name, learner)
            learner.dictionary.save_pretrained(folder / "dictionary")
            text = json.dumps(summary, indent=2) + "\n"
            atomic_write(folder / METRICS_FILE, lambda p, text=text: p.write_text(text))
            print(f"dictionary: {folder / 'dictionary'}")
            print(f"metrics: {folder / METRICS_FILE} {json.dumps(summary)}")

    def _summary(
        self, trainer: L.Trainer, pl_module: L.LightningModule, name: str | None, learner: Any
    ) -> dict[str, Any]:
        metrics = trainer.callback_metrics
        prefix = "val" if name is None else f"val/{name}"

        def value(key: str) -> float | None:
            if f"{prefix}/{key}" not in metrics:
                return None
            number = float(metrics[f"{prefix}/{key}"])
            return None if math.isnan(number) else number

        dead, window = learner.training_dead_fraction()
        return {
            "fvu": value("fvu"),
            "l0": value("l0"),
            "dead_fraction": dead,
            "dead_window_tokens": window,
            "dead_fraction_val": value("dead_fraction"),
            "ce_loss_recovered": value("ce_loss_recovered"),
            "delta_lm_loss": value("delta_lm_loss"),
            "tokens_trained": int(learner.tokens_seen),
            "skipped_batches": int(getattr(pl_module, "skipped_batches", 0)),
            "run_id": self.run_id,
        }
