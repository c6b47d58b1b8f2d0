"""Evaluation results in model cards: ``--evaluation``, ``evaluation.json``, the Hub parser."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import ModelCard, hf_hub_download, metadata_load

from lightning_interp.cli import run_extra_command
from lightning_interp.errors import ConfigError
from lightning_interp.zoo.publish import publish_run, render_card
from tests.zoo.helpers import make_sae, write_run

SITE = "layers.1.resid_post"


def evaluation(site: str = SITE, autointerp: bool = True) -> dict:
    """An evaluate JSON with the keys ``lightning-interp evaluate`` writes."""
    evals = {
        "core": {
            "metrics": {"explained_variance": 0.859, "l0": 32.0, "ce_loss_recovered": 0.925},
            "settings": {"text": "offline:wikipedia", "token_window": 4096},
        },
        "sparse_probing": {
            "metrics": {"llm_test_accuracy": 0.799, "sae_top_1_test_accuracy": 0.605},
            "settings": {"tasks": {"polarity": "offline:polarity"}},
        },
    }
    if autointerp:
        evals["autointerp"] = {
            "metrics": {
                "latents": 8,
                "detection_auroc": 0.61,
                "detection_auroc_shuffled": 0.48,
                "detection_accuracy": 0.6,
                "detection_accuracy_shuffled": 0.5,
                "fuzz_auroc": 0.55,
                "fuzz_auroc_shuffled": 0.52,
                "embedding_auroc": 0.7,
                "embedding_auroc_shuffled": 0.45,
            },
            "settings": {
                "text": "offline:wikipedia",
                "token_window": 8192,
                "explainer": "offline:smollm2",
                "embedding_model": "offline:minilm",
                "latent_sample": "drawn with seed 0 among the latents with 10+ firings",
            },
        }
    return {"site": site, "backbone": "gpt2", "seed": 0, "evals": evals}


def model_index(card_text: str) -> dict[str, float]:
    """``{metric type: value}`` as huggingface_hub's own card parser reads the model-index."""
    results = ModelCard(card_text).data.eval_results
    return {r.metric_type: r.metric_value for r in results}


def test_card_command_takes_an_evaluation_and_the_hub_parser_reads_it(tmp_path, capsys):
    make_sae(SITE).save_pretrained(tmp_path / "dictionary")
    (tmp_path / "results.json").write_text(json.dumps(evaluation()))
    out = tmp_path / "README.md"
    argv = [str(tmp_path / "dictionary"), "--evaluation", str(tmp_path / "results.json")]
    assert run_extra_command("card", [*argv, "--repo-id", "org/sae", "-o", str(out)]) == 0
    metrics = model_index(out.read_text())
    assert metrics["core/ce_loss_recovered"] == 0.925
    assert metrics["sparse_probing/sae_top_1_test_accuracy"] == 0.605
    assert metrics["autointerp/detection_auroc"] == 0.61
    assert metrics["autointerp/detection_auroc_shuffled"] == 0.48
    assert metrics["autointerp/embedding_auroc"] == 0.7
    header = metadata_load(out)
    names = {r["dataset"]["name"] for r in header["model-index"][0]["results"]}
    assert "offline:wikipedia (8192 tokens), 8 sampled latents" in names
    text = out.read_text()
    assert "## Evaluation" in text and "| core | CE loss recovered | 0.925 |" in text
    assert "### Auto-interpretation" in text and "`offline:smollm2`" in text
    assert "| Detection | 0.61 | 0.48 | 0.6 | 0.5 |" in text
    assert "| Fuzzing | 0.55 | 0.52 | – | – |" in text


def test_an_evaluation_json_beside_the_weights_is_picked_up(tmp_path):
    run = write_run(tmp_path / "run", {"a": make_sae(SITE)})
    plain = render_card(run, repo_id="org/run")
    assert "## Evaluation" not in plain and "core/l0" not in plain
    (run / "a" / "evaluation.json").write_text(json.dumps(evaluation(autointerp=False)))
    card = render_card(run, repo_id="org/run")
    assert model_index(card)["core/l0"] == 32.0
    assert "## Evaluation" in card and "### Auto-interpretation" not in card


def test_a_multi_site_run_needs_the_evaluation_to_name_one_site(tmp_path, capsys):
    run = write_run(tmp_path / "run", {"a": make_sae(SITE), "b": make_sae("layers.3.resid_post")})
    path = tmp_path / "results.json"
    path.write_text(json.dumps(evaluation(site="layers.3.resid_post")))
    card = render_card(run, repo_id="org/run", evaluation=path)
    assert "### `layers.3.resid_post`" in card and "### `layers.1.resid_post`" not in card
    path.write_text(json.dumps(evaluation(site="layers.9.resid_post")))
    with pytest.raises(ConfigError, match="evaluation.json in each"):
        render_card(run, repo_id="org/run", evaluation=path)
    path.write_text(json.dumps({"not": "an evaluation"}))
    assert run_extra_command("card", [str(run), "--evaluation", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no 'evals' object" in err


def test_publish_uploads_evaluation_json_and_the_card_shows_it(hub, tmp_path):
    run = write_run(tmp_path / "run", {"a": make_sae(SITE)})
    path = tmp_path / "results.json"
    path.write_text(json.dumps(evaluation()))
    result = publish_run(run, "org/evaluated", evaluation=path)
    files = hub.state.repos["org/evaluated"].commits[result.commit]
    assert json.loads(files[f"{SITE}/evaluation.json"].content) == evaluation()
    readme = hf_hub_download("org/evaluated", "README.md")
    assert model_index(open(readme).read())["autointerp/fuzz_auroc_shuffled"] == 0.52
    # Publishing another site to the same repo keeps the first one's evaluation in the card.
    publish_run({"layers.5.resid_post": make_sae("layers.5.resid_post")}, "org/evaluated")
    readme = hf_hub_download("org/evaluated", "README.md")
    card = open(readme).read()
    assert model_index(card)["core/ce_loss_recovered"] == 0.925
    assert f"### `{SITE}`" in card and "### Auto-interpretation" in card
