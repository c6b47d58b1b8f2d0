"""One dictionary's training state and step logic, shared by every training loop.

:class:`DictionaryLearner` owns what a run must checkpoint besides the weights (the
dead-latent counter, tokens seen, whether ``b_dec`` was initialised) and the validation
metrics, and knows how to turn a batch into a loss. The LightningModules around it only
decide how many learners there are, which part of a batch each sees, and how they log.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_interp.dictionaries import Dictionary
from lightning_interp.dictionaries.base import DictionaryOutput
from lightning_interp.metrics import (
    L0,
    DeadLatentFraction,
    DenseLatentFraction,
    FractionOfVarianceUnexplained,
    MeanSquaredError,
)
from lightning_interp.metrics.functional import fraction_of_variance_unexplained as batch_fvu
from lightning_interp.metrics.sparsity import dead_fraction_in_window

# reduce(tensor, op) with op "sum" or "mean" across DDP ranks (identity on one process).
Reduce = Callable[[Tensor, str], Tensor]


def no_reduce(tensor: Tensor, op: str) -> Tensor:
    """The :data:`Reduce` of a single process."""
    return tensor


class DictionaryLearner(nn.Module):
    """A dictionary plus the training state and metrics that go with it.

    Args:
        dictionary: The dictionary to train.
        dead_tokens_threshold: A latent that has not fired for this many training tokens
            counts as dead.
        dense_threshold: Firing frequency above which a latent counts as dense in
            validation.
    """

    def __init__(
        self, dictionary: Dictionary, *, dead_tokens_threshold: int, dense_threshold: float
    ) -> None:
        super().__init__()
        self.dictionary = dictionary
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

    def dead_mask(self) -> Tensor:
        """Latents that have not fired for ``dead_tokens_threshold`` training tokens."""
        return self.tokens_since_fired >= self.dead_tokens_threshold

    @torch.no_grad()
    def _initialize_b_dec(self, sample: Tensor, reduce: Reduce) -> None:
        self.dictionary.initialize_b_dec_(sample)
        # Every DDP rank saw a different first batch; agree on one centre.
        self.dictionary.b_dec.copy_(reduce(self.dictionary.b_dec.detach().clone(), "mean"))
        self.b_dec_initialized.fill_(True)

    @torch.no_grad()
    def _track_firing(self, out: DictionaryOutput, reduce: Reduce) -> None:
        fired = out.fired_latents().float()
        rows = torch.tensor(float(out.reconstruction.shape[0]), device=fired.device)
        fired = reduce(fired, "sum") > 0
        rows = int(reduce(rows, "sum"))
        self.tokens_since_fired += rows
        self.tokens_since_fired[fired] = 0
        self.tokens_seen += rows

    def forward_loss(
        self,
        inputs: Tensor,
        targets: Tensor | None,
        *,
        sparsity_scale: float = 1.0,
        reduce: Reduce = no_reduce,
    ) -> tuple[Tensor, dict[str, Tensor], DictionaryOutput]:
        """The loss of one batch, the values worth logging (detached), and the forward pass.

        Initialises ``b_dec`` on the first batch but does not count the batch in the
        dead-latent counter: call :meth:`commit` once the step is known to be usable (a
        skipped non-finite step must not reset or advance the counters).

        Args:
            inputs: Activation rows ``[N, d_in]``.
            targets: Rows to reconstruct ``[N, d_out]`` (transcoders), or ``None``.
            sparsity_scale: Multiplier of the sparsity penalty (warm-up).
            reduce: Cross-rank reduction, so every rank agrees on ``b_dec``.
        """
        self.dictionary.check_input(inputs)
        if not bool(self.b_dec_initialized):
            self._initialize_b_dec(inputs if targets is None else targets, reduce)
        if self.dictionary.fits_in_closed_form:
            # Semi-NMF updates its own weights from the batch: the loss has no gradient,
            # and the loops skip backward and the optimizer for it.
            out = self.dictionary.fit_step(inputs, reduce=reduce)
        else:
            out = self.dictionary.forward_train(inputs)
        dead = self.dead_mask()
        losses = self.dictionary.loss(
            inputs, out, target=targets, sparsity_scale=sparsity_scale, dead_mask=dead
        )
        with torch.no_grad():
            target = inputs if targets is None else targets
            logged = {name: value.detach() for name, value in losses.items()}
            logged["fvu"] = batch_fvu(out.reconstruction.float(), target.float())
            logged["l0"] = out.l0_per_row().float().mean()
            logged["dead_fraction"] = dead.float().mean()
        return losses["loss"], logged, out

    def commit(self, out: DictionaryOutput, reduce: Reduce = no_reduce) -> None:
        """Count a used batch: tokens seen, and which latents fired (agreed across ranks)."""
        self._track_firing(out, reduce)

    def training_loss(
        self,
        inputs: Tensor,
        targets: Tensor | None,
        *,
        sparsity_scale: float = 1.0,
        reduce: Reduce = no_reduce,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """:meth:`forward_loss` then :meth:`commit`: the loss and the logged values.

        Args:
            inputs: Activation rows ``[N, d_in]``.
            targets: Rows to reconstruct ``[N, d_out]`` (transcoders), or ``None``.
            sparsity_scale: Multiplier of the sparsity penalty (warm-up).
            reduce: Cross-rank reduction, so every rank agrees on ``b_dec`` and on which
                latents fired.
        """
        loss, logged, out = self.forward_loss(
            inputs, targets, sparsity_scale=sparsity_scale, reduce=reduce
        )
        self.commit(out, reduce)
        return loss, logged

    def training_dead_fraction(self) -> tuple[float | None, int]:
        """The field's dead fraction: latents silent for ``dead_tokens_threshold`` tokens.

        See :func:`~lightning_interp.metrics.sparsity.dead_fraction_in_window` (Gao et al.
        2024; sparsify; dictionary_learning).

        Returns:
            ``(fraction, window_tokens)``; the window is shorter than the threshold when
            fewer tokens were trained, and ``(None, 0)`` before any.
        """
        return dead_fraction_in_window(
            self.tokens_since_fired, int(self.tokens_seen), self.dead_tokens_threshold
        )

    def before_optimizer_step(self) -> None:
        """Remove the decoder-gradient component that only changes row norms."""
        if self.dictionary.config.normalize_decoder:
            self.dictionary.remove_parallel_decoder_grad_()

    def after_optimizer_step(self) -> None:
        """Put decoder rows back on the unit sphere."""
        if self.dictionary.config.normalize_decoder:
            self.dictionary.normalize_decoder_()

    def metrics(self) -> dict[str, Metric]:
        """The evaluation metrics by name (what :meth:`update_metrics` updates)."""
        return {
            "fvu": self.val_fvu,
            "mse": self.val_mse,
            "l0": self.val_l0,
            "dead_fraction": self.val_dead,
            "dense_fraction": self.val_dense,
        }

    def reset_metrics(self) -> None:
        """Reset every evaluation metric."""
        for metric in self.metrics().values():
            metric.reset()

    @torch.no_grad()
    def update_metrics(self, inputs: Tensor, targets: Tensor | None) -> dict[str, Metric]:
        """Update the evaluation metrics with a batch; returns them by name for logging.

        Uses the inference form (a BatchTopK dictionary encodes with its threshold), and
        the full reconstruction, skip connection included.
        """
        target = (inputs if targets is None else targets).float()
        codes = self.dictionary.encode(inputs)
        reconstruction = self.dictionary.with_skip(inputs, self.dictionary.decode(codes)).float()
        metrics = self.metrics()
        metrics["fvu"](reconstruction, target)
        metrics["mse"](reconstruction, target)
        for name in ("l0", "dead_fraction", "dense_fraction"):
            metrics[name](codes)
        return metrics
