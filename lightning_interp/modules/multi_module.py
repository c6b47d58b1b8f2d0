"""Train several dictionaries from one pass of the backbone (SAELens's multi-SAE runner)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lightning_interp.data.batches import inputs_and_targets
from lightning_interp.dictionaries import Dictionary
from lightning_interp.errors import ConfigError
from lightning_interp.modules.dictionary_spec import (
    DictionarySpec,
    dictionary_hparams,
    dictionary_or_spec,
)
from lightning_interp.modules.guards import NonFinitePolicy, batch_parts
from lightning_interp.modules.training_module import DictionaryTrainingModule


def _check_name(name: str) -> None:
    # Names become module keys, log keys and folder names.
    if not name or any(char in name for char in "./\\ "):
        raise ConfigError(
            f"dictionary name {name!r} may not be empty or contain '.', '/', '\\' or spaces "
            f"(it names a submodule, a log key and an output folder); try "
            f"{name.replace('.', '_').replace('/', '_') or 'sae'!r}"
        )


class MultiDictionaryModule(DictionaryTrainingModule):
    """Trains several dictionaries on the same batches, each with its own state and metrics.

    Each dictionary reads the site named in its ``config.provenance.site`` (and
    ``site_out`` for a transcoder) from batches keyed by site, as every data module of
    :mod:`lightning_interp.data` yields them; a dictionary naming no site reads the data's
    only site (or its pair of sites), e.g. several widths or ``k`` on one site. With plain
    tensor (or ``(inputs, targets)``) batches every dictionary sees the whole batch. So the
    backbone runs once per batch however many dictionaries train. Widths and provenance
    come from the data module at setup, as for
    :class:`~lightning_interp.modules.DictionaryModule`.

    Every dictionary has its own parameter group (its learning rate from
    ``learning_rates``, its own Adam moments), decoder constraint, ``b_dec``
    initialisation, dead-latent counter and metrics, logged as ``train/<name>/...`` and
    ``val/<name>/...``; :class:`~lightning_interp.callbacks.ExportDictionary` writes each
    to ``<dirpath>/<name>/``. The groups share one torch optimizer because Lightning's
    manual optimization would count one ``global_step`` per optimizer per batch; Adam's
    state is per parameter, so the update of each dictionary is what its own optimizer
    would give.

    Args:
        dictionaries: Name -> dictionary, or its config (as
            :class:`~lightning_interp.modules.DictionaryModule` takes it; ``d_in`` may be
            left out).
        optimizer: Optimizer callable, applied to each dictionary's parameters.
        lr_scheduler: Scheduler callable (replaces the built-in warm-up/decay).
        learning_rates: Name -> learning rate, overriding the optimizer's for that one.
        warmup_steps: Linear learning-rate warm-up steps.
        decay_fraction: Share of the run over which the learning rate decays to zero.
        sparsity_warmup_steps: Steps over which sparsity penalties ramp up.
        dead_tokens_threshold: Tokens without firing after which a latent is dead.
        dense_threshold: Firing frequency above which a latent counts as dense.
        on_nonfinite: ``"raise"`` (default) or ``"skip"``: what a batch with NaN/Inf values
            or zero rows for any dictionary, or a non-finite loss of any dictionary, does
            (see :class:`~lightning_interp.modules.DictionaryModule`); a skipped step is
            skipped for every dictionary, as they share one optimizer step.

    Example:
        >>> import lightning as L, torch
        >>> from lightning_interp import create_dictionary
        >>> module = MultiDictionaryModule({
        ...     "k2": create_dictionary("topk", d_in=8, d_latent=32, k=2),
        ...     "k4": create_dictionary("topk", d_in=8, d_latent=64, k=4),
        ... })
        >>> loader = torch.utils.data.DataLoader(torch.randn(256, 8), batch_size=64)
        >>> L.Trainer(max_steps=2, logger=False, enable_checkpointing=False,
        ...           enable_progress_bar=False, enable_model_summary=False).fit(module, loader)
        >>> sorted(module.dictionaries)
        ['k2', 'k4']
    """

    def __init__(
        self,
        dictionaries: Mapping[str, Dictionary | DictionarySpec],
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        learning_rates: dict[str, float] | None = None,
        warmup_steps: int = 0,
        decay_fraction: float = 0.0,
        sparsity_warmup_steps: int = 0,
        dead_tokens_threshold: int = 10_000_000,
        dense_threshold: float = 0.1,
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        if not dictionaries:
            raise ConfigError("dictionaries is empty; name at least one dictionary to train")
        built = {}
        for name, dictionary in dictionaries.items():
            _check_name(name)
            built[name] = dictionary_or_spec(dictionary)
        super().__init__(
            built,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            warmup_steps=warmup_steps,
            decay_fraction=decay_fraction,
            sparsity_warmup_steps=sparsity_warmup_steps,
            dead_tokens_threshold=dead_tokens_threshold,
            dense_threshold=dense_threshold,
            learning_rates=learning_rates,
            on_nonfinite=on_nonfinite,
        )
        self.save_hyperparameters(ignore=["dictionaries", "optimizer", "lr_scheduler"])
        self._store_specs()

    def _store_specs(self) -> None:
        self.hparams["dictionaries"] = {
            name: dictionary_hparams(item) for name, item in self._current().items()
        }

    @property
    def dictionaries(self) -> dict[str, Dictionary]:
        """Name -> dictionary being trained."""
        return {name: learner.dictionary for name, learner in self.learners.items()}

    def select(self, batch: Any, name: str) -> tuple[Tensor, Tensor | None]:
        """The ``(inputs, targets)`` dictionary ``name`` trains on in ``batch``."""
        provenance = self.learners[name].dictionary.config.provenance
        return inputs_and_targets(batch, provenance.site, provenance.site_out, self._label(name))

    def _specs(self, hparams: Mapping[str, Any]) -> dict[str, Mapping[str, Any]] | None:
        specs = hparams.get("dictionaries")
        return dict(specs) if isinstance(specs, Mapping) else None

    def _selected(self, batch: Any) -> tuple[dict, dict[str, Tensor]]:
        """Each dictionary's ``(inputs, targets)``, and every distinct tensor, labelled."""
        selected = {name: self.select(batch, name) for name in self.learners}
        parts: dict[str, Tensor] = {}
        seen: set[int] = set()
        for name, (inputs, targets) in selected.items():
            site = self.learners[name].dictionary.config.provenance.site
            where = f" of {name!r}" + (f" (site {site!r})" if site else "")
            for label, tensor in batch_parts(inputs, targets, where).items():
                # Dictionaries sharing a site share its tensor: check it once.
                if id(tensor) not in seen:
                    seen.add(id(tensor))
                    parts[label] = tensor
        return selected, parts

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One step of every dictionary (their losses add; parameters are disjoint).

        For a batch or loss that ``on_nonfinite="skip"`` skips, no dictionary moves (see
        :meth:`skipped_step`).
        """
        selected, parts = self._selected(batch)
        if not self._usable_batch(parts, batch_idx):
            return self.skipped_step()
        scale = self.sparsity_scale()
        results = {
            name: learner.forward_loss(*selected[name], sparsity_scale=scale, reduce=self.reduce)
            for name, learner in self.learners.items()
        }
        if not self._usable_loss({name: r[0] for name, r in results.items()}, batch_idx):
            return self.skipped_step()
        for name, (_, logged, out) in results.items():
            learner = self.learners[name]
            learner.commit(out, self.reduce)
            self._log_training(f"train/{name}", logged, learner)
        total = torch.stack([loss for loss, _, _ in results.values()]).sum()
        self.log("loss", total.detach(), prog_bar=True, logger=False)
        self._log_throughput(max(inputs.shape[0] for inputs, _ in selected.values()))
        # Closed-form learners (semi-NMF) have already stepped and add no gradient.
        return total if total.requires_grad else self.skipped_step()

    def _evaluate(self, batch: Any, prefix: str, batch_idx: int) -> None:
        selected, parts = self._selected(batch)
        if not self._usable_batch(parts, batch_idx, stage=prefix):
            return
        for name, learner in self.learners.items():
            metrics = learner.update_metrics(*selected[name])
            self._log_evaluation(f"{prefix}/{name}", metrics)
