"""Publish to and load from a loopback Hub with the real huggingface_hub client."""

import pytest
import torch
from huggingface_hub import hf_hub_download

from lightning_interp import Dictionary, load_dictionary
from lightning_interp.errors import SiteSelectionError
from lightning_interp.zoo.formats import write_folder
from lightning_interp.zoo.publish import publish_run, render_card
from tests.zoo.helpers import assert_same_weights, make_sae, write_run

METRICS = {
    "fvu": 0.125,
    "l0": 4.0,
    "dead_fraction": 0.0625,
    "ce_loss_recovered": 0.9,
    "tokens_trained": 20000,
}


def test_push_then_pull_gives_equal_tensors_and_a_card(hub):
    sae = make_sae()
    result = sae.push_to_hub("org/one", metrics=METRICS, card_data={"license": "apache-2.0"})
    assert result.commit == hub.state.repos["org/one"].branches["main"]

    loaded = Dictionary.from_pretrained("org/one")
    assert_same_weights(sae, loaded)
    x = torch.randn(5, 8)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))
    assert loaded.config.provenance.revision == result.commit
    assert loaded.config.provenance.site == "layers.1.resid_post"

    readme = open(hf_hub_download("org/one", "README.md")).read()
    assert "library_name: lightning-interp" in readme
    assert "license: apache-2.0" in readme
    assert "- topk" in readme and "- sparse-autoencoder" in readme
    assert "base_model: gpt2" in readme
    assert "model-index:" in readme and "value: 0.125" in readme
    assert 'load_dictionary("org/one")' in readme


def test_publish_run_is_one_commit_with_a_folder_per_site(hub, tmp_path):
    saes = {
        "a": make_sae("layers.0.resid_post", seed=1),
        "b": make_sae("layers.2.resid_post", seed=2),
    }
    run = write_run(tmp_path / "run", saes, {"a": METRICS})
    (run / "config.yaml").write_text("trainer:\n  max_steps: 100\n")  # LightningCLI's config
    repo_before = 0
    result = publish_run(run, "org/run")
    repo = hub.state.repos["org/run"]
    assert len(repo.history) == repo_before + 2  # the repo's initial commit, then ONE publish
    files = set(repo.commits[result.commit])
    assert {
        "README.md",
        "layers.0.resid_post/config.json",
        "layers.0.resid_post/model.safetensors",
        "layers.0.resid_post/metrics.json",
        "layers.2.resid_post/config.json",
        "layers.2.resid_post/model.safetensors",
        "training_config.yaml",
    } <= files
    commits = [m for m, p in hub.state.requests if m == "POST" and "/commit/" in p]
    assert len(commits) == 1

    # The card is the same text `lightning-interp card` renders locally.
    readme = repo.commits[result.commit]["README.md"].content.decode()
    assert readme == render_card(run, repo_id="org/run")
    assert "max_steps: 100" in readme
    assert (
        "| layers.0.resid_post | `layers.0.resid_post` | topk | 8 | 32 | 4 | 20,000 | 0.125 |"
        in readme
    )

    with pytest.raises(SiteSelectionError, match="layers.0.resid_post, layers.2.resid_post"):
        load_dictionary("org/run")
    assert_same_weights(load_dictionary("org/run", site="layers.2.resid_post"), saes["b"])


def test_republishing_a_folder_replaces_files_of_another_format(hub, tmp_path):
    old = make_sae("layers.4.resid_post", seed=5)
    folder = write_folder(old, tmp_path / "old", format="saelens")
    hub.add_files(
        "org/mixed", {f"layers.4.resid_post/{p.name}": p.read_bytes() for p in folder.iterdir()}
    )
    new = make_sae("layers.4.resid_post", seed=6)
    result = new.push_to_hub("org/mixed", site="layers.4.resid_post")
    files = {
        p for p in hub.state.repos["org/mixed"].commits[result.commit] if p.startswith("layers.4")
    }
    assert files == {"layers.4.resid_post/config.json", "layers.4.resid_post/model.safetensors"}
    assert_same_weights(load_dictionary("org/mixed", site="layers.4.resid_post"), new)
