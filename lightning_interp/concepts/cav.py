"""Concept activation vectors: a linear boundary separating concept examples from others.

A CAV is the weight ``w`` and intercept ``b`` of a linear classifier of concept examples
(positives) against others (negatives). Post-hoc CBMs (Yuksekgonul et al., ICLR 2023;
reference code ``mertyg/post-hoc-cbm``, ``concepts/concept_utils.py``) read an embedding's
*margin* to that boundary, ``(w . x + b) / |w|``: the signed distance, intercept included.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from lightning_interp.errors import ConfigError, ShapeMismatchError


class CAV(NamedTuple):
    """A concept boundary with a unit normal.

    Attributes:
        direction: Unit normal ``w / |w|`` ``[d]``, pointing to the positives.
        intercept: ``b / |w|``: ``x @ direction + intercept`` is the signed distance of
            ``x`` to the boundary (the PCBM concept margin).
    """

    direction: Tensor
    intercept: float


def _check(positives: Tensor, negatives: Tensor) -> None:
    if positives.ndim != 2 or negatives.ndim != 2 or positives.shape[1] != negatives.shape[1]:
        raise ShapeMismatchError(
            f"positives and negatives must be [n, d] with the same d, got "
            f"{tuple(positives.shape)} and {tuple(negatives.shape)}"
        )
    if len(positives) == 0 or len(negatives) == 0:
        raise ConfigError("a CAV needs at least one positive and one negative example")


def logistic_boundary(
    positives: Tensor, negatives: Tensor, weight_decay: float = 1e-3, steps: int = 100
) -> tuple[Tensor, float]:
    """Weight and intercept of an L2-regularised logistic regression (full-batch L-BFGS, fp64).

    Inputs are standardised per feature for conditioning; the returned weight and
    intercept are mapped back to the raw space, so ``x @ w + b`` is the classifier's logit.
    """
    x = torch.cat([positives, negatives]).double()
    y = torch.cat([torch.ones(len(positives)), torch.zeros(len(negatives))]).double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y)
        loss = loss + 0.5 * weight_decay * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    raw = w.detach() / std
    return raw, float(b.detach() - raw @ mean)


def svm_boundary(positives: Tensor, negatives: Tensor, C: float = 1.0) -> tuple[Tensor, float]:
    """Weight and intercept of scikit-learn's ``LinearSVC`` (needs scikit-learn installed)."""
    try:
        from sklearn.svm import LinearSVC
    except ImportError:
        raise ConfigError(
            "method='svm' needs scikit-learn (`pip install scikit-learn`); or use "
            "method='logistic', which needs only torch"
        ) from None
    x = torch.cat([positives, negatives]).double().numpy()
    y = [1] * len(positives) + [0] * len(negatives)
    svm = LinearSVC(C=C).fit(x, y)
    return torch.from_numpy(svm.coef_[0]).double(), float(svm.intercept_[0])


def fit_cav(positives: Tensor, negatives: Tensor, method: str = "logistic", **kwargs: float) -> CAV:
    """The concept boundary between ``positives`` and ``negatives``, with a unit normal.

    Args:
        positives: Embeddings of examples showing the concept ``[n+, d]``.
        negatives: Embeddings of examples without it ``[n-, d]``.
        method: ``"logistic"`` (torch only) or ``"svm"`` (scikit-learn ``LinearSVC``; the
            PCBM reference uses a linear-kernel ``SVC``).
        **kwargs: ``weight_decay``/``steps`` (logistic) or ``C`` (svm).

    Returns:
        A :class:`CAV`: unit direction and the intercept on the same scale.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> pos = torch.randn(50, 3, generator=g) + torch.tensor([4.0, 0, 0])
        >>> neg = torch.randn(50, 3, generator=g)
        >>> cav = fit_cav(pos, neg)
        >>> int(cav.direction.abs().argmax()), -4 < cav.intercept < 0
        (0, True)
    """
    _check(positives, negatives)
    if method == "logistic":
        w, b = logistic_boundary(positives.detach(), negatives.detach(), **kwargs)
    elif method == "svm":
        w, b = svm_boundary(positives.detach(), negatives.detach(), **kwargs)
    else:
        raise ConfigError(f"CAV method must be 'logistic' or 'svm', got {method!r}")
    norm = float(w.norm())
    if norm == 0.0:
        raise ConfigError(
            "the concept classifier learned a zero weight (positives and negatives are not "
            "linearly separable at all); give more distinct example sets or less regularisation"
        )
    return CAV((w / norm).float(), b / norm)


def learn_cav(
    positives: Tensor, negatives: Tensor, method: str = "logistic", **kwargs: float
) -> Tensor:
    """A unit-norm CAV pointing from the negative to the positive examples.

    The direction of :func:`fit_cav` (which also gives the intercept PCBM margins need).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> pos = torch.randn(50, 3, generator=g) + torch.tensor([4.0, 0, 0])
        >>> neg = torch.randn(50, 3, generator=g)
        >>> cav = learn_cav(pos, neg)
        >>> int(cav.abs().argmax()), round(float(cav.norm()), 4)
        (0, 1.0)
    """
    return fit_cav(positives, negatives, method, **kwargs).direction
