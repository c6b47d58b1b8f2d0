"""Supervised, label-free and description heads on planted concepts, and what every head shares.

PCBM / PCBM-h are tested in test_pcbm.py, the concept transformer in test_transformer.py.
The shared tests run on every registered head (``list_heads()``), built by
tests/concepts/head_cases.py.
"""

from functools import partial

import lightning as L
import pytest
import torch

from lightning_interp.concepts import (
    ConceptBank,
    ConceptHead,
    DescriptionClassifier,
    LabelFreeCBM,
    SupervisedCBM,
    intervention_logits,
    intervention_order,
    list_heads,
    remove_concept,
    top_concepts_per_class,
)
from lightning_interp.concepts.description import descriptor_sentence
from lightning_interp.errors import EmptyConceptBankError, ShapeMismatchError, UnknownConceptError
from lightning_interp.metrics import InterventionCurve
from lightning_interp.modules import ConceptBottleneckModule
from tests.concepts.head_cases import (
    DESCRIPTORS,
    descriptor_encoder,
    example_head,
    example_inputs,
    zero_shot,
)
from tests.concepts.planted import CLASSES, QUIET, accuracy, loader, planted

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


@pytest.mark.parametrize("training", ["joint", "independent", "sequential"])
def test_joint_loss_sums_the_concept_losses_as_koh_et_al(training):
    """Joint: L_Y + lambda * sum_j L_Cj; the concept stage alone: the mean over concepts."""
    torch.manual_seed(0)
    head = SupervisedCBM(
        8,
        [f"c{i}" for i in range(5)],
        CLASSES,
        training=training,
        concept_weight=0.01,
        concept_epochs=1,
    )
    x, y, c = torch.randn(32, 8), torch.randint(0, 4, (32,)), (torch.rand(32, 5) > 0.5).float()
    logits = head.concept_predictor(x)
    per_concept = [
        torch.nn.functional.binary_cross_entropy_with_logits(logits[:, j], c[:, j])
        for j in range(5)
    ]
    terms = head.training_loss(x, y, c, epoch=1, mask=None)
    torch.testing.assert_close(terms["concept_loss"], sum(per_concept))
    task_input = {"joint": torch.sigmoid(logits), "independent": c}.get(training)
    if task_input is not None:
        expected_task = torch.nn.functional.cross_entropy(head.label_predictor(task_input), y)
        torch.testing.assert_close(terms["task_loss"], expected_task)
    if training == "joint":
        expected = terms["task_loss"] + 0.01 * sum(per_concept)
    else:
        expected = terms["task_loss"] + sum(per_concept) / 5
    torch.testing.assert_close(terms["loss"], expected)


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


# ---------------------------------------------------------------- label-free CBM
def test_label_free_cbm_fits_a_sparse_layer_at_its_target(easy):
    (train_set, (x, y, _)), p = easy, planted()
    head = LabelFreeCBM.from_bank(p.bank(distractors=4), CLASSES, cutoff=0.3, target_density=0.2)
    module, _ = train(head, train_set, epochs=5, lr=1e-3, val=(x, y))
    report = module.fit_report
    assert report["cutoff_rows"] == "validation"
    assert report["final_density"] <= 0.2 and report["final_density"] > 0
    assert int(head.active.sum()) == report["active_concepts"] >= 2
    assert accuracy(head, x, y) > 0.95
    tops = top_concepts_per_class(head, k=1)
    assert tops["only_a"][0][0] == "concept_0" and tops["only_b"][0][0] == "concept_1"


def coupled_rows(p, n=1000, seed=3):
    """Planted rows in which concept_3 always equals concept_2 (held-out rows: independent)."""
    g = torch.Generator().manual_seed(seed)
    c = (torch.rand(n, 6, generator=g) > 0.5).float()
    c[:, 3] = c[:, 2]
    x = (2 * c - 1) @ p.directions + 0.5 * torch.randn(n, 32, generator=g)
    return x, (2 * c[:, 0] + c[:, 1]).long()


def shortcut_head(p):
    """A label-free head whose concept_2 unit reads concept_3's direction (a shortcut)."""
    head = LabelFreeCBM.from_bank(p.bank(), CLASSES, cutoff=0.45, target_density=0.5)
    with torch.no_grad():
        head.projection.weight[2] = head.projection.weight[3]
    return head


def test_label_free_cut_off_is_measured_on_validation_rows(easy):
    """As train_cbm.py: a unit that matched on training rows is cut if it fails on held-out ones."""
    p = planted()
    (x, y), (_, val) = coupled_rows(p), easy
    head = shortcut_head(p)
    # Cut-off 0.45: the shortcut passes on the coupled training rows (0.63 measured) and
    # fails on held-out rows (0.01 measured).
    assert head.interpretability(x)[2] > 0.55
    assert head.interpretability(val[0])[2] < 0.2
    report = head.fit_full_data(x, y, val[:2])
    assert report["cutoff_rows"] == "validation"
    assert head.active.tolist() == [True, True, False, True, True, True]
    # Without validation rows the training rows decide (optimistic), and the user is told.
    with pytest.warns(UserWarning, match="no validation rows"):
        report = head.fit_full_data(x, y, None)
    assert report["cutoff_rows"] == "train" and bool(head.active.all())


