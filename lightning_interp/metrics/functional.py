r"""Functional twins of the metric classes: the one definition each class accumulates.

As in torchmetrics (``torchmetrics/functional/regression/explained_variance.py`` and its
``ExplainedVariance`` class), each metric is split into an ``_update`` that reduces a batch
to sufficient statistics and a ``_compute`` that turns them into the value. The functional
form runs both on one batch (the training step logs it); the ``Metric`` class sums the
statistics across batches and DDP ranks and calls the same ``_compute``, so the two cannot
drift apart.

This module needs only torch: it sits in ``metrics/``, which the leaf packages do not
import, and nothing in ``dictionaries/`` needs it (training code in ``modules/`` does).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _fvu_update(reconstruction: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """Sufficient statistics of a batch for FVU, in float64.

    Leading dimensions are flattened (``[..., d]``). Sums are taken in float64 so that the
    variance of millions of bf16 activations does not cancel away.

    Args:
        reconstruction: The reconstruction, same shape as ``target``.
        target: The activations reconstructed, with at least one dimension.

    Returns:
        ``(squared_error, target_sum, target_sq_sum, count)``: the summed squared error (a
        scalar), the per-feature sums of the targets and of their squares (``[d]``), and
        the number of rows.

    Raises:
        ValueError: the shapes differ, or ``target`` is a scalar.
    """
    if reconstruction.shape != target.shape or target.ndim == 0:
        raise ValueError(
            f"reconstruction {tuple(reconstruction.shape)} and target "
            f"{tuple(target.shape)} must have the same shape, with at least one dimension"
        )
    width = target.shape[-1]
    target = target.reshape(-1, width)
    reconstruction = reconstruction.reshape(-1, width)
    squared_error = target.new_zeros((), dtype=torch.float64)
    target_sum = target.new_zeros(width, dtype=torch.float64)
    target_sq_sum = target.new_zeros(width, dtype=torch.float64)
    for rows in _row_blocks(target):
        # Every element is converted and squared in float64 as before; only the order of
        # the float64 additions changes (block by block), which moves the sums by a few
        # float64 ulps. copy=True: the in-place square must not touch a float64 input.
        block = target[rows].to(torch.float64, copy=True)
        error = block - reconstruction[rows]  # promoted to float64 element by element
        squared_error += error.square_().sum()
        target_sum += block.sum(0)
        target_sq_sum += block.square_().sum(0)
    return squared_error, target_sum, target_sq_sum, target.shape[0]


# Elements per float64 block on CPU: 256 KiB, which stays in a core's L2 cache. Converting a
# whole [1024, 576] batch at once streams five 4.7 MB float64 temporaries through memory and
# was ~7x slower per dictionary; on GPUs one kernel per operation is cheaper than many.
_BLOCK_ELEMENTS = 1 << 15


def _row_blocks(rows: Tensor) -> list[slice]:
    """Row slices of ``rows`` (``[n, d]``) for :func:`_fvu_update`: cache-sized on CPU, else one."""
    n = rows.shape[0]
    step = max(1, _BLOCK_ELEMENTS // max(1, rows.shape[1])) if rows.device.type == "cpu" else n
    return [slice(start, start + step) for start in range(0, n, max(1, step))]


def _fvu_compute(
    squared_error: Tensor, target_sum: Tensor, target_sq_sum: Tensor, count: Tensor | int
) -> Tensor:
    """FVU from the statistics :func:`_fvu_update` returns (summed over batches or ranks).

    Returns:
        A float32 scalar: NaN when ``count`` is 0.
    """
    total_variance = (target_sq_sum - target_sum.pow(2) / count).sum()
    return (squared_error / total_variance.clamp_min(1e-30)).float()


def fraction_of_variance_unexplained(reconstruction: Tensor, target: Tensor) -> Tensor:
    r"""Fraction of the targets' variance a reconstruction leaves unexplained, on one batch.

    .. math:: \mathrm{FVU} = \frac{\sum_{n,d} (x_{nd} - \hat x_{nd})^2}
              {\sum_{n,d} (x_{nd} - \bar x_d)^2}

    pooled over every feature and row (the definition SAELens and sparsify report). The
    class :class:`~lightning_interp.metrics.FractionOfVarianceUnexplained` computes the
    same over many batches.

    Args:
        reconstruction: The reconstruction ``[..., d]``.
        target: The activations ``[..., d]`` it reconstructs.

    Returns:
        A float32 scalar on the inputs' device.

    Raises:
        ValueError: the shapes differ, or ``target`` is a scalar.

    Example:
        >>> import torch
        >>> x = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
        >>> float(fraction_of_variance_unexplained(x.mean(0).expand_as(x), x))
        1.0
    """
    return _fvu_compute(*_fvu_update(reconstruction, target))
