"""Concept metrics against reference formulas, and merged across simulated ranks."""

import pytest
import torch

from lightning_interp.metrics import (
    ConceptAccuracy,
    ConceptAUROC,
    FinalLayerSparsity,
    InterventionAUC,
    InterventionCurve,
)


def data(n=200, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = (torch.rand(n, k, generator=g) > 0.4).long()
    preds = (0.6 * target + 0.7 * torch.rand(n, k, generator=g)).clamp(0, 1)
    preds[:20] = preds[:20].round(decimals=1)  # ties
    return preds, target


def test_concept_auroc_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    preds, target = data()
    metric = ConceptAUROC()
    for chunk in range(0, 200, 64):
        metric.update(preds[chunk : chunk + 64], target[chunk : chunk + 64])
    ref = [metrics.roc_auc_score(target[:, j], preds[:, j]) for j in range(5)]
    torch.testing.assert_close(metric.per_concept(), torch.tensor(ref, dtype=torch.float32))
    torch.testing.assert_close(metric.compute(), torch.tensor(ref).mean().float())


def test_concept_accuracy_is_the_thresholded_match_rate():
    preds, target = data()
    metric = ConceptAccuracy()
    metric.update(preds, target)
    assert float(metric.compute()) == pytest.approx(float(((preds > 0.5) == target).float().mean()))


@pytest.mark.parametrize("cls", [ConceptAccuracy, ConceptAUROC])
def test_merged_rank_states_equal_one_pass(cls):
    """Two "ranks" merged with torchmetrics' merge_state equal one metric over all rows."""
    preds, target = data()
    whole, rank0, rank1 = cls(), cls(), cls()
    whole.update(preds, target)
    rank0.update(preds[:90], target[:90])
    rank1.update(preds[90:], target[90:])
    rank0.merge_state(rank1)
    torch.testing.assert_close(rank0.compute(), whole.compute())


def test_intervention_curve_and_area():
    target = torch.tensor([0, 1, 1, 0])
    right, wrong = torch.tensor([[5.0, 0.0], [0.0, 5.0]]), torch.tensor([[0.0, 5.0], [5.0, 0.0]])
    # step 0: 1 of 4 right; step 1: 3 of 4; step 2: all.
    steps = torch.stack(
        [
            torch.stack([right[0], wrong[1], wrong[1], wrong[0]]),
            torch.stack([right[0], right[1], right[1], wrong[0]]),
            torch.stack([right[0], right[1], right[1], right[0]]),
        ]
    )
    curve = InterventionCurve()
    curve.update(steps[:, :2], target[:2])
    curve.update(steps[:, 2:], target[2:])
    torch.testing.assert_close(curve.compute(), torch.tensor([0.25, 0.75, 1.0]))
    # Trapezoids over x = 0, 0.5, 1: 0.5 * (0.25 + 0.75) / 2 + 0.5 * (0.75 + 1) / 2
    torch.testing.assert_close(curve.area(), torch.tensor(0.6875))
    auc = InterventionAUC()
    auc.update(steps, target)
    torch.testing.assert_close(auc.compute(), torch.tensor(0.6875))


def test_final_layer_sparsity():
    weight = torch.tensor([[0.5, -0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0], [1.0, 1.0, 1.0, 1.0]])
    metric = FinalLayerSparsity()
    metric.update(weight)
    assert float(metric.compute()) == pytest.approx(7 / 12)
    assert float(metric.nonzero_per_class()) == pytest.approx(7 / 3)
    assert float(metric.effective_concepts()) == pytest.approx((2 + 1 + 4) / 3)
