"""Absorption on planted cases: a word whose letter latent is replaced by a token latent."""

from __future__ import annotations

import pytest
import torch

from lightning_interp.evals.absorption import (
    AbsorptionSettings,
    absorption_for_word,
    alpha_tokens,
    score_letters,
)


def test_absorption_for_one_word_follows_saebench_cases():
    cos = torch.tensor([1.0, 0.6, 0.0, 0.05], dtype=torch.float64)
    main = [0]
    # The letter latent fires fully: no absorption.
    assert absorption_for_word(1.0, torch.tensor([1.0, 0, 0, 0]).double(), cos, main) == (
        0.0,
        False,
    )
    # It is silent and an aligned latent carries the projection: full absorption.
    fraction, full = absorption_for_word(1.0, torch.tensor([0, 1 / 0.6, 0, 0]).double(), cos, main)
    assert fraction == pytest.approx(1.0) and full
    # Half each: partial absorption (fraction 0.5), not full (the main latent fired).
    fraction, full = absorption_for_word(
        1.0, torch.tensor([0.5, 0.5 / 0.6, 0, 0]).double(), cos, main
    )
    assert fraction == pytest.approx(0.5) and not full
    # A latent too weakly aligned (cos 0.05 < 0.1) cannot absorb fractionally.
    fraction, _ = absorption_for_word(1.0, torch.tensor([0, 0, 0, 20.0]).double(), cos, main)
    assert fraction == 0.0


def _planted_words(seed: int = 0):
    """Three letters along e0, e1, e2 with one main latent each; in the test split, 4 of the
    30 'a' words lose their letter latent to a latent of their own token (decoder aligned
    with e0 and a token direction), as Chanin et al. describe absorption."""
    generator = torch.Generator().manual_seed(seed)
    d, d_latent = 32, 16
    decoder = torch.zeros(d_latent, d)
    decoder[0, 0] = decoder[1, 1] = decoder[2, 2] = 1.0
    for j in range(4):  # token latents 10..13: e0 + e_{10+j}, normalised
        decoder[10 + j, 0] = decoder[10 + j, 10 + j] = 2**-0.5

    def words(n_per_letter: int, absorbed: int):
        letters = torch.arange(3).repeat_interleave(n_per_letter)
        codes = torch.zeros(len(letters), d_latent)
        codes[torch.arange(len(letters)), letters] = 3.0
        for j in range(absorbed):
            codes[j, 0] = 0.0
            codes[j, 10 + j] = 3.0 * 2**0.5
        acts = codes @ decoder + 0.1 * torch.randn(len(letters), d, generator=generator)
        return acts, codes, letters

    return words(60, 0), words(30, 4), decoder


def test_score_letters_measures_the_planted_absorption_rate():
    train, test, decoder = _planted_words()
    result = score_letters(train, test, decoder, AbsorptionSettings())
    assert result["letters_evaluated"] == 3 and not result["valid"]  # SAEBench wants 20
    a = result["per_letter"]["a"]
    assert a["main_latents"] == [0]
    assert a["probe_true_positives"] == 30
    assert a["full_absorption_rate"] == pytest.approx(4 / 30)
    assert a["mean_absorption_fraction"] == pytest.approx(4 / 30)
    for letter in ("b", "c"):
        assert result["per_letter"][letter]["full_absorption_rate"] == 0.0
    assert result["mean_full_absorption_score"] == pytest.approx(4 / 90)
    assert result["mean_absorption_fraction_score"] == pytest.approx(4 / 90)


def test_alpha_tokens_keeps_single_alphabetic_tokens():
    from tests.data.test_tokens import make_tokenizer

    tokenizer = make_tokenizer()
    tokenizer.add_tokens(["apple", "Banana", "x1"])
    words = {text for _, text in alpha_tokens(tokenizer)}
    assert {"apple", "Banana"} <= words
    assert "x1" not in words and not any(w.startswith("w") for w in words)


def _word_backbone():
    import transformers as T

    from lightning_interp.backbones import Backbone
    from tests.backbones.tiny_models import SMALL
    from tests.data.test_tokens import make_tokenizer

    tokenizer = make_tokenizer()
    words = [f"{a}{b}{c}" for a in "abc" for b in "aeiou" for c in "nrt"]
    tokenizer.add_tokens(words)
    torch.manual_seed(0)
    config = T.LlamaConfig(num_hidden_layers=2, num_key_value_heads=2, vocab_size=128, **SMALL)
    return Backbone(T.LlamaForCausalLM(config), tokenizer), words


def test_word_activations_read_the_word_token_of_each_prompt():
    from lightning_interp.evals.absorption import word_activations
    from lightning_interp.evals.registry import EvalContext

    backbone, words = _word_backbone()
    site = "layers.1.resid_post"
    context = EvalContext(None, backbone, site, text="unused")
    chosen = [(backbone.tokenizer.convert_tokens_to_ids(w), w) for w in words[:5]]
    acts = word_activations(context, chosen, icl=["ban", "cot"], template="{word} is:")
    assert acts.shape == (5, 32)
    # The same prompt tokenized as text: the word is the token before " is :".
    text = "ban is: B\ncot is: C\n" + words[3] + " is:"
    ids = backbone.tokenizer(text, return_tensors="pt")["input_ids"]
    position = ids[0].tolist().index(chosen[3][0])
    direct = backbone.capture({"input_ids": ids}, site)[site][0, position]
    torch.testing.assert_close(acts[3], direct.float())


def test_absorption_eval_runs_on_a_tiny_backbone_and_names_its_settings():
    from lightning_interp import create_dictionary
    from lightning_interp.evals.absorption import run
    from lightning_interp.evals.registry import EvalContext

    backbone, words = _word_backbone()
    sae = create_dictionary("topk", d_in=32, d_latent=64, k=4)
    context = EvalContext(sae, backbone, "layers.1.resid_post", text="unused", seed=1)
    result = run(context, AbsorptionSettings(max_words=40, icl_examples=4))
    settings = result["settings"]
    assert settings["words"] == 40 and len(settings["icl_examples_words"]) == 4
    assert set(settings["icl_examples_words"]).isdisjoint(settings["evaluated_words"])
    metrics = result["metrics"]
    assert metrics["letters_evaluated"] == len(metrics["per_letter"])
