"""Concept metrics: concept accuracy and AUROC, intervention curves, final-layer sparsity.

Task accuracy is torchmetrics' own ``MulticlassAccuracy``. Every metric here keeps sums
(or concatenated scores) in ``add_state`` so it is exact under DDP.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_interp.errors import ShapeMismatchError


def _check_pair(preds: Tensor, target: Tensor) -> None:
    if preds.shape != target.shape or preds.ndim != 2:
        raise ShapeMismatchError(
            f"concept predictions and labels must both be [batch, concepts], got "
            f"{tuple(preds.shape)} and {tuple(target.shape)}"
        )


class ConceptAccuracy(Metric):
    """Share of (example, concept) pairs whose thresholded probability equals the label.

    Example:
        >>> metric = ConceptAccuracy()
        >>> metric(torch.tensor([[0.9, 0.2], [0.4, 0.7]]), torch.tensor([[1, 0], [1, 1]]))
        tensor(0.7500)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, threshold: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold
        self.add_state("correct", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add probabilities ``[b, concepts]`` and binary labels of the same shape."""
        _check_pair(preds, target)
        hits = (preds > self.threshold) == target.bool()
        self.correct += hits.sum()
        self.total += hits.numel()

    def compute(self) -> Tensor:
        """The accuracy over all pairs seen."""
        return (self.correct / self.total.clamp_min(1)).float()


def binary_auroc(scores: Tensor, labels: Tensor) -> Tensor:
    """Area under the ROC curve by the rank statistic (ties count half); NaN if one class."""
    labels = labels.bool()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return torch.tensor(float("nan"))
    order = scores.double().argsort()
    sorted_scores = scores.double()[order]
    ranks = torch.empty_like(sorted_scores)
    # Average ranks over ties (Mann-Whitney U).
    unique, inverse, counts = torch.unique_consecutive(
        sorted_scores, return_inverse=True, return_counts=True
    )
    ends = counts.cumsum(0).double()
    average = ends - (counts.double() - 1) / 2
    ranks[order] = average[inverse]
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2
    return (u / (n_pos * n_neg)).float()


class ConceptAUROC(Metric):
    """Mean over concepts of the ROC AUC of predicted concept probabilities.

    Concepts that saw only one label value are left out of the mean.

    Example:
        >>> metric = ConceptAUROC()
        >>> metric(torch.tensor([[0.9], [0.2], [0.6], [0.4]]), torch.tensor([[1], [0], [1], [1]]))
        tensor(1.)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("preds", [], dist_reduce_fx="cat")
        self.add_state("target", [], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add probabilities ``[b, concepts]`` and binary labels of the same shape."""
        _check_pair(preds, target)
        self.preds.append(preds.detach().float())
        self.target.append(target.detach().bool())

    def per_concept(self) -> Tensor:
        """AUROC of each concept (NaN where only one label value was seen)."""
        preds, target = dim_zero_cat(self.preds), dim_zero_cat(self.target)
        return torch.stack([binary_auroc(preds[:, j], target[:, j]) for j in range(preds.shape[1])])

    def compute(self) -> Tensor:
        """Mean AUROC over concepts with both label values."""
        return self.per_concept().nanmean()


class InterventionCurve(Metric):
    """Task accuracy after intervening on 0, 1, ... concepts, and the area under that curve.

    ``update`` takes the logits of each intervention step, as
    :func:`~lightning_interp.concepts.intervention_logits` returns them.

    Example:
        >>> curve = InterventionCurve()
        >>> logits = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]])
        >>> curve.update(logits, torch.tensor([1, 0]))
        >>> curve.compute(), curve.area()
        (tensor([0.5000, 1.0000]), tensor(0.7500))
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", torch.zeros(0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, step_logits: Tensor, target: Tensor) -> None:
        """Add logits ``[steps, b, classes]`` and labels ``[b]``."""
        if step_logits.ndim != 3 or step_logits.shape[1] != target.shape[0]:
            raise ShapeMismatchError(
                f"step logits must be [steps, batch={target.shape[0]}, classes], got "
                f"{tuple(step_logits.shape)}"
            )
        hits = (step_logits.argmax(-1) == target[None]).sum(-1).double()
        if self.correct.numel() == 0:
            self.correct = torch.zeros_like(hits)
        if self.correct.shape != hits.shape:
            raise ShapeMismatchError("every update must use the same number of steps")
        self.correct += hits
        self.total += target.shape[0]

    def curve(self) -> Tensor:
        """Accuracy at each intervention step."""
        return (self.correct / self.total.clamp_min(1)).float()

    def compute(self) -> Tensor:
        """Accuracy at each intervention step."""
        return self.curve()

    def area(self) -> Tensor:
        """Trapezoid area under the curve over the intervened fraction (0 to 1)."""
        curve = self.curve()
        if curve.numel() < 2:
            return curve.sum()
        x = torch.linspace(0, 1, curve.numel())
        return torch.trapezoid(curve, x)


class InterventionAUC(InterventionCurve):
    """:class:`InterventionCurve` whose ``compute`` returns the area under the curve."""

    def compute(self) -> Tensor:
        """The area under the intervention curve."""
        return self.area()


class FinalLayerSparsity(Metric):
    """Sparsity of a concept-to-class layer: density and effective concepts per class.

    ``compute`` returns the share of non-zero weights; :meth:`effective_concepts` the mean
    over classes of ``exp(entropy)`` of the class's normalised absolute weights (the number
    of equally weighted concepts that would have the same spread), and
    :meth:`nonzero_per_class` the mean count of non-zero weights per class.

    Example:
        >>> metric = FinalLayerSparsity()
        >>> metric.update(torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]]))
        >>> metric.compute(), metric.effective_concepts(), metric.nonzero_per_class()
        (tensor(0.3750), tensor(1.5000), tensor(1.5000))
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("nonzero", "weights", "effective", "rows"):
            self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, weight: Tensor) -> None:
        """Add a final-layer weight ``[classes, concepts]``."""
        weight = weight.detach().double()
        if weight.ndim != 2:
            raise ShapeMismatchError(f"weight must be [classes, concepts], got {weight.shape}")
        self.nonzero += (weight != 0).sum()
        self.weights += weight.numel()
        p = weight.abs() / weight.abs().sum(-1, keepdim=True).clamp_min(1e-30)
        entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
        self.effective += torch.where(weight.abs().sum(-1) > 0, entropy.exp(), 0.0).sum()
        self.rows += weight.shape[0]

    def compute(self) -> Tensor:
        """Share of non-zero weights."""
        return (self.nonzero / self.weights.clamp_min(1)).float()

    def effective_concepts(self) -> Tensor:
        """Mean effective number of concepts per class."""
        return (self.effective / self.rows.clamp_min(1)).float()

    def nonzero_per_class(self) -> Tensor:
        """Mean number of non-zero weights per class."""
        return (self.nonzero / self.rows.clamp_min(1)).float()
