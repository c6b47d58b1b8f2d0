"""Reconstruction quality: fraction of variance unexplained (FVU) and explained variance."""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_interp.metrics.functional import _fvu_compute, _fvu_update


class FractionOfVarianceUnexplained(Metric):
    r"""Fraction of the targets' variance a reconstruction leaves unexplained.

    .. math:: \mathrm{FVU} = \frac{\sum_{n,d} (x_{nd} - \hat x_{nd})^2}
              {\sum_{n,d} (x_{nd} - \bar x_d)^2}

    pooled over every feature and every row seen, the definition SAELens and sparsify
    report; :func:`~lightning_interp.metrics.functional.fraction_of_variance_unexplained` is
    its functional twin on one batch, and both share one update and one compute.
    ``torchmetrics.ExplainedVariance`` differs: it subtracts the residual's own mean and, by
    default, averages per-feature ratios, which overweights low-variance features. Sums are
    kept in float64 so that the variance of millions of bf16 activations does not cancel
    away.

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
        squared_error, target_sum, target_sq_sum, count = _fvu_update(
            reconstruction.detach(), target.detach()
        )
        width = self.target_sum.numel() if self.target_sum.ndim else None
        if width is not None and target.shape[-1] != width:
            raise ValueError(f"expected targets of width {width}, got shape {tuple(target.shape)}")
        self.squared_error += squared_error
        self.target_sum = self.target_sum + target_sum
        self.target_sq_sum = self.target_sq_sum + target_sq_sum
        self.count += count

    def compute(self) -> Tensor:
        """FVU over everything seen since the last reset (float32; NaN before any update)."""
        return _fvu_compute(self.squared_error, self.target_sum, self.target_sq_sum, self.count)


class ReconstructionExplainedVariance(FractionOfVarianceUnexplained):
    """``1 - FVU``: the share of variance the reconstruction explains (higher is better)."""

    higher_is_better = True

    def compute(self) -> Tensor:
        """Explained variance over everything seen since the last reset."""
        return 1.0 - super().compute()
