"""Every head trains through a real Lightning Trainer on planted concepts and beats chance."""

from functools import partial

import lightning as L
import pytest
import torch

from lightning_interp.concepts import (
    ConceptBank,
    ConceptHead,
    ConceptTransformer,
    DescriptionClassifier,
    LabelFreeCBM,
    PosthocCBM,
    SupervisedCBM,
    evaluate_removal,
    intervention_logits,
    intervention_order,
    remove_concept,
    top_concepts_per_class,
    top_concepts_per_example,
)
from lightning_interp.errors import EmptyConceptBankError, ShapeMismatchError, UnknownConceptError
from lightning_interp.metrics import InterventionCurve
from lightning_interp.modules import ConceptBottleneckModule
from tests.concepts.planted import CLASSES, QUIET, accuracy, loader, planted, planted_tokens

CHANCE = 0.25  # four balanced classes


def train(head, data, epochs=10, lr=3e-2, optimizer=torch.optim.Adam, val=None, **kwargs):
    module = ConceptBottleneckModule(head, optimizer=partial(optimizer, lr=lr))
    trainer = L.Trainer(max_epochs=epochs, **{**QUIET, **kwargs})
    trainer.fit(module, loader(data, 50), loader(val, 200, shuffle=False) if val else None)
    return module, trainer


@pytest.fixture(scope="module")
def easy():
    return planted(noise=0.5).split(1000)


@pytest.fixture(scope="module")
def hard():
    return planted(noise=2.0).split(1000)


# ---------------------------------------------------------------- supervised CBM
@pytest.mark.parametrize(
    "training,bottleneck",
    [("joint", "soft"), ("joint", "hard"), ("independent", "soft"), ("sequential", "soft")],
)
def test_supervised_cbm_learns_concepts_and_labels(easy, training, bottleneck):
    (train_set, test_set), p = easy, planted()
    head = SupervisedCBM(
        32, p.names, CLASSES, training=training, bottleneck=bottleneck, concept_epochs=5
    )
    module, trainer = train(head, train_set, val=test_set)
    x, y, c = test_set
    assert accuracy(head, x, y) > 0.95 > CHANCE + 0.5
    concept_hits = ((head(x).concept_logits > 0) == c.bool()).float().mean()
    assert concept_hits > 0.95
    logged = trainer.validate(module, loader(test_set, 200, shuffle=False), verbose=False)[0]
    assert logged["val/concept_accuracy"] == pytest.approx(float(concept_hits), abs=1e-6)
    assert logged["val/concept_auroc"] > 0.98 and logged["val/accuracy"] > 0.95


def test_interventions_with_true_concepts_raise_accuracy(hard):
    train_set, (x, y, c) = hard
    head = SupervisedCBM(32, planted().names, CLASSES, training="independent")
    train(head, train_set)
    areas = {}
    for policy in ("uncertainty", "random"):
        curve = InterventionCurve()
        generator = torch.Generator().manual_seed(0)
        curve.update(intervention_logits(head, x, c, policy=policy, generator=generator), y)
        values = curve.compute()
        assert values[0] > CHANCE + 0.2  # noisy concepts: fair, not perfect
        assert values[-1] == 1.0 and values[-1] > values[0] + 0.2
        assert (values[1:] >= values[:-1] - 0.02).all()  # more true concepts never hurt much
        areas[policy] = float(curve.area())
    assert areas["uncertainty"] > areas["random"]  # fixing the doubtful concepts first pays


# ---------------------------------------------------------------- PCBM and PCBM-h
def test_pcbm_is_sparse_and_explained_by_planted_concepts(easy):
    (train_set, (x, y, _)), p = easy, planted()
    head = PosthocCBM.from_bank(p.bank(distractors=4), CLASSES, lam=0.03)
    train(head, train_set, lr=0.5, optimizer=torch.optim.SGD)
    assert accuracy(head, x, y) > 0.95
    density = float((head.classifier.weight != 0).float().mean())
    assert density < 0.5  # the proximal step zeroes weights exactly
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


