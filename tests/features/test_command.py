"""``lightning-interp features`` end to end on a dictionary folder with provenance."""

from __future__ import annotations

import dataclasses

import pytest

from lightning_interp.cli import run_extra_command
from lightning_interp.dictionaries.config import Provenance
from lightning_interp.dictionaries.serialization import save_dictionary
from lightning_interp.features.layout import read_store
from tests.features.builder_helpers import SITE, tiny_setup


def main(argv):
    return run_extra_command(argv[0], argv[1:])


@pytest.fixture
def trained(tmp_path):
    """A dictionary folder whose provenance names a loadable backbone folder and text file."""
    backbone, sae, corpus = tiny_setup(documents=20)
    model_dir, text = tmp_path / "model", tmp_path / "corpus.txt"
    backbone.model.save_pretrained(model_dir)
    backbone.tokenizer.save_pretrained(model_dir)
    text.write_text("\n".join(corpus.texts), encoding="utf-8")
    provenance = Provenance(
        backbone="org/tiny-llama",
        site=SITE,
        dataset="corpus",
        context_size=16,
        extra={"backbone_source": str(model_dir), "dataset_source": str(text)},
    )
    sae.config = dataclasses.replace(sae.config, provenance=provenance)
    save_dictionary(sae, tmp_path / "dictionary")
    return tmp_path


def test_features_command_needs_no_flag_beyond_provenance(trained, capsys):
    out = trained / "store"
    code = main(
        [
            "features",
            str(trained / "dictionary"),
            "--out",
            str(out),
            "--tokens",
            "200",
            "--top-k",
            "3",
            "--window",
            "5",
            "--quiet",
        ]
    )
    assert code == 0, capsys.readouterr().err
    store = read_store(out)
    meta = store["meta"]
    assert meta["corpus"] == {
        "dataset": str(trained / "corpus.txt"),
        "tokens": 200,
        "context_size": 16,
    }
    assert meta["dictionary"]["site"] == SITE and meta["dictionary"]["backbone"] == "org/tiny-llama"
    assert store["contexts"]["top_tokens"].shape[1:] == (3, 5)
    assert int(store["stats"]["count"].sum()) == 200 * 3  # k=3 firings per kept token


def test_features_command_errors_are_one_line_exit_2(trained, capsys):
    out = trained / "store"
    out.mkdir()
    assert main(["features", str(trained / "dictionary"), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lightning-interp features: error:") and "exists" in err
    assert "\n" not in err
    assert main(["features", str(trained / "nothing"), "--out", str(trained / "x")]) == 2
    assert (
        main(["features", str(trained / "dictionary"), "--out", str(trained / "y"), "--top-k", "0"])
        == 2
    )
    assert "--top-k must be positive" in capsys.readouterr().err
