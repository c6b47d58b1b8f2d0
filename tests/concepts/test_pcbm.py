"""PCBM and PCBM-h against the paper's reference (mertyg/post-hoc-cbm) and scikit-learn."""

import json
import warnings
from functools import partial

import lightning as L
import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_interp.concepts import (
    ConceptBank,
    ConceptHead,
    PosthocCBM,
    elastic_net_objective,
    evaluate_removal,
    top_concepts_per_class,
    top_concepts_per_example,
)
from lightning_interp.modules import ConceptBottleneckModule
from tests.concepts.planted import CLASSES, QUIET, accuracy, loader, planted

LAM, ALPHA = 0.01, 0.99


@pytest.fixture(scope="module")
def easy():
    return planted(noise=0.5).split(1000)


def train(head, data, optimizer=None, epochs=2, val=None):
    module = ConceptBottleneckModule(head, optimizer=optimizer)
    trainer = L.Trainer(max_epochs=epochs, **QUIET)
    trainer.fit(module, loader(data, 50), loader(val, 200, shuffle=False) if val else None)
    return module


def sklearn_elastic_net(margins, y, lam, alpha):
    """scikit-learn's multinomial elastic net on the same rows: the objective PCBM states."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # saga's convergence chatter at tol=1e-10
        ref = linear_model.LogisticRegression(
            penalty="elasticnet",
            solver="saga",
            l1_ratio=alpha,
            C=1 / (len(y) * lam),
            tol=1e-10,
            max_iter=50_000,
        ).fit(margins.double().numpy(), y.numpy())
    return torch.from_numpy(ref.coef_), torch.from_numpy(ref.intercept_)


OPTIMIZERS = {
    "adam_default": None,  # the module's default: Adam, lr 1e-3
    "sgd": partial(torch.optim.SGD, lr=0.5),
    "adamw": partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_the_elastic_net_layer_reaches_sklearns_objective_whatever_the_optimizer(easy, optimizer):
    (train_set, _), p = easy, planted()
    head = PosthocCBM.from_bank(p.bank(distractors=2), CLASSES, lam=LAM, alpha=ALPHA)
    module = train(head, train_set, OPTIMIZERS[optimizer])
    x, y = train_set[0], train_set[1]
    margins = head.margins(x)
    weight, bias = head.classifier.weight, head.classifier.bias
    ref_w, ref_b = sklearn_elastic_net(margins, y, LAM, ALPHA)
    ours = elastic_net_objective(margins, y, weight, bias, LAM, ALPHA)
    theirs = elastic_net_objective(margins, y, ref_w, ref_b, LAM, ALPHA)
    density = float((weight != 0).float().mean())
    ref_density = float((ref_w.abs() > 1e-6).float().mean())
    print(
        f"{optimizer}: objective {ours:.9f} vs sklearn {theirs:.9f}, density {density:.3f} "
        f"vs {ref_density:.3f}"
    )
    assert ours <= theirs + 1e-7
    assert module.fit_report["objective"] == pytest.approx(ours, abs=1e-9)
    # The same support as scikit-learn's solution (a weight at the threshold may differ).
    disagree = (weight != 0) != (ref_w.abs() > 1e-6)
    assert (weight[disagree].abs() < 1e-3).all() and (ref_w[disagree].abs() < 1e-3).all()
    assert abs(density - ref_density) <= 1 / weight.numel()  # at most one weight apart
    assert 0 < module.fit_report["final_density"] == density <= 0.5  # sparse, any optimizer
    torch.testing.assert_close(weight.double(), ref_w, atol=1e-3, rtol=0)
    assert not weight.requires_grad  # solved, then frozen: no optimizer step moves it


def test_pcbm_is_sparse_and_explained_by_planted_concepts(easy):
    (train_set, (x, y, _)), p = easy, planted()
    head = PosthocCBM.from_bank(p.bank(distractors=4), CLASSES, lam=0.03)
    train(head, train_set)
    assert accuracy(head, x, y) > 0.95
    density = float((head.classifier.weight != 0).float().mean())
    assert density < 0.5  # the elastic net zeroes weights exactly
    tops = top_concepts_per_class(head, k=2)
    assert tops["only_a"][0][0] == "concept_0" and tops["only_b"][0][0] == "concept_1"
    assert {name for name, _ in tops["both"]} == {"concept_0", "concept_1"}
    for explanation, label in zip(top_concepts_per_example(head, x[:20]), y[:20], strict=True):
        # Presence and absence of the two planted concepts decide every class.
        assert {name for name, _, _ in explanation[:2]} == {"concept_0", "concept_1"}, label
    edited, report = evaluate_removal(head, "concept_0", x, y)
    assert report.change < -0.3 and accuracy(edited, x, y) == report.accuracy_after
    assert torch.equal(edited.classifier.weight[:, 0], torch.zeros(4))
    assert head.classifier.weight[:, 0].abs().sum() > 0  # the original is untouched


# ---------------------------------------------------------------- PCBM-h
def test_pcbm_h_residual_penalty_is_the_references_mean_of_squares():
    torch.manual_seed(0)
    head = PosthocCBM.from_bank(planted().bank(), CLASSES, hybrid=True, residual_penalty=0.5)
    x, y = torch.randn(16, 32), torch.randint(0, 4, (16,))
    terms = head.training_loss(x, y, None, epoch=0, mask=None)
    mean_square = head.residual.weight.detach().square().mean()
    torch.testing.assert_close(terms["residual_penalty"], mean_square)
    torch.testing.assert_close(terms["loss"] - terms["task_loss"], 0.5 * mean_square)
    # The penalty reaches the residual weight only (not its bias, not the bottleneck).
    terms["loss"].backward()
    logits = head.classifier(head.margins(x)) + head.residual(x)
    task_grad = torch.autograd.grad(
        torch.nn.functional.cross_entropy(logits, y), head.residual.weight
    )
    expected = task_grad[0] + 0.5 * 2 * head.residual.weight.detach() / head.residual.weight.numel()
    torch.testing.assert_close(head.residual.weight.grad, expected)
    assert head.classifier.weight.grad is None


def test_pcbm_h_residual_starts_at_nn_linears_default_initialisation():
    """The reference builds its residual as a plain nn.Linear: U(-1/sqrt(d), 1/sqrt(d))."""
    d = 512
    bank = ConceptBank([f"c{i}" for i in range(3)], torch.randn(3, d))
    torch.manual_seed(0)
    head = PosthocCBM.from_bank(bank, ["a", "b", "c", "d"], hybrid=True)
    weight, bias = head.residual.weight.detach(), head.residual.bias.detach()
    bound = 1 / d**0.5
    assert weight.abs().max() <= bound and bias.abs().max() <= bound
    # Uniform on [-bound, bound]: standard deviation bound / sqrt(3) (2048 draws: 5% off at most).
    assert float(weight.std()) == pytest.approx(bound / 3**0.5, rel=0.05)
    assert float(bias.abs().min()) > 0


def test_pcbm_h_residual_recovers_a_missing_concept(easy):
    (train_set, (x, y, _)), p = easy, planted()
    bank = p.bank().select([n for n in p.names if n != "concept_1"])
    pcbm = PosthocCBM.from_bank(bank, CLASSES, lam=0.01)
    train(pcbm, train_set)
    hybrid = PosthocCBM.from_bank(bank, CLASSES, lam=0.01, hybrid=True)
    # The reference trains the residual with Adam at lr 0.01.
    train(hybrid, train_set, partial(torch.optim.Adam, lr=0.01), epochs=5)
    assert accuracy(pcbm, x, y) < 0.6  # without concept_1 only c_0 is readable
    assert accuracy(hybrid, x, y) > 0.95
    # The bottleneck of the hybrid is the plain PCBM's layer, untouched by residual training.
    torch.testing.assert_close(hybrid.classifier.weight, pcbm.classifier.weight, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- margins
def offset_concept(n=600, d=16, seed=0):
    """A concept present as an *offset* along a direction: x = c * 3u + noise, c in {0, 1}."""
    g = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    c = (torch.rand(n, generator=g) > 0.5).float()
    x = c[:, None] * 3 * u + torch.randn(n, d, generator=g) * 0.5 + 2.0 * u  # shifted away
    return x, c


def test_margins_include_the_cav_intercept():
    x, c = offset_concept()
    bank = ConceptBank.from_examples({"on": (x[c == 1], x[c == 0])})
    head = PosthocCBM.from_bank(bank, ["a", "b"])
    margins = head.margins(x)[:, 0]
    torch.testing.assert_close(margins, bank.margins(x)[:, 0])
    # The signed distance to the boundary tells presence; the projection alone cannot
    # (every input lies on the positive side of the origin along the direction).
    assert float(((margins > 0).float() == c).float().mean()) > 0.95
    assert float(((x @ bank.normalized()[0] > 0).float() == c).float().mean()) < 0.6


def test_svm_margins_equal_sklearns_decision_function_over_the_weight_norm():
    svm = pytest.importorskip("sklearn.svm")
    x, c = offset_concept()
    bank = ConceptBank.from_examples({"on": (x[c == 1], x[c == 0])}, method="svm", C=0.1)
    xp, xn = x[c == 1], x[c == 0]
    ref = svm.LinearSVC(C=0.1).fit(
        torch.cat([xp, xn]).double().numpy(), [1] * len(xp) + [0] * len(xn)
    )
    expected = ref.decision_function(x.double().numpy()) / float((ref.coef_**2).sum() ** 0.5)
    torch.testing.assert_close(
        bank.margins(x)[:, 0], torch.from_numpy(expected).float(), atol=1e-4, rtol=0
    )


# ---------------------------------------------------------------- heads saved earlier
def test_a_pcbm_saved_before_intercepts_and_solved_layers_still_loads(tmp_path):
    torch.manual_seed(0)
    head = PosthocCBM.from_bank(planted().bank(), CLASSES, hybrid=True)
    folder = head.save_pretrained(tmp_path / "old")
    tensors = load_file(folder / "model.safetensors")
    del tensors["concept_intercepts"]  # written before margins had intercepts
    save_file(tensors, str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    config["config"] = {
        "lam": 0.001,
        "alpha": 0.99,
        "hybrid": True,
        "bottleneck_epochs": 3,
        "residual_weight_decay": 0.001,
    }
    (folder / "config.json").write_text(json.dumps(config))
    loaded = ConceptHead.from_pretrained(folder)
    assert isinstance(loaded, PosthocCBM) and not loaded.concept_intercepts.any()
    # A weight decay on the sum of squares is the same penalty on the mean times the count.
    assert loaded.config["residual_penalty"] == pytest.approx(0.001 * 32 * 4)
    x = torch.randn(5, 32)
    torch.testing.assert_close(loaded(x).logits, head(x).logits)
