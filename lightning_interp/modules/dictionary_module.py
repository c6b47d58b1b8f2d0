"""LightningModule that trains any registered dictionary on batches of activations."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lightning_interp.dictionaries import Dictionary, create_dictionary
from lightning_interp.dictionaries.base import DictionaryOutput, batch_fvu
from lightning_interp.errors import ConfigError, ShapeMismatchError
from lightning_interp.metrics import (
    L0,
    DeadLatentFraction,
    DenseLatentFraction,
    FractionOfVarianceUnexplained,
    MeanSquaredError,
)
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


class DictionaryModule(L.LightningModule):
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
        super().__init__()
        if isinstance(dictionary, Mapping):
            dictionary = create_dictionary(**dictionary)
        if not isinstance(dictionary, Dictionary):
            raise ConfigError(
                f"dictionary must be a Dictionary, got {type(dictionary).__name__}; build one "
                f"with lightning_interp.create_dictionary"
            )
        if not 0.0 <= decay_fraction <= 1.0:
            raise ConfigError(f"decay_fraction must be in [0, 1], got {decay_fraction}")
        if warmup_steps < 0 or sparsity_warmup_steps < 0 or dead_tokens_threshold <= 0:
            raise ConfigError(
                "warmup_steps and sparsity_warmup_steps must be >= 0 and dead_tokens_threshold > 0"
            )
        # Callables stay out of hparams: checkpoints must load with weights_only=True, which
        # refuses pickled functions. load_from_checkpoint then uses the default optimizer;
        # resuming a run (fit ckpt_path=...) restores the optimizer state itself.
        self.save_hyperparameters(ignore=["dictionary", "optimizer", "lr_scheduler"])
        # Stored as a plain config so load_from_checkpoint can rebuild the dictionary.
        self.hparams["dictionary"] = dictionary.config.to_dict()
        self.dictionary = dictionary
        self.optimizer_factory = optimizer or partial(torch.optim.Adam, lr=2e-4, fused=True)
        self.lr_scheduler_factory = lr_scheduler
        self.warmup_steps = warmup_steps
        self.decay_fraction = decay_fraction
        self.sparsity_warmup_steps = sparsity_warmup_steps
        self.dead_tokens_threshold = dead_tokens_threshold
        d_latent = dictionary.d_latent
        # Training state that checkpoints must carry, so it lives in buffers.
        self.register_buffer("tokens_since_fired", torch.zeros(d_latent, dtype=torch.long))
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer(
            "b_dec_initialized", torch.tensor(dictionary.config.b_dec_init == "zeros")
        )
        self.val_fvu = FractionOfVarianceUnexplained(num_features=dictionary.d_out)
        self.val_mse = MeanSquaredError()
        self.val_l0 = L0()
        self.val_dead = DeadLatentFraction(d_latent)
        self.val_dense = DenseLatentFraction(d_latent, threshold=dense_threshold)

    # ------------------------------------------------------------------ training
    def sparsity_scale(self) -> float:
        """Current multiplier of the sparsity penalty (sparsity warm-up)."""
        return linear_warmup(self.global_step, self.sparsity_warmup_steps)

    def dead_mask(self) -> Tensor:
        """Latents that have not fired for ``dead_tokens_threshold`` training tokens."""
        return self.tokens_since_fired >= self.dead_tokens_threshold

    @torch.no_grad()
    def _initialize_b_dec(self, sample: Tensor) -> None:
        self.dictionary.initialize_b_dec_(sample)
        # Every DDP rank saw a different first batch; agree on one centre.
        b_dec = self.trainer.strategy.reduce(
            self.dictionary.b_dec.detach().clone(), reduce_op="mean"
        )
        self.dictionary.b_dec.copy_(b_dec)
        self.b_dec_initialized.fill_(True)

    @torch.no_grad()
    def _track_firing(self, out: DictionaryOutput) -> None:
        fired = out.fired_latents().float()
        rows = torch.tensor(float(out.reconstruction.shape[0]), device=fired.device)
        fired = self.trainer.strategy.reduce(fired, reduce_op="sum") > 0
        rows = int(self.trainer.strategy.reduce(rows, reduce_op="sum"))
        self.tokens_since_fired += rows
        self.tokens_since_fired[fired] = 0
        self.tokens_seen += rows

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One optimisation step on a batch of activations."""
        inputs, targets = split_batch(batch)
        self.dictionary.check_input(inputs)
        if not bool(self.b_dec_initialized):
            self._initialize_b_dec(inputs if targets is None else targets)
        out = self.dictionary.forward_train(inputs)
        dead = self.dead_mask()
        losses = self.dictionary.loss(
            inputs, out, target=targets, sparsity_scale=self.sparsity_scale(), dead_mask=dead
        )
        self._track_firing(out)
        with torch.no_grad():
            target = inputs if targets is None else targets
            logged = {f"train/{name}": value.detach() for name, value in losses.items()}
            logged["train/fvu"] = batch_fvu(out.reconstruction.float(), target.float())
            logged["train/l0"] = out.l0_per_row().float().mean()
            logged["train/dead_fraction"] = dead.float().mean()
            logged["train/sparsity_scale"] = torch.tensor(self.sparsity_scale())
        self.log_dict(logged, prog_bar=False)
        self.log("train/tokens_seen", self.tokens_seen.float(), prog_bar=False)
        self.log("loss", losses["loss"].detach(), prog_bar=True, logger=False)
        return losses["loss"]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Remove the decoder-gradient component that only changes row norms."""
        if self.dictionary.config.normalize_decoder:
            self.dictionary.remove_parallel_decoder_grad_()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Step, then put decoder rows back on the unit sphere."""
        super().optimizer_step(*args, **kwargs)
        if self.dictionary.config.normalize_decoder:
            self.dictionary.normalize_decoder_()

    def configure_optimizers(self) -> Any:
        """The optimizer, and the schedule stepped every optimizer step."""
        optimizer = self.optimizer_factory(self.dictionary.parameters())
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
        inputs, targets = split_batch(batch)
        target = inputs if targets is None else targets
        # Evaluate the inference form (a BatchTopK dictionary uses its threshold here).
        codes = self.dictionary.encode(inputs)
        reconstruction = self.dictionary.decode(codes).float()
        target = target.float()
        self.val_fvu(reconstruction, target)
        self.val_mse(reconstruction, target)
        self.val_l0(codes)
        self.val_dead(codes)
        self.val_dense(codes)
        metrics = {
            "fvu": self.val_fvu,
            "mse": self.val_mse,
            "l0": self.val_l0,
            "dead_fraction": self.val_dead,
            "dense_fraction": self.val_dense,
        }
        for name, metric in metrics.items():
            self.log(
                f"{prefix}/{name}", metric, on_step=False, on_epoch=True, prog_bar=name == "fvu"
            )

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Accumulate reconstruction and sparsity metrics over the validation set."""
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Same metrics as validation, logged under ``test/``."""
        self._evaluate(batch, "test")
