"""The autointerp eval: a seeded sample of planted latents, real vs shuffled scores, the CLI."""

from __future__ import annotations

import json

import pytest

from lightning_interp.cli import run_extra_command
from lightning_interp.errors import ConfigError
from lightning_interp.evals.autointerp import run as run_autointerp_eval
from lightning_interp.evals.autointerp import sample_latents
from lightning_interp.evals.model_index import eval_results
from lightning_interp.evals.registry import EvalContext, available_evals
from tests.autointerp.planted import (
    PLANTED,
    PlantedExplainer,
    chat_model,
    chat_tokenizer,
    explanation,
    planted_backbone,
    planted_dictionary,
)
from tests.autointerp.test_endpoint import server  # noqa: F401 - the loopback chat server
from tests.data.test_tokens import random_texts
from tests.features.test_command import trained  # noqa: F401 - the shared fixture


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    text = tmp_path_factory.mktemp("text") / "corpus.txt"
    text.write_text("\n".join(random_texts(60, low=10, high=30)), encoding="utf-8")
    backbone = planted_backbone()
    options = {"autointerp_latents": 4, "autointerp_tokens": 1500, "embedding_model": "none"}
    return EvalContext(
        planted_dictionary(backbone), backbone, "embeddings", str(text), 16, options=options
    )


def test_real_explanations_beat_shuffled_ones_on_planted_latents(context):
    result = run_autointerp_eval(context, model=PlantedExplainer(), n_explain=4, n_test=4)
    metrics, settings = result["metrics"], result["settings"]
    # Only the planted latents fire; 4 of them are drawn with the seed.
    assert len(settings["latent_ids"]) == metrics["latents"] == 4
    assert set(settings["latent_ids"]) <= set(range(len(PLANTED)))
    for latent, entry in result["latents"].items():
        assert entry["explanation"] == explanation(PLANTED[int(latent)])
        assert entry["shuffled_from"] != int(latent)
    # The true explanation separates the latent's contexts perfectly; another latent's does not.
    for scorer in ("detection", "fuzz"):
        assert metrics[f"{scorer}_auroc"] == pytest.approx(1.0)
        assert metrics[f"{scorer}_auroc_shuffled"] < 0.7
        assert metrics[f"{scorer}_accuracy"] > metrics[f"{scorer}_accuracy_shuffled"]
    assert "embedding_auroc" not in metrics and settings["scorers"] == ["detection", "fuzz"]
    assert settings["text"] == context.text and 0 < settings["token_window"] <= 1500
    assert settings["explainer"] == "planted-explainer" and settings["store"] is None
    # The summary feeds the model-index: real and shuffled side by side.
    index = {r.metric_type: r.metric_value for r in eval_results({"evals": {"autointerp": result}})}
    assert index["autointerp/detection_auroc"] == pytest.approx(1.0)
    assert index["autointerp/detection_auroc_shuffled"] == metrics["detection_auroc_shuffled"]


def test_the_sample_is_seeded_and_needs_two_latents():
    count = [0, 12, 30, 9, 15, 40, 11]
    first = sample_latents(count, 3, seed=0, min_count=10)
    assert first == sample_latents(count, 3, seed=0, min_count=10)
    assert set(first) <= {1, 2, 4, 5, 6} and len(first) == 3
    assert {tuple(sample_latents(count, 3, s, 10)) for s in range(8)} != {tuple(first)}
    assert sample_latents(count, 50, seed=0, min_count=10) == [1, 2, 4, 5, 6]
    with pytest.raises(ConfigError, match="autointerp-tokens"):
        sample_latents(count, 3, seed=0, min_count=35)


def test_unknown_options_are_refused(context):
    bad = EvalContext(**{**context.__dict__, "options": {"explainr": "x"}})
    with pytest.raises(ConfigError, match="explainr"):
        run_autointerp_eval(bad, model=PlantedExplainer())


def test_the_eval_asks_an_openai_compatible_endpoint(context, server):  # noqa: F811
    url, _, _, requests = server
    options = {**context.options, "explainer_endpoint": url, "explainer": "tiny"}
    endpoint = EvalContext(**{**context.__dict__, "options": options})
    before = len(requests)
    result = run_autointerp_eval(endpoint, n_explain=2, n_test=2, max_new_tokens=3)
    assert result["settings"]["explainer"] == f"{url} (tiny)"
    asked = requests[before:]
    # 4 explanations, then per latent 2 kinds x 2 scorers x (2 + 2) yes/no questions.
    assert len(asked) == 4 + 4 * 2 * 2 * 4
    assert {path for path, _ in asked} == {"/v1/chat/completions"}
    assert {body["model"] for _, body in asked} == {"tiny"}
    assert result["metrics"]["latents"] == 4


def test_evaluate_runs_autointerp_with_a_saved_transformers_explainer(trained, capsys):  # noqa: F811
    model_dir = trained / "tiny-chat"
    chat_model().save_pretrained(model_dir)
    chat_tokenizer().save_pretrained(model_dir)
    out, store = trained / "results.json", trained / "kept-store"
    argv = ["evaluate", str(trained / "dictionary"), "--evals", "autointerp", "--quiet"]
    argv += ["--explainer", str(model_dir), "--embedding-model", "none", "--out", str(out)]
    argv += ["--autointerp-latents", "2", "--autointerp-tokens", "200"]
    assert "autointerp" in available_evals()
    assert run_extra_command(argv[0], [*argv[1:], "--autointerp-store", str(store)]) == 0
    block = json.loads(out.read_text())["evals"]["autointerp"]
    assert block["metrics"]["latents"] == 2 == len(block["latents"])
    assert block["settings"]["explainer"] == str(model_dir)
    assert block["settings"]["token_window"] == 200
    for key in ("detection_auroc", "detection_auroc_shuffled", "fuzz_accuracy_shuffled"):
        value = block["metrics"][key]
        assert value is None or 0.0 <= value <= 1.0, key
    # The kept store holds the explanations the dashboard shows.
    notes = json.loads((store / "explanations.json").read_text())
    assert set(notes) == set(block["latents"])
    # Same seed, same latents and numbers: a rerun on the kept store resumes to the same result.
    again = trained / "again.json"
    argv[argv.index(str(out))] = str(again)
    assert run_extra_command(argv[0], [*argv[1:], "--autointerp-store", str(store)]) == 0
    assert json.loads(again.read_text())["evals"]["autointerp"]["latents"] == block["latents"]
    assert run_extra_command(argv[0], [*argv[1:], "--autointerp-latents", "0"]) == 2
    assert "--autointerp-latents must be positive" in capsys.readouterr().err
