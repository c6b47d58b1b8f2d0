"""ConceptBank: building from phrases and examples, filters, storage, typed errors."""

import json

import pytest
import torch
from safetensors.torch import save_file

from lightning_interp.backbones import Backbone
from lightning_interp.concepts import ConceptBank, filter_concepts, fit_cav, learn_cav
from lightning_interp.data.embed import embed_all, text_encoder
from lightning_interp.errors import (
    CorruptFileError,
    EmptyConceptBankError,
    ShapeMismatchError,
    UnknownConceptError,
)
from tests.backbones import tiny_models as tm
from tests.concepts.planted import planted
from tests.data.test_tokens import make_tokenizer


@pytest.fixture(scope="module")
def clip_backbone():
    return Backbone(tm.build("clip"), make_tokenizer())


@pytest.fixture(scope="module")
def bert_backbone():
    return Backbone(tm.build("bert"), make_tokenizer())


def test_clip_phrases_use_the_projected_text_tower(clip_backbone):
    phrases = ["striped", "furry animal", "red"]
    bank = ConceptBank.from_phrases(phrases, text_encoder(clip_backbone))
    encoded = clip_backbone.encode(phrases)
    with torch.no_grad():
        ref = clip_backbone.model.get_text_features(**encoded).pooler_output
    assert bank.names == phrases and bank.width == 16  # CLIP projection_dim
    torch.testing.assert_close(bank.vectors, torch.nn.functional.normalize(ref, dim=-1))


def test_sentence_encoder_phrases_are_masked_means(bert_backbone):
    phrases = ["good", "a long winded phrase here"]
    vectors = embed_all(bert_backbone, phrases, pooling="mean")
    for i, phrase in enumerate(phrases):  # alone: no padding, so a plain mean
        alone = bert_backbone(bert_backbone.encode([phrase])).last_hidden_state.mean(1)[0]
        torch.testing.assert_close(vectors[i], alone, atol=1e-5, rtol=1e-4)


def test_clip_images_and_texts_share_a_space(clip_backbone):
    images = embed_all(clip_backbone, tm.pixel_inputs(3)["pixel_values"], normalize=True)
    bank = ConceptBank.from_phrases(["a", "b"], text_encoder(clip_backbone))
    assert bank.similarity(images).shape == (3, 2)


@pytest.mark.parametrize("method", ["logistic", "svm"])
def test_cavs_recover_planted_directions(method):
    if method == "svm":
        pytest.importorskip("sklearn")
    p = planted(n=600, noise=1.0)
    examples = {name: (p.x[p.c[:, j] == 1], p.x[p.c[:, j] == 0]) for j, name in enumerate(p.names)}
    bank = ConceptBank.from_examples(examples, method=method)
    cos = bank.normalized() @ torch.nn.functional.normalize(p.directions, dim=-1).T
    assert bank.sources == ["cav"] * len(p.names)
    # Each CAV points along its own planted direction, nearly orthogonal to the others.
    assert (cos.diagonal() > 0.8).all(), cos.diagonal()
    assert torch.equal(cos.abs().argmax(dim=1), torch.arange(len(p.names)))


def test_bank_from_annotated_labels_learns_one_predictor_per_concept():
    p = planted(n=600, noise=1.0)
    bank = ConceptBank.from_labels(p.x, p.c, p.names)
    assert bank.sources == ["learned"] * 6
    # Each learned direction ranks its own concept's examples first (AUROC-like check).
    scores = p.x @ bank.vectors.T
    for j in range(6):
        assert scores[p.c[:, j] == 1, j].mean() > scores[p.c[:, j] == 0, j].mean() + 2
    with pytest.raises(ShapeMismatchError, match="labels must be"):
        ConceptBank.from_labels(p.x, p.c[:, :2], p.names)


def test_cav_matches_sklearn_logistic_regression():
    sklearn = pytest.importorskip("sklearn.linear_model")
    p = planted(n=400, d=8, k=2, noise=1.5)
    pos, neg = p.x[p.c[:, 0] == 1], p.x[p.c[:, 0] == 0]
    ours = learn_cav(pos, neg, weight_decay=1e-3)
    x = torch.cat([pos, neg])
    mean, std = x.mean(0), x.std(0)
    z = ((x - mean) / std).double().numpy()
    y = [1] * len(pos) + [0] * len(neg)
    ref = sklearn.LogisticRegression(C=1 / (1e-3 * len(y)), tol=1e-10, max_iter=10_000).fit(z, y)
    theirs = torch.nn.functional.normalize(torch.from_numpy(ref.coef_[0]).float() / std, dim=0)
    assert float(ours @ theirs) > 0.9999
    # The boundary's offset too: the margin (w.x + b) / |w| of the same classifier.
    raw = torch.from_numpy(ref.coef_[0]) / std.double()
    offset = (float(ref.intercept_[0]) - float(raw @ mean.double())) / float(raw.norm())
    cav = fit_cav(pos, neg, weight_decay=1e-3)
    assert cav.intercept == pytest.approx(offset, abs=1e-3)
    torch.testing.assert_close(cav.direction, ours)


