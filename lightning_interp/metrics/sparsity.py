"""Sparsity and latent-health metrics: L0, dead-latent and dense-latent fractions.

Two dead fractions exist and mean different things. The field's number (Gao et al. 2024,
"Scaling and evaluating sparse autoencoders"; EleutherAI sparsify's ``dead_pct``;
dictionary_learning's ``dead_features``) is a *training window in tokens*: a latent is dead
if it has not fired in the last N training tokens (N = 10M in all three), tracked with a
per-latent "tokens since fired" counter; :func:`dead_fraction_in_window` computes it.
:class:`DeadLatentFraction` counts latents that never fired on an evaluation set, a window
of only the validation rows, which reads higher on a short set: report it under its own
name (``dead_fraction_val``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_interp.errors import ConfigError, ShapeMismatchError


def dead_fraction_in_window(
    tokens_since_fired: Tensor, tokens_seen: int, window: int
) -> tuple[float | None, int]:
    """Share of latents that did not fire in the last ``window`` training tokens.

    The training-window count of Gao et al. (2024), sparsify (``num_tokens_since_fired >
    dead_feature_threshold``) and dictionary_learning (``num_tokens_since_fired >=
    dead_feature_threshold``); here a latent silent for ``window`` tokens or more is dead.
    A run shorter than ``window`` can only state "never fired during training": the window
    is then the ``tokens_seen`` rows, and the second value says so.

    Args:
        tokens_since_fired: Training rows since each latent last fired, ``[d_latent]``.
        tokens_seen: Training rows seen so far.
        window: The window in tokens (a module's ``dead_tokens_threshold``).

    Returns:
        ``(fraction, window_tokens)``; ``(None, 0)`` before any training row.

    Example:
        >>> since = torch.tensor([0, 5, 100, 100])
        >>> dead_fraction_in_window(since, tokens_seen=100, window=50)
        (0.5, 50)
        >>> dead_fraction_in_window(since, tokens_seen=100, window=1_000)  # short run
        (0.5, 100)
    """
    if window <= 0:
        raise ConfigError(f"window must be a positive number of tokens, got {window}")
    covered = min(int(window), int(tokens_seen))
    if covered <= 0:
        return None, 0
    dead = (tokens_since_fired >= covered).double().mean()
    return float(dead), covered


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
            raise ShapeMismatchError("codes must have at least one dimension ([..., d_latent])")
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
            raise ConfigError(f"d_latent must be positive, got {d_latent}")
        self.d_latent = d_latent
        self.add_state("fired", torch.zeros(d_latent, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("rows", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, codes: Tensor) -> None:
        """Add a batch of codes ``[..., d_latent]``."""
        if codes.shape[-1] != self.d_latent:
            raise ShapeMismatchError(
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

    On a validation set this is ``dead_fraction_val``, not the field's dead fraction (see
    the module docstring and :func:`dead_fraction_in_window`).

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
            raise ConfigError(f"threshold must be in [0, 1], got {threshold}")
        self.threshold = threshold

    def compute(self) -> Tensor:
        """Fraction of latents with firing frequency above the threshold."""
        return (self.frequencies() > self.threshold).double().mean().float()
