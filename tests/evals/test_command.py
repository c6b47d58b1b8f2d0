"""``lightning-interp evaluate`` end to end on a tiny dictionary folder with provenance."""

from __future__ import annotations

import json

import yaml

from lightning_interp.cli import run_extra_command
from lightning_interp.evals.model_index import eval_results
from lightning_interp.zoo.card import CardEntry, build_card
from tests.features.test_command import trained  # noqa: F401 - the shared fixture


def main(argv):
    return run_extra_command(argv[0], argv[1:])


def test_unknown_or_repeated_eval_names_exit_2_before_loading(tmp_path, capsys):
    missing = str(tmp_path / "no-such-dictionary")
    for spec in ("core,nonsense", "core,core", ","):
        assert main(["evaluate", missing, "--evals", spec]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--evals" in err or "unknown eval" in err


def test_evaluate_writes_a_json_naming_data_settings_and_seed(trained, capsys):  # noqa: F811
    out = trained / "results.json"
    argv = ["evaluate", str(trained / "dictionary"), "--evals", "core,sparse_probing"]
    assert main([*argv, "--tokens", "64", "--seed", "3", "--out", str(out), "--quiet"]) == 0
    results = json.loads(out.read_text())
    assert results["seed"] == 3 and results["site"] == "layers.1.resid_post"
    core = results["evals"]["core"]
    assert core["settings"]["token_window"] == 64 == core["metrics"]["tokens"]
    assert core["settings"]["text"].endswith("corpus.txt")
    probing = results["evals"]["sparse_probing"]
    assert set(probing["settings"]["tasks"]) == {"polarity", "chat_topics"}
    assert probing["settings"]["k_values"] == [1, 2, 5, 20]
    assert 0.0 <= probing["metrics"]["sae_top_1_test_accuracy"] <= 1.0
    assert not list(trained.glob("results.json.*"))  # atomic: no temporary left behind

    # The JSON becomes the card's model-index.
    config = json.loads((trained / "dictionary" / "config.json").read_text())
    card = build_card(
        [CardEntry("", config, {"fvu": 0.25})],
        repo_id="org/tiny",
        eval_results=eval_results(results),
    )
    header = yaml.safe_load(str(card).split("---")[1])
    metrics = {
        m["type"]: m["value"] for r in header["model-index"][0]["results"] for m in r["metrics"]
    }
    assert metrics["fvu"] == 0.25  # the training metrics stay beside the eval's
    assert metrics["core/l0"] == core["metrics"]["l0"]
    assert (
        metrics["sparse_probing/sae_top_1_test_accuracy"]
        == (probing["metrics"]["sae_top_1_test_accuracy"])
    )


def test_absorption_needs_word_tokens_and_says_so(trained, capsys):  # noqa: F811
    argv = ["evaluate", str(trained / "dictionary"), "--evals", "absorption", "--quiet"]
    assert main(argv) == 2
    assert "single alphabetic tokens" in capsys.readouterr().err