def test_label_free_module_hands_the_validation_rows_to_the_cut_off(easy):
    p = planted()
    (x, y), (_, val) = coupled_rows(p), easy
    head = shortcut_head(p)
    module, _ = train(head, (x, y), epochs=1, lr=1e-5, val=val[:2])
    assert module.fit_report["cutoff_rows"] == "validation"
    assert not bool(head.active[2]) and int(head.active.sum()) == 5
    assert accuracy(head, val[0], val[1]) > 0.95  # concepts 0 and 1 decide the class


def test_label_free_cut_off_of_every_concept_is_a_typed_error(easy):
    (train_set, _), p = easy, planted()
    head = LabelFreeCBM.from_bank(p.bank(), CLASSES, cutoff=1.01)
    with pytest.raises(EmptyConceptBankError, match="lower cutoff"):
        head.fit_full_data(train_set[0], train_set[1], (train_set[0], train_set[1]))


# ---------------------------------------------------------------- description
@pytest.mark.parametrize(
    "descriptor,sentence",
    [
        ("a long neck", "giraffe, which is a long neck"),
        ("antlers", "giraffe, which is antlers"),  # the reference tests the letter "a"
        ("has spots", "giraffe, which has spots"),
        ("often seen in herds", "giraffe, which often seen in herds"),
        ("typically tall", "giraffe, which typically tall"),
        ("may eat leaves", "giraffe, which may eat leaves"),
        ("can run fast", "giraffe, which can run fast"),
        ("used in zoos", "giraffe, which is used in zoos"),
        ("four legs", "giraffe, which has four legs"),
    ],
)
def test_descriptor_sentences_follow_the_reference_rule(descriptor, sentence):
    """classify_by_descriptions' make_descriptor_sentence, class name prepended with ", "."""
    assert descriptor_sentence("giraffe", descriptor) == sentence
    seen = []
    head = DescriptionClassifier.from_descriptors(
        {"giraffe": [descriptor], "tree_frog": ["green skin"]},
        lambda texts: seen.extend(texts) or torch.eye(2)[: len(texts)],
    )
    assert seen == [sentence, "tree frog, which has green skin"]
    assert head.descriptors() == {"giraffe": [descriptor], "tree_frog": ["green skin"]}


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


# ---------------------------------------------------------------- shared properties
# Every registered head (list_heads), built from the one table in head_cases.
@pytest.mark.parametrize("name", list_heads())
def test_save_load_round_trips_exactly(name, tmp_path):
    head = example_head(name).eval()  # the loaded head is in eval mode (dropout off)
    with torch.no_grad():
        for param in head.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    head.save_pretrained(tmp_path / name)
    loaded = ConceptHead.from_pretrained(tmp_path / name)
    assert type(loaded) is type(head) and loaded.head_type == name
    assert loaded.concept_names == head.concept_names and loaded.class_names == CLASSES
    assert loaded.config == head.config
    for key, value in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = example_inputs(head)[0]
    assert torch.equal(loaded(x).logits, head(x).logits)
    assert sorted(p.name for p in (tmp_path / name).iterdir()) == [
        "config.json",
        "model.safetensors",
    ]


@pytest.mark.parametrize("name", list_heads())
def test_bf16_mixed_trainer_run(name):
    head = example_head(name)
    x, y, c = example_inputs(head, n=64)
    module = ConceptBottleneckModule(head)
    trainer = L.Trainer(max_epochs=2, precision="bf16-mixed", **QUIET)
    if zero_shot(head):  # evaluation only
        logged = trainer.validate(module, loader((x, y), 32), verbose=False)[0]
        assert 0.0 <= logged["val/accuracy"] <= 1.0
        return
    trainer.fit(module, loader((x, y, c), 32), loader((x, y, c), 32, shuffle=False))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert all(p.dtype == torch.float32 for p in head.parameters())
    assert 0.0 <= float(trainer.callback_metrics["val/accuracy"]) <= 1.0


def test_wrong_width_and_unknown_concept_are_typed_errors():
    with pytest.raises(ShapeMismatchError, match="width 32, got 31"):
        example_head("label_free_cbm")(torch.randn(2, 31))
    with pytest.raises(ShapeMismatchError, match="pooling='tokens'"):
        example_head("concept_transformer")(torch.randn(2, 32))
    supervised = SupervisedCBM(32, planted().names, CLASSES)
    with pytest.raises(UnknownConceptError, match="similar names: \\['concept_1', "):
        remove_concept(supervised, "concept_1 ")
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