def test_pcbm_h_residual_recovers_a_missing_concept(easy):
    (train_set, (x, y, _)), p = easy, planted()
    bank = p.bank().select([n for n in p.names if n != "concept_1"])
    pcbm = PosthocCBM.from_bank(bank, CLASSES, lam=0.01)
    train(pcbm, train_set, lr=0.5, optimizer=torch.optim.SGD)
    hybrid = PosthocCBM.from_bank(bank, CLASSES, lam=0.01, hybrid=True, bottleneck_epochs=5)
    train(hybrid, train_set, lr=0.5, optimizer=torch.optim.SGD)
    assert accuracy(pcbm, x, y) < 0.6  # without concept_1 only c_0 is readable
    assert accuracy(hybrid, x, y) > 0.95


# ---------------------------------------------------------------- label-free CBM
def test_label_free_cbm_fits_a_sparse_layer_at_its_target(easy):
    (train_set, (x, y, _)), p = easy, planted()
    head = LabelFreeCBM.from_bank(p.bank(distractors=4), CLASSES, cutoff=0.3, target_density=0.2)
    module, _ = train(head, train_set, epochs=5, lr=1e-3)
    report = module.fit_report
    assert report["final_density"] <= 0.2 and report["final_density"] > 0
    assert int(head.active.sum()) == report["active_concepts"] >= 2
    assert accuracy(head, x, y) > 0.95
    tops = top_concepts_per_class(head, k=1)
    assert tops["only_a"][0][0] == "concept_0" and tops["only_b"][0][0] == "concept_1"


def test_label_free_cut_off_of_every_concept_is_a_typed_error(easy):
    (train_set, _), p = easy, planted()
    head = LabelFreeCBM.from_bank(p.bank(), CLASSES, cutoff=1.01)
    with pytest.raises(EmptyConceptBankError, match="lower cutoff"):
        head.fit_full_data(train_set[0], train_set[1])


# ---------------------------------------------------------------- description
def descriptor_encoder(directions):
    def encode(texts):
        rows = []
        for text in texts:
            v = torch.zeros(directions.shape[1])
            for j in range(len(directions)):
                if f"has concept_{j}" in text:
                    v += directions[j]
                if f"lacks concept_{j}" in text:
                    v -= directions[j]
            rows.append(v)
        return torch.stack(rows)

    return encode


DESCRIPTORS = {
    "neither": ["lacks concept_0", "lacks concept_1"],
    "only_b": ["lacks concept_0", "has concept_1"],
    "only_a": ["has concept_0", "lacks concept_1"],
    "both": ["has concept_0", "has concept_1"],
}


def test_description_classifier_is_zero_shot_and_editable(easy):
    (_, test_set), p = easy, planted()
    head = DescriptionClassifier.from_descriptors(DESCRIPTORS, descriptor_encoder(p.directions))
    module = ConceptBottleneckModule(head)
    trainer = L.Trainer(**QUIET)
    logged = trainer.validate(module, loader(test_set, 200, shuffle=False), verbose=False)[0]
    assert logged["val/accuracy"] > 0.95
    broken = head.edit({"both": ["lacks concept_0", "lacks concept_1"]})
    assert broken.descriptors()["both"] == ["lacks concept_0", "lacks concept_1"]
    assert accuracy(broken, test_set[0], test_set[1]) < 0.8  # "both" now never wins


# ---------------------------------------------------------------- concept transformer
def test_concept_transformer_attends_to_the_planted_tokens():
    x, mask, c, y, where = planted_tokens()
    torch.manual_seed(0)
    head = ConceptTransformer(16, [f"concept_{i}" for i in range(4)], CLASSES, d_attn=16)
    train(head, (x[:600], y[:600], c[:600], mask[:600]), epochs=20, lr=1e-2)
    out = head(x[600:], mask[600:])
    assert accuracy(head, x[600:], y[600:], mask=mask[600:]) > CHANCE + 0.45
    present = where[600:] >= 0
    peak = out.attention.argmax(-1)
    assert (peak[present] == where[600:][present]).float().mean() > 0.85
    assert out.attention[~mask[600:].unsqueeze(1).expand_as(out.attention)].abs().max() == 0


