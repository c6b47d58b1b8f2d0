"""Reconstruction quality: fraction of variance unexplained (FVU) and explained variance."""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor
from torchmetrics import Metric


class FractionOfVarianceUnexplained(Metric):
    r"""Fraction of the targets' variance a reconstruction leaves unexplained.

    .. math:: \mathrm{FVU} = \frac{\sum_{n,d} (x_{nd} - \hat x_{nd})^2}
              {\sum_{n,d} (x_{nd} - \bar x_d)^2}

    pooled over every feature and every row seen, the definition SAELens and sparsify
    report. ``torchmetrics.ExplainedVariance`` differs: it subtracts the residual's own
    mean and, by default, averages per-feature ratios, which overweights low-variance
    features. Sums are kept in float64 so that the variance of millions of bf16
    activations does not cancel away.

    Args:
        num_features: Width of the targets. Give it when known: the per-feature sums are
            then allocated up front, which keeps every DDP rank's state the same shape even
            on a rank that sees no batch. Without it they are sized on the first update.

    Example:
        >>> import torch
        >>> metric = FractionOfVarianceUnexplained()
        >>> x = torch.randn(100, 8)
        >>> float(metric(x, x))
        0.0
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, num_features: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_features = num_features
        # Unknown width: 0-d zeros, which broadcast to [d] on the first (out-of-place) add.
        shape = (num_features,) if num_features else ()
        zeros = partial(torch.zeros, shape, dtype=torch.float64)
        self.add_state("squared_error", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("target_sum", zeros(), dist_reduce_fx="sum")
        self.add_state("target_sq_sum", zeros(), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, reconstruction: Tensor, target: Tensor) -> None:
        """Add a batch; leading dimensions are flattened (``[..., d]``)."""
        if reconstruction.shape != target.shape or target.ndim == 0:
            raise ValueError(
                f"reconstruction {tuple(reconstruction.shape)} and target "
                f"{tuple(target.shape)} must have the same shape, with at least one dimension"
            )
        width = self.target_sum.numel() if self.target_sum.ndim else None
        if width is not None and target.shape[-1] != width:
            raise ValueError(f"expected targets of width {width}, got shape {tuple(target.shape)}")
        target = target.detach().reshape(-1, target.shape[-1]).double()
        reconstruction = reconstruction.detach().reshape(-1, target.shape[-1]).double()
        self.squared_error += (target - reconstruction).pow(2).sum()
        self.target_sum = self.target_sum + target.sum(0)
        self.target_sq_sum = self.target_sq_sum + target.pow(2).sum(0)
        self.count += target.shape[0]

    def compute(self) -> Tensor:
        """FVU over everything seen since the last reset (float32; NaN before any update)."""
        total_variance = (self.target_sq_sum - self.target_sum.pow(2) / self.count).sum()
        return (self.squared_error / total_variance.clamp_min(1e-30)).float()


class ReconstructionExplainedVariance(FractionOfVarianceUnexplained):
    """``1 - FVU``: the share of variance the reconstruction explains (higher is better)."""

    higher_is_better = True

    def compute(self) -> Tensor:
        """Explained variance over everything seen since the last reset."""
        return 1.0 - super().compute()
