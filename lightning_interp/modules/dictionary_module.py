"""The LightningModule that trains one registered dictionary on batches of activations.

:class:`DictionaryModule` trains one dictionary; what it shares with
:class:`~lightning_interp.modules.multi_module.MultiDictionaryModule` (optimizer, schedules,
decoder constraints, the non-finite policy, checkpoint checks, logging) lives in
:class:`~lightning_interp.modules.training_module.DictionaryTrainingModule`. Also here: how
batches and checkpoint hyper-parameters are read (:func:`split_batch`,
:func:`dictionary_hparams`, :func:`as_dictionary`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lightning_interp.dictionaries import Dictionary, create_dictionary, list_architectures
from lightning_interp.dictionaries.registry import dictionary_class_from_path
from lightning_interp.errors import ConfigError, ConfigTypeError, ShapeMismatchError
from lightning_interp.modules.guards import NonFinitePolicy, batch_parts
from lightning_interp.modules.learner import DictionaryLearner
from lightning_interp.modules.training_module import DictionaryTrainingModule


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
    """A Dictionary, or one built from :func:`dictionary_hparams` or a flat config dict.

    A ``class_path`` (as checkpoint hyper-parameters store it) is resolved through the
    dictionary registry only, never imported: a checkpoint cannot make this process import
    an arbitrary module. The config is validated (types, ranges, a bound on its size) and
    checked against the memory of the device before any weight is allocated.

    Raises:
        UnknownArchitectureError: the ``class_path`` or ``architecture`` names no registered
            dictionary (the message lists those that are).
        ConfigError: the config is malformed or too large (a ``ConfigTypeError`` for a value
            of the wrong type).
    """
    if isinstance(value, Mapping) and "class_path" in value:
        cls = dictionary_class_from_path(value["class_path"])
        init_args = value.get("init_args")
        init_args = {} if init_args is None else init_args
        if not isinstance(init_args, Mapping):
            raise ConfigTypeError(
                f"init_args of {value['class_path']} must be a mapping with a 'config' key, "
                f"got a {type(init_args).__name__}"
            )
        config = init_args.get("config", {})
        if not isinstance(config, cls.config_class):
            config = cls.config_class.from_dict(config)
        value = cls(config)
    elif isinstance(value, Mapping):
        fields = dict(value)
        if "architecture" not in fields:
            raise ConfigError(
                f"a dictionary config needs an 'architecture' (one of {list_architectures()}) "
                f"or a 'class_path', got keys {sorted(map(str, fields))}"
            )
        value = create_dictionary(fields.pop("architecture"), **fields)
    if not isinstance(value, Dictionary):
        raise ConfigError(
            f"expected a Dictionary, got {type(value).__name__}; build one with "
            f"lightning_interp.create_dictionary or a class_path in the config"
        )
    return value


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
        on_nonfinite: What a batch with NaN/Inf values (or zero rows), or a non-finite
            loss, does: ``"raise"`` (default) stops the run with a
            :class:`~lightning_interp.errors.NonFiniteError` (``ShapeMismatchError`` for an
            empty batch) naming the global step, the batch index and the input;
            ``"skip"`` skips that optimizer step, prints it, and counts it in
            ``train/skipped_batches`` (and ``skipped_batches`` in ``metrics.json``).

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
        on_nonfinite: NonFinitePolicy = "raise",
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
            on_nonfinite=on_nonfinite,
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

    def _specs(self, hparams: Mapping[str, Any]) -> dict[str, Mapping[str, Any]] | None:
        spec = hparams.get("dictionary")
        return {"main": spec} if isinstance(spec, Mapping) else None

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One optimisation step on a batch of activations.

        For a batch or loss that ``on_nonfinite="skip"`` skips, returns
        :meth:`skipped_step` (a zero loss whose gradients are discarded: no weight moves).
        """
        inputs, targets = split_batch(batch)
        if not self._usable_batch(batch_parts(inputs, targets), batch_idx):
            return self.skipped_step()
        loss, logged, out = self.learner.forward_loss(
            inputs, targets, sparsity_scale=self.sparsity_scale(), reduce=self.reduce
        )
        if not self._usable_loss({"dictionary": loss}, batch_idx):
            return self.skipped_step()
        self.learner.commit(out, self.reduce)
        logged["sparsity_scale"] = torch.tensor(self.sparsity_scale())
        self._log_training("train", logged, self.learner)
        self.log("loss", loss.detach(), prog_bar=True, logger=False)
        self._log_throughput(inputs.shape[0])
        return loss

    def _evaluate(self, batch: Any, prefix: str, batch_idx: int) -> None:
        inputs, targets = split_batch(batch)
        if self._usable_batch(batch_parts(inputs, targets), batch_idx, stage=prefix):
            self._log_evaluation(prefix, self.learner.update_metrics(inputs, targets))