# ---------------------------------------------------------------- shared properties
def built_heads():
    p = planted()
    bank = p.bank(distractors=2)
    return {
        "supervised": SupervisedCBM(32, p.names, CLASSES, concept_hidden=8),
        "pcbm_h": PosthocCBM.from_bank(bank, CLASSES, hybrid=True, bottleneck_epochs=1),
        "label_free": LabelFreeCBM.from_bank(bank, CLASSES, cutoff=0.0),
        "transformer": ConceptTransformer(32, p.names, CLASSES, d_attn=8, heads=2),
        "description": DescriptionClassifier.from_descriptors(
            DESCRIPTORS, descriptor_encoder(torch.randn(6, 32))
        ),
    }


def head_inputs(name, n=16):
    x = torch.randn(n, 5, 32) if name == "transformer" else torch.randn(n, 32)
    return x, torch.randint(0, 4, (n,)), (torch.rand(n, 6) > 0.5).float()


@pytest.mark.parametrize("name", list(built_heads()))
def test_save_load_round_trips_exactly(name, tmp_path):
    head = built_heads()[name]
    with torch.no_grad():
        for param in head.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    head.save_pretrained(tmp_path / name)
    loaded = ConceptHead.from_pretrained(tmp_path / name)
    assert type(loaded) is type(head)
    assert loaded.concept_names == head.concept_names and loaded.class_names == CLASSES
    for key, value in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = head_inputs(name)[0]
    assert torch.equal(loaded(x).logits, head(x).logits)
    assert sorted(p.name for p in (tmp_path / name).iterdir()) == [
        "config.json",
        "model.safetensors",
    ]


@pytest.mark.parametrize("name", list(built_heads()))
def test_bf16_mixed_trainer_run(name):
    head = built_heads()[name]
    x, y, c = head_inputs(name, n=64)
    module = ConceptBottleneckModule(head)
    trainer = L.Trainer(max_epochs=2, precision="bf16-mixed", **QUIET)
    if name == "description":  # zero-shot: evaluation only
        logged = trainer.validate(module, loader((x, y), 32), verbose=False)[0]
        assert 0.0 <= logged["val/accuracy"] <= 1.0
        return
    trainer.fit(module, loader((x, y, c), 32), loader((x, y, c), 32, shuffle=False))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert all(p.dtype == torch.float32 for p in head.parameters())
    assert 0.0 <= float(trainer.callback_metrics["val/accuracy"]) <= 1.0


def test_wrong_width_and_unknown_concept_are_typed_errors():
    heads = built_heads()
    with pytest.raises(ShapeMismatchError, match="width 32, got 31"):
        heads["label_free"](torch.randn(2, 31))
    with pytest.raises(ShapeMismatchError, match="pooling='tokens'"):
        heads["transformer"](torch.randn(2, 32))
    with pytest.raises(UnknownConceptError, match="similar names: \\['concept_1', "):
        remove_concept(heads["supervised"], "concept_1 ")
    with pytest.raises(UnknownConceptError):
        ConceptBank(["a"], torch.ones(1, 2)).select(["b"])


@pytest.mark.parametrize("bottleneck", ["soft", "hard"])
def test_intervention_logits_equal_a_full_forward_per_step(bottleneck):
    torch.manual_seed(0)
    head = SupervisedCBM(32, [f"c{i}" for i in range(4)], CLASSES, bottleneck=bottleneck).eval()
    x, c = torch.randn(10, 32), (torch.rand(10, 4) > 0.5).float()
    curve = intervention_logits(head, x, c)
    order = intervention_order(torch.sigmoid(head(x).concept_logits)).argsort(dim=-1)
    for k in range(head.num_concepts + 1):
        with torch.no_grad():
            expected = head(x, true_concepts=c, intervene=order < k).logits
        assert torch.equal(curve[k], expected)
