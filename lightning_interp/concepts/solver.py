"""A sparse final layer: elastic-net multinomial logistic regression along a path.

Label-free CBM fits its final layer with GLM-SAGA (Wong et al., 2021): proximal steps on
the elastic-net objective along a decreasing regularisation path, stopping at a wanted
sparsity. This is that idea in plain torch, full batch, with accelerated (FISTA) proximal
gradient steps; the features (concept activations) are few, so a full batch fits in memory.

    min_{W,b}  CE(x W^T + b, y) + lam * (alpha * |W|_1 + (1 - alpha) / 2 * |W|_2^2)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_interp.errors import ConfigError, ShapeMismatchError


@dataclass
class SparseFit:
    """Result of :func:`fit_sparse_linear`.

    Attributes:
        weight: ``[classes, features]``, exactly zero where pruned.
        bias: ``[classes]``.
        lam: Regularisation strength of the chosen point of the path.
        density: Share of non-zero weights.
        path: ``(lam, density, train accuracy)`` at every visited point.
    """

    weight: Tensor
    bias: Tensor
    lam: float
    density: float
    path: list[tuple[float, float, float]] = field(default_factory=list)


def soft_threshold(w: Tensor, threshold: float) -> Tensor:
    """The proximal map of ``threshold * |w|_1``."""
    return torch.sign(w) * (w.abs() - threshold).clamp_min(0.0)


def zero_gradient(x: Tensor, y: Tensor, num_classes: int, bias: Tensor) -> Tensor:
    """Gradient of the mean cross-entropy in ``W`` at ``W = 0`` with ``bias``, in float64.

    It is computed in float64 so that the KKT test of the all-zero solution does not hang
    on the rounding of one CPU's float32 kernels.
    """
    probs = torch.softmax(bias.double(), dim=-1)[None, :]
    residual = probs - torch.nn.functional.one_hot(y, num_classes).double()
    return residual.T @ x.double() / len(y)


def prior_bias(y: Tensor, num_classes: int) -> Tensor:
    """Log class frequencies: the optimal bias when every weight is zero."""
    prior = torch.bincount(y, minlength=num_classes).double().clamp_min(1) / len(y)
    return prior.log()


def lambda_max(x: Tensor, y: Tensor, num_classes: int, alpha: float) -> float:
    """Smallest ``lam`` for which ``W = 0`` is optimal (bias at the class log-priors).

    By the KKT conditions of the elastic net, ``W = 0`` is a minimiser iff
    ``lam * alpha >= max |grad|`` where ``grad`` is the cross-entropy gradient at ``W = 0``
    (the L2 part has zero gradient there).
    """
    bias = prior_bias(y, num_classes).to(x.device)
    grad = zero_gradient(x, y, num_classes, bias)
    return float(grad.abs().max()) / max(alpha, 1e-6)


def _prox_gradient(
    x: Tensor,
    y: Tensor,
    weight: Tensor,
    bias: Tensor,
    lam: float,
    alpha: float,
    step: float,
    max_iter: int,
    tol: float,
) -> tuple[Tensor, Tensor]:
    """FISTA on the elastic-net objective from a warm start, with adaptive restart.

    The momentum is reset whenever it points uphill (O'Donoghue & Candès, 2015, gradient
    restart), which keeps FISTA monotone-ish and fast on the flat valleys of small ``lam``.
    """
    w_prev, b_prev = weight.clone(), bias.clone()
    onehot = torch.nn.functional.one_hot(y, weight.shape[0]).to(x.dtype)
    t = 1.0
    for _ in range(max_iter):
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        momentum = (t - 1) / t_next
        w_look = weight + momentum * (weight - w_prev)
        b_look = bias + momentum * (bias - b_prev)
        probs = torch.softmax(torch.addmm(b_look, x, w_look.T), dim=-1) - onehot
        grad_w = probs.T @ x / len(y) + lam * (1 - alpha) * w_look
        grad_b = probs.mean(0)
        w_prev, b_prev = weight, bias
        weight = soft_threshold(w_look - step * grad_w, step * lam * alpha)
        bias = b_look - step * grad_b
        t = t_next
        uphill = ((w_look - weight) * (weight - w_prev)).sum() + (
            (b_look - bias) * (bias - b_prev)
        ).sum()
        if uphill > 0:
            t = 1.0
        change = (weight - w_prev).norm() / weight.norm().clamp_min(1e-12)
        if change < tol:
            break
    return weight, bias


def elastic_net_objective(
    x: Tensor, y: Tensor, weight: Tensor, bias: Tensor, lam: float, alpha: float
) -> float:
    """``CE(x W^T + b, y) + lam * (alpha |W|_1 + (1 - alpha) / 2 |W|_2^2)`` in float64.

    The mean cross-entropy makes ``lam`` the ``alpha`` of scikit-learn's ``SGDClassifier``
    and ``1 / (n C)`` of its ``LogisticRegression``.
    """
    w, b = weight.double(), bias.double()
    ce = torch.nn.functional.cross_entropy(x.double() @ w.T + b, y)
    penalty = alpha * w.abs().sum() + 0.5 * (1 - alpha) * w.square().sum()
    return float(ce + lam * penalty)


@torch.no_grad()
def fit_sparse_linear(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    *,
    alpha: float = 0.99,
    target_density: float | None = 0.1,
    lam: float | None = None,
    path_length: int = 40,
    lambda_min_ratio: float = 1e-3,
    max_iter: int = 300,
    tol: float = 1e-5,
) -> SparseFit:
    """Fit a sparse linear classifier along a regularisation path.

    The path starts at :func:`lambda_max` (all weights zero) and decreases geometrically
    to ``lambda_min_ratio * lambda_max``, warm-starting each point from the previous.
    With ``target_density``, it stops at the last point whose share of non-zero weights
    is at most the target; with ``lam``, it fits that one strength instead.

    At every point the KKT condition of the all-zero solution (``lam * alpha`` at least the
    largest cross-entropy gradient at ``W = 0``, bias at the log-priors, in float64) is
    checked first: where it holds the exact optimum ``W = 0`` is returned without iterating,
    so no float tie can leave a weight at the start of the path.

    Args:
        x: Features ``[n, f]`` (standardise them first: the penalty is scale-dependent).
        y: Class indices ``[n]``.
        num_classes: Number of classes.
        alpha: Mix of L1 (1.0) and L2 (0.0) penalties; LF-CBM uses 0.99.
        target_density: Wanted share of non-zero weights (e.g. 0.05).
        lam: A fixed regularisation strength (skips the path).
        path_length: Points on the path.
        lambda_min_ratio: End of the path relative to its start.
        max_iter: Proximal steps per point.
        tol: Relative weight change at which a point counts as converged.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(200, 10, generator=g)
        >>> y = (x[:, 3] > 0).long()
        >>> fit = fit_sparse_linear(x, y, 2, target_density=0.1, path_length=10, max_iter=50)
        >>> fit.density <= 0.1, sorted(set(fit.weight.nonzero()[:, 1].tolist()))
        (True, [3])
    """
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ShapeMismatchError(
            f"x must be [n, f] and y [n]; got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if not 0.0 < alpha <= 1.0:
        raise ConfigError(f"alpha must be in (0, 1], got {alpha}")
    if (target_density is None) == (lam is None):
        raise ConfigError("give exactly one of target_density (a path) or lam (one fit)")
    if target_density is not None and not 0.0 < target_density <= 1.0:
        raise ConfigError(f"target_density must be in (0, 1], got {target_density}")
    if lam is not None and not lam >= 0.0:
        raise ConfigError(f"lam must be >= 0, got {lam}")
    x, y = x.float(), y.long()
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ConfigError(f"labels must lie in [0, {num_classes}), got {y.min()}..{y.max()}")
    # Lipschitz constant of the mean softmax cross-entropy gradient (Böhning's bound),
    # with the bias as an extra all-ones feature.
    augmented = torch.cat([x, torch.ones(len(x), 1, device=x.device)], dim=1)
    smooth = 0.5 * float(torch.linalg.matrix_norm(augmented, ord=2)) ** 2 / len(x)
    zero_bias = prior_bias(y, num_classes).to(x.device)
    # Where lam >= start, W = 0 with the prior bias satisfies the KKT conditions exactly.
    start = lambda_max(x, y, num_classes, alpha)
    weight = torch.zeros(num_classes, x.shape[1], device=x.device)
    bias = zero_bias.float()
    if lam is not None:
        lams = [float(lam)]
    else:
        ratio = lambda_min_ratio ** (1 / max(path_length - 1, 1))
        lams = [start * ratio**i for i in range(path_length)]
    best: SparseFit | None = None
    path: list[tuple[float, float, float]] = []
    for strength in lams:
        if strength >= start:
            weight, bias = torch.zeros_like(weight), zero_bias.float()
        else:
            step = 1.0 / (smooth + strength * (1 - alpha))
            weight, bias = _prox_gradient(x, y, weight, bias, strength, alpha, step, max_iter, tol)
        nonzero = int((weight != 0).sum())
        density = nonzero / weight.numel()
        accuracy = float(((x @ weight.T + bias).argmax(-1) == y).float().mean())
        path.append((strength, density, accuracy))
        if target_density is not None and nonzero > target_density * weight.numel() + 1e-6:
            break
        best = SparseFit(weight.clone(), bias.clone(), strength, density)
    if best is None:  # even the first point was too dense: return all-zero weights
        best = SparseFit(torch.zeros_like(weight), zero_bias.float(), start, 0.0)
    best.path = path
    return best
