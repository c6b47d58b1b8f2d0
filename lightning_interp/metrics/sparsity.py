"""Sparsity and latent-health metrics: L0, dead-latent and dense-latent fractions."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class L0(Metric):
    """Mean number of non-zero codes per row.

    Example:
        >>> import torch
        >>> metric = L0()
        >>> float(metric(torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0]])))
        1.5
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("active", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("rows", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, codes: Tensor) -> None:
        """Add a batch of codes ``[..., d_latent]``."""
        if codes.ndim == 0:
            raise ValueError("codes must have at least one dimension ([..., d_latent])")
        codes = codes.detach()
        self.active += (codes != 0).sum()
        self.rows += codes.numel() // codes.shape[-1]

    def compute(self) -> Tensor:
        """Mean active latents per row."""
        return (self.active / self.rows.clamp_min(1)).float()


class _FiringFrequency(Metric):
    """Counts, per latent, the rows it fired on; subclasses summarise the frequencies.

    The window is every row seen since the last ``reset()``: a training loop resets it
    every N tokens to get "dead over the last N tokens".
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, d_latent: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if d_latent <= 0:
            raise ValueError(f"d_latent must be positive, got {d_latent}")
        self.d_latent = d_latent
        self.add_state("fired", torch.zeros(d_latent, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("rows", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, codes: Tensor) -> None:
        """Add a batch of codes ``[..., d_latent]``."""
        if codes.shape[-1] != self.d_latent:
            raise ValueError(
                f"expected codes with last dimension {self.d_latent}, got {codes.shape}"
            )
        codes = codes.detach().reshape(-1, self.d_latent)
        self.fired += (codes != 0).sum(0)
        self.rows += codes.shape[0]

    def frequencies(self) -> Tensor:
        """Firing frequency of each latent over the window, ``[d_latent]``."""
        return self.fired / self.rows.clamp_min(1)


class DeadLatentFraction(_FiringFrequency):
    """Share of latents that never fired in the window (every row since the last reset).

    Args:
        d_latent: Number of latents.
    """

    higher_is_better = False

    def compute(self) -> Tensor:
        """Fraction of latents with no firing in the window."""
        return (self.fired == 0).double().mean().float()


class DenseLatentFraction(_FiringFrequency):
    """Share of latents firing on more than ``threshold`` of the rows in the window.

    Such latents usually encode no single feature (a sign of too weak a sparsity
    penalty or of a degenerate solution).

    Args:
        d_latent: Number of latents.
        threshold: Firing frequency above which a latent counts as dense (default 0.1).
    """

    higher_is_better = False

    def __init__(self, d_latent: int, threshold: float = 0.1, **kwargs) -> None:
        super().__init__(d_latent, **kwargs)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.threshold = threshold

    def compute(self) -> Tensor:
        """Fraction of latents with firing frequency above the threshold."""
        return (self.frequencies() > self.threshold).double().mean().float()
