"""Scorers on latents whose meaning is known by construction (planted single-token latents)."""

from __future__ import annotations

import pytest

from lightning_interp.autointerp.prompts import (
    Context,
    explain_messages,
    highlight,
    parse_explanation,
)
from lightning_interp.autointerp.run import ExplainSettings, latent_examples, non_activating
from lightning_interp.autointerp.scorers import (
    EmbeddingScorer,
    detection,
    fuzz,
    fuzz_texts,
    summarise,
)
from lightning_interp.features.layout import read_store
from tests.autointerp.planted import PLANTED, KeywordReader, explanation, planted_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return read_store(planted_store(tmp_path_factory.mktemp("planted") / "store"))


def _sets(store, latent):
    _, test = latent_examples(store, latent, ExplainSettings(n_test=6))
    return test, non_activating(store, latent, test, len(test), seed=0)


def test_highlight_and_parse_follow_delphi():
    c = Context([" a", " b", " c", " d"], [0.0, 1.0, 0.5, 0.1])
    assert c.marks() == [False, True, True, False]  # >= 0.3 x max
    assert highlight(c.tokens, c.marks()) == " a<< b c>> d"
    assert parse_explanation("thinking...\n[EXPLANATION]: Dates.\n") == "Dates."
    assert parse_explanation("The word cat.\nMore text") == "The word cat."


def test_explainer_prompts_show_the_latents_marked_tokens(store):
    shown, _ = latent_examples(store, 0, ExplainSettings(n_explain=3))
    contexts = explain_messages(shown)[-1]["content"]
    assert contexts.count("<< w3>>") >= 3 and contexts.startswith("Example 1: ")
    words = explain_messages(shown, "words")
    assert [m["role"] for m in words] == ["system", "user"]
    assert words[-1]["content"].startswith("WORDS: ['w3', 'w3', 'w3']")


def test_non_activating_contexts_never_hold_the_latents_token(store):
    for j, word in enumerate(PLANTED):
        test, others = _sets(store, j)
        assert test and len(others) == len(test)
        assert all(f" w{word}" in c.tokens for c in test)
        assert not any(f" w{word}" in c.tokens for c in others)


def test_fuzz_highlights_the_token_in_activating_and_random_tokens_elsewhere(store):
    test, others = _sets(store, 0)
    texts = fuzz_texts(test, others, seed=0)
    assert all("<< w3>>" in t for t in texts[: len(test)])
    assert all(t.count("<<") >= 1 and "<< w3>>" not in t for t in texts[len(test) :])


@pytest.mark.parametrize("scorer", [detection, fuzz])
def test_real_explanations_beat_shuffled_ones_for_an_ideal_reader(store, scorer):
    reader = KeywordReader()
    shuffled = []
    for j, word in enumerate(PLANTED):
        test, others = _sets(store, j)
        real = scorer(reader, explanation(word), test, others)
        assert real["auroc"] == 1.0 and real["accuracy"] == 1.0  # 0/1 answers: exact ranks
        wrong = PLANTED[(j + 1) % len(PLANTED)]
        shuffled.append(scorer(reader, explanation(wrong), test, others)["auroc"])
    # Another latent's word shows up in random text now and then: near chance, never perfect.
    assert max(shuffled) < 1.0 and sum(shuffled) / len(shuffled) <= 0.6


def test_minilm_embedding_scores_real_explanations_above_shuffled(store):
    scorer = EmbeddingScorer.load("offline:minilm")
    real, shuffled = [], []
    for j, word in enumerate(PLANTED):
        test, others = _sets(store, j)
        real.append(scorer.score(explanation(word), test, others)["auroc"])
        wrong = PLANTED[(j + 1) % len(PLANTED)]
        shuffled.append(scorer.score(explanation(wrong), test, others)["auroc"])
    print(real, shuffled)
    assert sum(real) / len(real) > sum(shuffled) / len(shuffled) + 0.2


def test_summarise_auroc_and_accuracy():
    out = summarise([0.9, 0.8, 0.2, 0.6], [True, True, False, False])
    assert out == {"auroc": 1.0, "accuracy": 0.75, "n": 4}
    assert summarise([3.0, 1.0, 2.0, 0.0], [True, False, True, False], None)["accuracy"] == 1.0
    assert summarise([0.5, 0.5], [True, True])["auroc"] is None  # one class: no AUROC
