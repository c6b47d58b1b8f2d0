"""LightningModules that train registered dictionaries on batches of activations.

:class:`DictionaryTrainingModule` holds what every such loop shares (one
:class:`~lightning_interp.modules.learner.DictionaryLearner` per dictionary, the optimizer
and schedules, decoder constraints, throughput and metric logging);
:class:`DictionaryModule` trains one dictionary, and
:class:`~lightning_interp.modules.multi_module.MultiDictionaryModule` several from the same
batches.
"""

from __future__ import annotations

import importlib
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

from lightning_interp.dictionaries import Dictionary, create_dictionary
from lightning_interp.errors import ConfigError, ShapeMismatchError
from lightning_interp.modules.learner import DictionaryLearner
from lightning_interp.modules.schedules import linear_warmup, warmup_then_decay


def split_batch(batch: Any) -> tuple[Tensor, Tensor | None]:
    """Return ``(inputs, targets)`` from a batch of activations.

    Accepted: a tensor ``[..., d_in]``; a tuple/list ``(inputs,)`` or ``(inputs, targets)``
    (a transcoder's two sites); a mapping with ``"activations"`` or ``"inputs"`` and an
    optional ``"targets"``. Leading dimensions are flattened to rows.
    """
    if isinstance(batch, Tensor):
        inputs, targets = batch, None
    elif isinstance(batch, Mapping):
        key = "activations" if "activations" in batch else "inputs"
        if key not in batch:
            raise ConfigError(
                f"a dict batch needs an 'activations' or 'inputs' key, got keys {sorted(batch)}"
            )
        inputs, targets = batch[key], batch.get("targets")
    elif isinstance(batch, Sequence) and 1 <= len(batch) <= 2:
        inputs, targets = batch[0], batch[1] if len(batch) == 2 else None
    else:
        raise ConfigError(
            f"cannot read activations from a batch of type {type(batch).__name__}; yield "
            f"tensors, (inputs, targets) pairs or dicts with an 'activations' key"
        )
    inputs = inputs.reshape(-1, inputs.shape[-1])
    if targets is not None:
        targets = targets.reshape(-1, targets.shape[-1])
        if targets.shape[0] != inputs.shape[0]:
            raise ShapeMismatchError(
                f"inputs have {inputs.shape[0]} rows but targets have {targets.shape[0]}"
            )
    return inputs, targets


def dictionary_hparams(dictionary: Dictionary) -> dict[str, Any]:
    """A dictionary as a checkpoint's hyperparameters store it: ``class_path`` + config.

    The same shape a LightningCLI config gives, so ``lightning-interp validate
    --ckpt_path ...`` (which re-parses checkpoint hyperparameters as init arguments) and
    ``load_from_checkpoint`` both rebuild it.
    """
    cls = type(dictionary)
    config = {k: v for k, v in dictionary.config.to_dict().items() if k != "architecture"}
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": {"config": config}}


