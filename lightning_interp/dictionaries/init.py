"""Data-dependent initialisation helpers."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def geometric_median(points: Tensor, *, max_iter: int = 100, tol: float = 1e-6) -> Tensor:
    """The geometric median of ``points`` (``[N, d]``) by Weiszfeld's algorithm.

    The point minimising the sum of Euclidean distances to the sample: a centre for
    ``b_dec`` that, unlike the mean, is not dragged by the few huge-norm activations
    (e.g. attention sinks) that residual streams carry (Bricken et al. 2023).

    Args:
        points: Sample, ``[N, d]``.
        max_iter: Iteration cap.
        tol: Stop when the estimate moves less than ``tol`` times its norm.

    Returns:
        The median, ``[d]``, in float32.
    """
    points = points.float()
    median = points.mean(0)
    for _ in range(max_iter):
        distances = (points - median).norm(dim=1).clamp_min(1e-8)
        weights = 1.0 / distances
        updated = (weights[:, None] * points).sum(0) / weights.sum()
        moved = (updated - median).norm()
        median = updated
        if moved <= tol * median.norm().clamp_min(1e-8):
            break
    return median
