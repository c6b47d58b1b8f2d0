"""The LightningModule that trains one registered dictionary on batches of activations.

:class:`DictionaryModule` trains one dictionary; what it shares with
:class:`~lightning_interp.modules.multi_module.MultiDictionaryModule` (optimizer, schedules,
decoder constraints, the non-finite policy, checkpoint checks, sizing from the data module,
logging) lives in :class:`~lightning_interp.modules.training_module.DictionaryTrainingModule`.
Batches become (inputs, targets) in :func:`~lightning_interp.data.batches.inputs_and_targets`;
checkpoint hyper-parameters are read by :func:`as_dictionary`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lightning_interp.data.batches import inputs_and_targets, split_batch
from lightning_interp.dictionaries import Dictionary
from lightning_interp.modules.dictionary_spec import (
    DictionarySpec,
    dictionary_hparams,
    dictionary_or_spec,
)
from lightning_interp.modules.guards import NonFinitePolicy, batch_parts
from lightning_interp.modules.learner import DictionaryLearner
from lightning_interp.modules.training_module import DictionaryTrainingModule

# split_batch and dictionary_hparams are imported from here too.
__all__ = ["DictionaryModule", "as_dictionary", "dictionary_hparams", "split_batch"]


def as_dictionary(value: Dictionary | Mapping[str, Any]) -> Dictionary:
    """A Dictionary, or one built from :func:`dictionary_hparams` or a flat config dict.

    As :func:`~lightning_interp.modules.dictionary_spec.dictionary_or_spec`, but the config
    must give every width: this builds the dictionary now.

    Raises:
        UnknownArchitectureError: the ``class_path`` or ``architecture`` names no registered
            dictionary (the message lists those that are).
        ConfigError: the config is malformed, too large, or leaves ``d_in`` open.
    """
    value = dictionary_or_spec(value)
    if isinstance(value, DictionarySpec):
        return value.dictionary_class(value.config)  # refused: d_in is not set
    return value


class DictionaryModule(DictionaryTrainingModule):
    """Trains a :class:`~lightning_interp.dictionaries.Dictionary` with Lightning.

    Handles the optimizer and schedules, the unit-norm decoder constraint, ``b_dec``
    initialisation from the first batch, dead-latent tracking (for AuxK and for logging)
    and metrics. It knows nothing about file formats or the Hub.

    Trained on a data module (an :class:`~lightning_interp.data.source.ActivationSource`),
    the dictionary reads the site its ``provenance.site`` names (the data's only site, or
    for two sites the pair ``site -> site_out`` of a transcoder), and takes its widths and
    provenance from the data at setup: its config may leave ``d_in`` (and a transcoder's
    ``d_out``) out, and the dictionary is then built in :meth:`configure_model`.

    Args:
        dictionary: The dictionary to train, or its config: a config dataclass, a dict
            with ``architecture``, or ``class_path`` + ``init_args`` as checkpoints store
            it; ``d_in`` may be left out (see above).
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
        dictionary: Dictionary | DictionarySpec,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        warmup_steps: int = 0,
        decay_fraction: float = 0.0,
        sparsity_warmup_steps: int = 0,
        dead_tokens_threshold: int = 10_000_000,
        dense_threshold: float = 0.1,
        on_nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        dictionary = dictionary_or_spec(dictionary)
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
        self._store_specs()

    def _store_specs(self) -> None:
        # A plain config, so load_from_checkpoint can rebuild the dictionary (after setup:
        # with the widths and provenance the data gave).
        self.hparams["dictionary"] = dictionary_hparams(self._current()["main"])

    def _label(self, name: str) -> str:
        return "the dictionary"

    @property
    def learner(self) -> DictionaryLearner:
        """The dictionary's training state."""
        return self._learner("main")

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
        inputs, targets = self._read(batch)
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
        # A closed-form learner (semi-NMF) has already stepped: nothing to back-propagate.
        return loss if loss.requires_grad else self.skipped_step()

    def _read(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        provenance = self.dictionary.config.provenance
        return inputs_and_targets(batch, provenance.site, provenance.site_out, "the dictionary")

    def _evaluate(self, batch: Any, prefix: str, batch_idx: int) -> None:
        inputs, targets = self._read(batch)
        if self._usable_batch(batch_parts(inputs, targets), batch_idx, stage=prefix):
            self._log_evaluation(prefix, self.learner.update_metrics(inputs, targets))
