"""The shared base of the LightningModules that train dictionaries.

:class:`DictionaryTrainingModule` holds what every such loop shares (one
:class:`~lightning_interp.modules.learner.DictionaryLearner` per dictionary, the optimizer
and schedules, decoder constraints, the non-finite policy, checkpoint checks, throughput
and metric logging); :class:`~lightning_interp.modules.DictionaryModule` trains one
dictionary, and :class:`~lightning_interp.modules.MultiDictionaryModule` several from the
same batches. At setup it reads the data module through its
:class:`~lightning_interp.data.source.ActivationSource` contract only: each dictionary's
widths and provenance then (:mod:`~lightning_interp.modules.dictionary_spec`), its scale
when training starts (:mod:`~lightning_interp.modules.scales`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_interp.data.renamed import adopt_former_state
from lightning_interp.data.source import ActivationSource, activation_source
from lightning_interp.dictionaries import Dictionary
from lightning_interp.errors import ConfigError
from lightning_interp.modules.checkpoints import check_resume_compatible, install_checkpoint_checks
from lightning_interp.modules.dictionary_spec import (
    DictionarySpec,
    build_specs,
    configure_from_source,
)
from lightning_interp.modules.guards import BatchGuard, NonFinitePolicy
from lightning_interp.modules.learner import DictionaryLearner
from lightning_interp.modules.scales import data_scales, record_activation_scales
from lightning_interp.modules.schedules import linear_warmup, warmup_then_decay


def merge_optimizers(optimizers: Sequence[torch.optim.Optimizer]) -> torch.optim.Optimizer:
    """One optimizer holding the parameter groups (and hyperparameters) of several.

    Adam-style state is per parameter, so this trains every group exactly as its own
    optimizer would, while Lightning's automatic optimization (precision scaling,
    gradient clipping and accumulation, one ``global_step`` per batch) stays intact.
    """
    first = optimizers[0]
    if len(optimizers) == 1:
        return first
    kinds = {type(optimizer).__name__ for optimizer in optimizers}
    if len(kinds) > 1:
        raise ConfigError(
            f"all dictionaries of one run must use the same optimizer class, got "
            f"{sorted(kinds)}; vary the learning rate per dictionary with learning_rates"
        )
    groups = [group for optimizer in optimizers for group in optimizer.param_groups]
    return type(first)(groups, **first.defaults)


class DictionaryTrainingModule(L.LightningModule):
    """Base of the modules that train one or more dictionaries (not used directly).

    It wraps each named dictionary in a
    :class:`~lightning_interp.modules.learner.DictionaryLearner` (``self.learners``);
    subclasses implement ``training_step``, ``_evaluate``, ``_specs`` and ``_store_specs``.
    A dictionary given as a :class:`~lightning_interp.modules.dictionary_spec.DictionarySpec`
    (its config leaves ``d_in`` open) gets its learner in :meth:`configure_model`, where
    every dictionary takes its widths and provenance from the data module. This class builds
    the optimizer and schedule, keeps decoders on the unit sphere, logs throughput
    (``tok/s`` in the progress bar), applies the ``on_nonfinite`` policy to batches and
    losses (:class:`~lightning_interp.modules.guards.BatchGuard`), refuses checkpoints of
    another model or damaged ones (:mod:`~lightning_interp.modules.checkpoints`), and
    records the training data's activation scale in each dictionary's provenance
    (:mod:`~lightning_interp.modules.scales`).
    """

    def __init__(
        self,
        dictionaries: Mapping[str, Dictionary | DictionarySpec],
        *,
        optimizer: OptimizerCallable | None,
        lr_scheduler: LRSchedulerCallable | None,
        warmup_steps: int,
        decay_fraction: float,
        sparsity_warmup_steps: int,
        dead_tokens_threshold: int,
        dense_threshold: float,
        learning_rates: Mapping[str, float] | None = None,
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__()
        self.guard = BatchGuard(on_nonfinite, any_rank=self._any_rank, announce=self.print)
        if dead_tokens_threshold <= 0:
            raise ConfigError(f"dead_tokens_threshold must be > 0, got {dead_tokens_threshold}")
        self._learner_kwargs = dict(
            dead_tokens_threshold=dead_tokens_threshold, dense_threshold=dense_threshold
        )
        self._names = list(dictionaries)
        # Dictionaries whose d_in the data module gives: built in configure_model.
        self._pending = {n: d for n, d in dictionaries.items() if isinstance(d, DictionarySpec)}
        learners = {
            name: DictionaryLearner(dictionary, **self._learner_kwargs)
            for name, dictionary in dictionaries.items()
            if name not in self._pending
        }
        if not 0.0 <= decay_fraction <= 1.0:
            raise ConfigError(f"decay_fraction must be in [0, 1], got {decay_fraction}")
        if warmup_steps < 0 or sparsity_warmup_steps < 0:
            raise ConfigError("warmup_steps and sparsity_warmup_steps must be >= 0")
        unknown = sorted(set(learning_rates or {}) - set(self._names))
        if unknown:
            raise ConfigError(
                f"learning_rates names {unknown}, which are not dictionaries of this run "
                f"({sorted(self._names)})"
            )
        self.learners = nn.ModuleDict(dict(learners))
        self.optimizer_factory = optimizer or partial(torch.optim.Adam, lr=2e-4, fused=True)
        self.lr_scheduler_factory = lr_scheduler
        self.learning_rates = dict(learning_rates or {})
        self.warmup_steps = warmup_steps
        self.decay_fraction = decay_fraction
        self.sparsity_warmup_steps = sparsity_warmup_steps
        self._step_started: float | None = None
        self._throughput = (0.0, 0.0)  # smoothed (rows, seconds)
        self._last_step_end: float | None = None
        self._discard_gradients = False

    def _label(self, name: str) -> str:
        """How messages name dictionary ``name``."""
        return f"dictionary {name!r}"

    def _current(self) -> dict[str, Dictionary | DictionarySpec]:
        """Name -> dictionary, or its spec while it waits for the data's widths."""
        return {
            name: self._pending[name] if name in self._pending else self.learners[name].dictionary
            for name in self._names
        }

    def _learner(self, name: str) -> DictionaryLearner:
        if name in self._pending:
            raise ConfigError(
                f"{self._label(name)} is built at setup, from the data module's site widths "
                f"(its config leaves d_in open); read it after trainer.fit/validate starts, or "
                f"give d_in"
            )
        return self.learners[name]

    def named_learners(self) -> Iterator[tuple[str | None, DictionaryLearner]]:
        """``(name, learner)`` pairs; the name is ``None`` for a single-dictionary module.

        Callbacks use the name for log keys (``val/<name>/...``) and output folders.
        """
        yield from self.learners.items()

    @property
    def skipped_batches(self) -> int:
        """Training batches skipped under ``on_nonfinite="skip"`` (kept in checkpoints)."""
        return self.guard.skipped["train"]

    # ------------------------------------------------------------------ safety
    def _any_rank(self, bad: bool, device: torch.device) -> bool:
        if self._trainer is None or self.trainer.world_size == 1:
            return bad
        return bool(self.reduce(torch.tensor(float(bad), device=device), "sum") > 0)

    def _usable_batch(
        self, parts: Mapping[str, Tensor], batch_idx: int, stage: str = "train"
    ) -> bool:
        usable = self.guard.usable(
            parts,
            where=type(self).__name__,
            step=self.global_step,
            batch_idx=batch_idx,
            stage=stage,
        )
        if not usable:
            self._log_skipped(stage)
        return usable

    def _usable_loss(self, losses: Mapping[str, Tensor], batch_idx: int) -> bool:
        usable = self.guard.usable_loss(
            losses,
            where=type(self).__name__,
            step=self.global_step,
            batch_idx=batch_idx,
            weights=[(name, learner.dictionary) for name, learner in self.learners.items()],
        )
        if not usable:
            self._log_skipped("train")
        return usable

    def _log_skipped(self, stage: str) -> None:
        on_step = stage == "train"
        self.log(
            f"{stage}/skipped_batches",
            float(self.guard.skipped[stage]),
            on_step=on_step,
            on_epoch=not on_step,
            reduce_fx="max",
        )

    def _specs(self, hparams: Mapping[str, Any]) -> dict[str, Mapping[str, Any]] | None:
        """Name -> dictionary spec recorded in (checkpoint) hyper-parameters, if any."""
        raise NotImplementedError

    def _store_specs(self) -> None:
        """Record the current dictionary specs in ``self.hparams`` (what checkpoints keep)."""
        raise NotImplementedError

    def configure_model(self) -> None:
        """Size and stamp every dictionary from the data module, building any left open.

        Lightning runs this after the data module's ``setup`` and before it restores a
        checkpoint, so a dictionary exists with its real size when its weights load. The data
        module is read through :class:`~lightning_interp.data.source.ActivationSource` only
        (see :func:`~lightning_interp.modules.dictionary_spec.configure_from_source`); with
        none, dictionaries are trained as given.

        Raises:
            ConfigError: a config leaves ``d_in`` open and the data does not give it.
            ShapeMismatchError: a given width differs from the data's.
        """
        trainer = self._trainer
        source = activation_source(trainer.datamodule) if trainer is not None else None
        if source is None:
            if self._pending:
                names = ", ".join(self._label(name) for name in self._pending)
                raise ConfigError(
                    f"{names} leaves d_in open, and only a data module implementing "
                    f"ActivationSource (e.g. LanguageModelDataModule) gives widths; set d_in"
                )
            return
        self._configure_from(source)

    def _configure_from(self, source: ActivationSource) -> None:
        configs = {
            name: configure_from_source(item.config, source, self._label(name))
            for name, item in self._current().items()
        }
        built = build_specs(
            {
                name: DictionarySpec(configs[name], spec.rng_state, spec.default_dtype)
                for name, spec in self._pending.items()
            }
        )
        for name, learner in self.learners.items():
            if learner.dictionary.config != configs[name]:
                learner.dictionary.config = configs[name]
        if built:
            self.learners = nn.ModuleDict(
                {
                    name: self.learners[name]
                    if name in self.learners
                    else DictionaryLearner(built[name], **self._learner_kwargs)
                    for name in self._names
                }
            )
            self._pending = {}
        self._store_specs()

    def setup(self, stage: str) -> None:
        """Make the trainer report damaged checkpoint files as :class:`CheckpointError`.

        Lightning loads ``ckpt_path`` after this hook, through the strategy's
        ``checkpoint_io``, which is wrapped here (see
        :class:`~lightning_interp.modules.checkpoints.CheckedCheckpointIO`).
        """
        install_checkpoint_checks(self.trainer)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of other dictionaries; restore the skipped-batch count.

        Runs before Lightning loads the weights, so a different ``k`` (same tensor shapes)
        is refused as clearly as a different width.
        """
        source = self._trainer.ckpt_path if self._trainer is not None else None
        if self._trainer is not None:  # a data module's state saved under its former name
            adopt_former_state(checkpoint, self._trainer.datamodule)
        saved = self._specs(checkpoint.get("hyper_parameters") or {})
        check_resume_compatible(saved, self._specs(self.hparams) or {}, source=source)
        state = checkpoint.get("lightning_interp") or {}
        self.guard.skipped["train"] = int(state.get("skipped_batches", 0))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the skipped-batch count with the run."""
        checkpoint["lightning_interp"] = {"skipped_batches": self.skipped_batches}

    def on_train_start(self) -> None:
        """Record the scale the training data applies in each dictionary's provenance.

        So that saving folds it and the saved dictionary takes raw activations (see
        :mod:`~lightning_interp.modules.scales`).
        """
        source = activation_source(self.trainer.datamodule)
        if source is not None:
            found = source.scales, source.sites
        else:  # a bare dataset (trainer.fit(module, stream)) announcing its scales and sites
            found = data_scales(getattr(self.trainer.train_dataloader, "dataset", None))
        if found is None:
            return
        for name, learner in self.learners.items():
            if record_activation_scales(learner.dictionary, *found):
                provenance = learner.dictionary.config.provenance
                self.print(
                    f"{name}: training data scaled by {provenance.activation_scale} (input)"
                    + (
                        f" / {provenance.activation_scale_out} (output)"
                        if getattr(provenance, "activation_scale_out", None) is not None
                        else ""
                    )
                    + "; recorded in provenance, folded into the weights at export"
                )

    def sparsity_scale(self) -> float:
        """Current multiplier of the sparsity penalty (sparsity warm-up)."""
        return linear_warmup(self.global_step, self.sparsity_warmup_steps)

    def reduce(self, tensor: Tensor, op: str) -> Tensor:
        """Reduce ``tensor`` across DDP ranks (``op``: ``"sum"`` or ``"mean"``)."""
        return self.trainer.strategy.reduce(tensor, reduce_op=op)

    # ------------------------------------------------------------------ logging
    def _log_training(self, prefix: str, logged: Mapping[str, Tensor], learner: Any) -> None:
        self.log_dict({f"{prefix}/{name}": value for name, value in logged.items()})
        self.log(f"{prefix}/tokens_seen", learner.tokens_seen.float())

    def _log_evaluation(self, prefix: str, metrics: Mapping[str, Metric]) -> None:
        for name, metric in metrics.items():
            self.log(
                f"{prefix}/{name}", metric, on_step=False, on_epoch=True, prog_bar=name == "fvu"
            )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Start the clock of this step (for ``tok/s``)."""
        self._step_started = time.perf_counter()

    def on_validation_end(self) -> None:
        """Stop the throughput clock: validation time is not training time."""
        self._last_step_end = None

    def _log_throughput(self, rows: int) -> None:
        # tok/s (progress bar, smoothed) is end to end, step to step: it includes capturing
        # the activations, which the stream does inside next() before on_train_batch_start.
        # train/step_tokens_per_second counts the optimisation step alone.
        now = time.perf_counter()
        global_rows = rows * self.trainer.world_size
        if self._step_started is not None:
            step_rate = global_rows / max(now - self._step_started, 1e-9)
            self.log("train/step_tokens_per_second", step_rate)
        if self._last_step_end is not None:
            seconds = max(now - self._last_step_end, 1e-9)
            self.log("train/tokens_per_second", global_rows / seconds)
            # Rows and seconds are averaged separately (a ratio of means): the stream
            # captures in bursts, once per buffer refill, and a mean of per-step rates would
            # be dominated by the many fast steps between captures.
            rows_avg, seconds_avg = self._throughput  # from zeros: no start-up bias in a ratio
            self._throughput = (
                0.95 * rows_avg + 0.05 * global_rows,
                0.95 * seconds_avg + 0.05 * seconds,
            )
            self.log(
                "tok/s", self._throughput[0] / self._throughput[1], prog_bar=True, logger=False
            )
        self._last_step_end = now

    # ------------------------------------------------------------------ optimisation
    def skipped_step(self) -> Tensor:
        """What ``training_step`` returns for a step the ``on_nonfinite`` policy skips.

        Not ``None``: Lightning refuses that with more than one process, and under DDP every
        rank must run backward for the gradient all-reduce. Instead a zero loss tied to
        every trainable parameter (its gradients are exactly 0, whatever the weights hold),
        and :meth:`on_before_optimizer_step` then discards the gradients, so the optimizer
        changes nothing: Adam skips parameters without a gradient (no moment or step-count
        update). With gradient accumulation the whole accumulated step is skipped.
        """
        self._discard_gradients = True
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.stack([p.sum() for p in params]).sum() * 0.0

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Remove the decoder-gradient component that only changes row norms.

        After a skipped batch, drop every gradient instead (see :meth:`skipped_step`).
        """
        if self._discard_gradients:
            self._discard_gradients = False
            optimizer.zero_grad(set_to_none=True)
            return
        for learner in self.learners.values():
            learner.before_optimizer_step()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Step, then put decoder rows back on the unit sphere."""
        super().optimizer_step(*args, **kwargs)
        for learner in self.learners.values():
            learner.after_optimizer_step()

    def _build_optimizer(self) -> torch.optim.Optimizer:
        optimizers = []
        for name, learner in self.learners.items():
            optimizer = self.optimizer_factory(learner.dictionary.parameters())
            if name in self.learning_rates:
                for group in optimizer.param_groups:
                    group["lr"] = self.learning_rates[name]
            optimizers.append(optimizer)
        return merge_optimizers(optimizers)

    def configure_optimizers(self) -> Any:
        """The optimizer, and the schedule stepped every optimizer step."""
        optimizer = self._build_optimizer()
        if self.lr_scheduler_factory is not None:
            scheduler = self.lr_scheduler_factory(optimizer)
        else:
            decay_steps = 0
            total = self.trainer.estimated_stepping_batches
            # Lightning answers inf, or -1 (max_steps unset), for an endless loader.
            known_length = math.isfinite(total) and total > 0
            if self.decay_fraction > 0:
                if not known_length:
                    raise ConfigError(
                        "decay_fraction > 0 needs a known run length; set trainer.max_steps "
                        "or use a data loader with a length"
                    )
                decay_steps = int(self.decay_fraction * total)
            total_steps = int(total) if known_length else 0
            schedule = partial(
                warmup_then_decay,
                warmup_steps=self.warmup_steps,
                decay_steps=decay_steps,
                total_steps=total_steps,
            )
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, batch: Any, prefix: str, batch_idx: int) -> None:
        raise NotImplementedError

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Accumulate reconstruction and sparsity metrics over the validation set."""
        self._evaluate(batch, "val", batch_idx)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Same metrics as validation, logged under ``test/``."""
        self._evaluate(batch, "test", batch_idx)