def as_dictionary(value: Dictionary | Mapping[str, Any]) -> Dictionary:
    """A Dictionary, or one built from :func:`dictionary_hparams` or a flat config dict."""
    if isinstance(value, Mapping) and "class_path" in value:
        module_name, _, class_name = value["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module_name), class_name, None)
        if not (isinstance(cls, type) and issubclass(cls, Dictionary)):
            raise ConfigError(f"{value['class_path']!r} is not a Dictionary class")
        config = dict(value.get("init_args", {}).get("config", {}))
        value = cls(cls.config_class.from_dict(config))
    elif isinstance(value, Mapping):
        value = create_dictionary(**value)
    if not isinstance(value, Dictionary):
        raise ConfigError(
            f"expected a Dictionary, got {type(value).__name__}; build one with "
            f"lightning_interp.create_dictionary or a class_path in the config"
        )
    return value


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
    subclasses implement ``training_step`` and ``_evaluate``. This class builds the
    optimizer and schedule, keeps decoders on the unit sphere, and logs throughput
    (``tok/s`` in the progress bar).
    """

    def __init__(
        self,
        dictionaries: Mapping[str, Dictionary],
        *,
        optimizer: OptimizerCallable | None,
        lr_scheduler: LRSchedulerCallable | None,
        warmup_steps: int,
        decay_fraction: float,
        sparsity_warmup_steps: int,
        dead_tokens_threshold: int,
        dense_threshold: float,
        learning_rates: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        if dead_tokens_threshold <= 0:
            raise ConfigError(f"dead_tokens_threshold must be > 0, got {dead_tokens_threshold}")
        learners = {
            name: DictionaryLearner(
                dictionary,
                dead_tokens_threshold=dead_tokens_threshold,
                dense_threshold=dense_threshold,
            )
            for name, dictionary in dictionaries.items()
        }
        if not 0.0 <= decay_fraction <= 1.0:
            raise ConfigError(f"decay_fraction must be in [0, 1], got {decay_fraction}")
        if warmup_steps < 0 or sparsity_warmup_steps < 0:
            raise ConfigError("warmup_steps and sparsity_warmup_steps must be >= 0")
        unknown = sorted(set(learning_rates or {}) - set(learners))
        if unknown:
            raise ConfigError(
                f"learning_rates names {unknown}, which are not dictionaries of this run "
                f"({sorted(learners)})"
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

    def named_learners(self) -> Iterator[tuple[str | None, DictionaryLearner]]:
        """``(name, learner)`` pairs; the name is ``None`` for a single-dictionary module.

        Callbacks use the name for log keys (``val/<name>/...``) and output folders.
        """
        yield from self.learners.items()

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
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Remove the decoder-gradient component that only changes row norms."""
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
    def _evaluate(self, batch: Any, prefix: str) -> None:
        raise NotImplementedError

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Accumulate reconstruction and sparsity metrics over the validation set."""
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Same metrics as validation, logged under ``test/``."""
        self._evaluate(batch, "test")


class DictionaryModule(DictionaryTrainingModule):
    """Trains a :class:`~lightning_interp.dictionaries.Dictionary` with Lightning.

    Handles the optimizer and schedules, the unit-norm decoder constraint, ``b_dec``
    initialisation from the first batch, dead-latent tracking (for AuxK and for logging)
    and metrics. It knows nothing about file formats or the Hub.

    Args:
        dictionary: The dictionary to train (or its config as a dict with
            ``architecture``, as stored in checkpoints).
        optimizer: Callable building the optimizer from the parameters (LightningCLI
            ``OptimizerCallable``). Default: fused Adam, lr 2e-4, ``betas=(0.9, 0.999)``.
        lr_scheduler: Callable building a scheduler stepped every optimizer step. When
            given it replaces the built-in warm-up/decay schedule.
        warmup_steps: Linear learning-rate warm-up steps (built-in schedule).
        decay_fraction: Share of the run, at its end, over which the learning rate decays
            linearly to zero (built-in schedule; needs a known number of steps).
        sparsity_warmup_steps: Steps over which the sparsity penalty ramps from 0 to its
            coefficient (L1, L0; TopK has none).
        dead_tokens_threshold: A latent that has not fired for this many training tokens
            counts as dead (AuxK revives those; ``train/dead_fraction`` reports them).
        dense_threshold: Firing frequency above which a latent counts as dense in
            validation.

    Example:
        >>> import lightning as L, torch
        >>> from lightning_interp import create_dictionary
        >>> module = DictionaryModule(create_dictionary("topk", d_in=8, d_latent=32, k=2))
        >>> loader = torch.utils.data.DataLoader(torch.randn(256, 8), batch_size=64)
        >>> L.Trainer(max_steps=2, logger=False, enable_checkpointing=False,
        ...           enable_progress_bar=False, enable_model_summary=False).fit(module, loader)
    """

    def __init__(
        self,
        dictionary: Dictionary,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        warmup_steps: int = 0,
        decay_fraction: float = 0.0,
        sparsity_warmup_steps: int = 0,
        dead_tokens_threshold: int = 10_000_000,
        dense_threshold: float = 0.1,
    ) -> None:
        dictionary = as_dictionary(dictionary)
        super().__init__(
            {"main": dictionary},
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            warmup_steps=warmup_steps,
            decay_fraction=decay_fraction,
            sparsity_warmup_steps=sparsity_warmup_steps,
            dead_tokens_threshold=dead_tokens_threshold,
            dense_threshold=dense_threshold,
        )
        # Callables stay out of hparams: checkpoints must load with weights_only=True, which
        # refuses pickled functions. load_from_checkpoint then uses the default optimizer;
        # resuming a run (fit ckpt_path=...) restores the optimizer state itself.
        self.save_hyperparameters(ignore=["dictionary", "optimizer", "lr_scheduler"])
        # Stored as a plain config so load_from_checkpoint can rebuild the dictionary.
        self.hparams["dictionary"] = dictionary_hparams(dictionary)

    @property
    def learner(self) -> DictionaryLearner:
        """The dictionary's training state."""
        return self.learners["main"]

    @property
    def dictionary(self) -> Dictionary:
        """The dictionary being trained."""
        return self.learner.dictionary

    @property
    def tokens_seen(self) -> Tensor:
        """Training rows seen, over all ranks."""
        return self.learner.tokens_seen

    @property
    def tokens_since_fired(self) -> Tensor:
        """Training rows since each latent last fired."""
        return self.learner.tokens_since_fired

    @property
    def b_dec_initialized(self) -> Tensor:
        """Whether ``b_dec`` was set from the first batch."""
        return self.learner.b_dec_initialized

    def named_learners(self) -> Iterator[tuple[str | None, DictionaryLearner]]:
        """The one learner, unnamed (logs under ``train/`` and ``val/``)."""
        yield None, self.learner

    def dead_mask(self) -> Tensor:
        """Latents that have not fired for ``dead_tokens_threshold`` training tokens."""
        return self.learner.dead_mask()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One optimisation step on a batch of activations."""
        inputs, targets = split_batch(batch)
        loss, logged = self.learner.training_loss(
            inputs, targets, sparsity_scale=self.sparsity_scale(), reduce=self.reduce
        )
        logged["sparsity_scale"] = torch.tensor(self.sparsity_scale())
        self._log_training("train", logged, self.learner)
        self.log("loss", loss.detach(), prog_bar=True, logger=False)
        self._log_throughput(inputs.shape[0])
        return loss

    def _evaluate(self, batch: Any, prefix: str) -> None:
        inputs, targets = split_batch(batch)
        self._log_evaluation(prefix, self.learner.update_metrics(inputs, targets))