def test_filters_each_drop_their_kind():
    vectors = torch.tensor(
        [
            [1.0, 0, 0, 0],
            [0.99, 0.1, 0, 0.05],  # a little closer to "never seen": more general than red
            [0, 1.0, 0, 0],
            [0, 0, 1.0, 0],
            [0, 0, 0, 1.0],
            [0.5, 0.5, 0.5, 0.5],
        ]
    )
    names = [
        "red",
        "crimson",
        "cat-like",
        "an extremely long concept phrase",
        "never seen",
        "The cat",
    ]
    bank = ConceptBank(names, vectors)
    texts = dict(zip(names, vectors, strict=True)) | {"cat": torch.tensor([0.0, 1.0, 0.15, 0.0])}
    data = torch.tensor([[1.0, 0.3, 0.2, -0.1]] * 5 + [[0.2, 1.0, 0.0, 0.0]] * 5)
    kept, report = filter_concepts(
        bank,
        max_length=20,
        class_names=["cat"],
        encoder=lambda phrases: torch.stack([texts[t] for t in phrases]),
        embeddings=data,
        min_activation=0.05,
    )
    assert kept.names == ["crimson"]
    assert report.dropped["The cat"] == "spells class 'cat'"  # removed as text
    assert report.dropped["cat-like"].startswith("similarity 0.99 to class 'cat'")
    # Of a near-duplicate pair, the less general phrase (smaller summed similarity) goes.
    assert report.dropped["red"].startswith("similarity 0.99 to 'crimson'")
    assert report.dropped["an extremely long concept phrase"].startswith("longer than 20")
    assert report.dropped["never seen"].startswith("top-5 activation")


def test_near_duplicates_go_before_the_activation_filter():
    """The reference's order: one of a near-duplicate pair goes, then the data filter runs."""
    vectors = torch.tensor(
        [[1.0, 0.0, 0.0], [0.98, 0.2, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    )
    bank = ConceptBank(["red", "crimson", "purple", "blue", "green"], vectors)
    data = torch.tensor([[1.0, 0.0, 0.0]] * 5 + [[0.0, 1.0, 0.0]] * 5)
    kept, report = filter_concepts(bank, embeddings=data, min_activation=0.99)
    # crimson is more general than red (closer to purple and green), so red goes as its
    # duplicate; then crimson is too weak on the data. (The data filter first keeps red.)
    assert report.dropped["red"] == "similarity 0.98 to 'crimson'"
    assert report.dropped["crimson"].startswith("top-5 activation 0.980 <= 0.99")
    assert kept.names == ["green"]


def test_weighted_encoders_average_their_cosines_as_mpnet_plus_three_clip():
    """Label-free CBM's text similarity: (mpnet + 3 * CLIP) / 4."""
    first = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 1.0])}
    second = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([1.0, 0.0])}
    mpnet = lambda texts: torch.stack([first[t] for t in texts])  # noqa: E731
    clip = lambda texts: torch.stack([second[t] for t in texts])  # noqa: E731
    bank = ConceptBank(["a", "b"], torch.eye(2))
    # cos(a, b) is 0 for mpnet and 1 for CLIP: (0 + 3 * 1) / 4 = 0.75.
    _, report = filter_concepts(bank, encoder=[(mpnet, 1), (clip, 3)], mutual_similarity=0.75)
    assert list(report.dropped.values()) == ["similarity 0.75 to 'a'"]
    kept, _ = filter_concepts(bank, encoder=[(mpnet, 1), (clip, 3)], mutual_similarity=0.76)
    assert kept.names == ["a", "b"]


def test_filtering_everything_is_a_typed_error_naming_the_fix():
    bank = ConceptBank(["a rather long phrase"], torch.ones(1, 3))
    with pytest.raises(EmptyConceptBankError, match="loosen max_length"):
        filter_concepts(bank, max_length=5)
    with pytest.raises(EmptyConceptBankError, match="at least one concept"):
        ConceptBank([], torch.zeros(0, 3))


def test_unknown_concept_and_wrong_width_errors():
    bank = ConceptBank(["stripes", "spots"], torch.randn(2, 8))
    with pytest.raises(UnknownConceptError, match="similar names: \\['stripes'\\]"):
        bank.index("stripe")
    with pytest.raises(ShapeMismatchError, match="width 5 but the concept bank .* width 8"):
        bank.similarity(torch.randn(3, 5))


def test_save_load_round_trip(tmp_path):
    intercepts = torch.tensor([0.0, -1.5])
    bank = ConceptBank(
        ["é accent", "b"], torch.randn(2, 8), ["text", "cav"], {"encoder": "x"}, intercepts
    )
    bank.save(tmp_path / "bank")
    loaded = ConceptBank.load(tmp_path / "bank")
    assert loaded.names == bank.names and loaded.sources == bank.sources
    assert loaded.metadata == {"encoder": "x"}
    assert torch.equal(loaded.vectors, bank.vectors)
    assert torch.equal(loaded.intercepts, intercepts)
    assert torch.equal(loaded.select(["b"]).intercepts, intercepts[1:])
    # A bank saved before intercepts were kept reads with intercept 0.
    save_file({"vectors": bank.vectors}, str(tmp_path / "bank" / "concepts.safetensors"))
    assert torch.equal(ConceptBank.load(tmp_path / "bank").intercepts, torch.zeros(2))
    assert sorted(p.name for p in (tmp_path / "bank").iterdir()) == [
        "concepts.json",
        "concepts.safetensors",
    ]
    (tmp_path / "bank" / "concepts.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CorruptFileError):
        ConceptBank.load(tmp_path / "bank")
