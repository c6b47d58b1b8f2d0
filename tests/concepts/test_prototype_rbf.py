"""The robust RBF prototype head: its outputs, its loss, its certified radius, training."""

from functools import partial

import lightning as L
import pytest
import torch

from lightning_interp.concepts import RobustRBF
from lightning_interp.errors import ConfigError, ShapeMismatchError
from lightning_interp.modules import ConceptBottleneckModule
from tests.concepts.planted import CLASSES, QUIET, accuracy, loader, planted


@pytest.mark.parametrize("squared", [True, False])
def test_outputs_are_layer_normalised_rbf_responses(squared):
    torch.manual_seed(0)
    names = RobustRBF.default_concept_names(CLASSES)
    head = RobustRBF(8, names, CLASSES, sigma=3.0, squared=squared)
    assert head.num_concepts == 8  # two components per class by default
    x = torch.randn(5, 8)
    with torch.no_grad():
        out = head(x)
        d2 = ((x[:, None, :] - head.components[None]) ** 2).sum(-1)
        detection = torch.exp(-(d2 if squared else d2.sqrt()) / head.sigma)
        expected = detection @ head.weights.softmax(1).T  # sum_k softmax(V_c)_k d_k
    torch.testing.assert_close(out.concepts, detection)
    torch.testing.assert_close(out.logits.exp(), expected)


@pytest.mark.parametrize("squared", [True, False])
def test_robust_loss_is_the_reference_formula(squared):
    torch.manual_seed(0)
    head = RobustRBF(8, ["c0", "c1", "c2"], CLASSES, squared=squared, margin=0.5, sigma=4.0)
    x, y = torch.randn(6, 8), torch.randint(0, 4, (6,))
    with torch.no_grad():
        d = head.distances(x)
        p = torch.exp(-d / head.sigma) @ head.weights.softmax(1).T
        one_hot = torch.nn.functional.one_hot(y, 4).float()
        best_correct = (one_hot * p).sum(1)
        best_incorrect = (p - one_hot).amax(1)  # RobustRBF.loss in nec-research/enlaight
        r = head.sigma.min() * torch.log(torch.sqrt(best_correct / best_incorrect))
        if squared:
            far = d.amax(1)
            r = torch.where(r > 0, -far.sqrt() / 3 + torch.sqrt(far / 9 + r.abs() / 3), r)
        expected = torch.relu(0.5 - r).mean()
        terms = head.training_loss(x, y, None, epoch=0, mask=None)
    torch.testing.assert_close(terms["loss"], expected)


def train(**options):
    torch.manual_seed(0)
    (train, test) = planted(noise=0.5).split(1000)
    head = RobustRBF(32, RobustRBF.default_concept_names(CLASSES), CLASSES, **options)
    module = ConceptBottleneckModule(head, optimizer=partial(torch.optim.Adam, lr=1e-2))
    L.Trainer(max_epochs=15, **QUIET).fit(module, loader(train[:2], 50))
    return head.eval(), module, test


def test_robust_training_learns_and_certifies_a_larger_radius_than_cross_entropy():
    robust, module, (x, y, _) = train()
    plain, _, _ = train(loss="cross_entropy")
    assert module.fit_report["initial_sigma"] > 0  # started from rows, sigma by the rule
    assert bool(robust.data_initialised)
    assert accuracy(robust, x, y) > 0.95 and accuracy(plain, x, y) > 0.95  # 0.995, 1.0
    radii = {}
    for name, head in (("robust", robust), ("plain", plain)):
        correct = head(x).logits.argmax(-1) == y
        radii[name] = float(head.certified_radius(x)[correct].median())
    assert radii["robust"] > 1.5 * radii["plain"]  # 1.10 vs 0.44 measured


@pytest.mark.parametrize("squared", [True, False])
def test_no_perturbation_inside_the_certified_radius_changes_the_prediction(squared):
    torch.manual_seed(0)
    head = RobustRBF(6, [f"c{i}" for i in range(6)], CLASSES, squared=squared, sigma=2.0)
    x = torch.randn(64, 6)
    radius = head.certified_radius(x)
    predicted = head(x).logits.argmax(-1)
    assert bool((radius >= 0).all())
    # Random directions and the steepest direction against the prediction, at 0.99 radius.
    directions = [torch.nn.functional.normalize(torch.randn(64, 6), dim=1) for _ in range(20)]
    x_grad = x.clone().requires_grad_(True)
    logp = head(x_grad).logits
    margin = logp.gather(1, predicted[:, None]).squeeze(1) - logp.masked_fill(
        torch.nn.functional.one_hot(predicted, 4).bool(), -torch.inf
    ).amax(1)
    (grad,) = torch.autograd.grad(margin.sum(), x_grad)
    directions.append(-torch.nn.functional.normalize(grad, dim=1))
    for direction in directions:
        moved = x + 0.99 * radius[:, None] * direction
        with torch.no_grad():
            assert torch.equal(head(moved).logits.argmax(-1), predicted)


def test_component_count_and_inputs_are_checked():
    with pytest.raises(ConfigError, match="one name per component"):
        RobustRBF(8, ["c0", "c1"], CLASSES, components=3)
    with pytest.raises(ShapeMismatchError, match="pooled embeddings"):
        RobustRBF(8, ["c0", "c1"], CLASSES)(torch.randn(2, 5, 8))
