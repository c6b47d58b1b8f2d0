"""FeatureDashboard: the tiny quickstart recipe ends with a store and a dashboard."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from lightning_interp.callbacks import FeatureDashboard
from lightning_interp.errors import ConfigError
from tests.test_recipes import make_tiny_world, quiet_one_thread, run_recipe, tiny_recipe

__all__ = ["quiet_one_thread"]  # the recipe tests' fixture: one thread, a clean argv

TOKENS = 96


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    return make_tiny_world(tmp_path_factory.mktemp("tiny-world"), documents=40)


def quickstart(tiny_world, run, features: bool, name: str = "quickstart.yaml") -> dict:
    """The tiny recipe ``name``, with the feature callback over ``TOKENS`` tokens or without."""
    recipe = tiny_recipe(name, tiny_world, run)
    callbacks = recipe["trainer"]["callbacks"]
    (feature,) = [c for c in callbacks if c["class_path"].endswith(".FeatureDashboard")]
    if features:
        feature["init_args"]["tokens"] = TOKENS  # the recipe's budget is an init arg
    else:
        callbacks.remove(feature)
    return recipe


def test_fit_ends_with_a_store_and_a_dashboard_listing_the_latents(tiny_world, tmp_path, capsys):
    run = tmp_path / "run"
    recipe = quickstart(tiny_world, run, features=True)
    run_recipe(recipe, tmp_path / "recipe.yaml")
    store = json.loads((run / "features" / "store.json").read_text())
    assert store["corpus"]["tokens"] == TOKENS
    assert store["dictionary"]["d_latent"] == 128
    assert store["dictionary"]["site"] == "layers.2.resid_post"  # quickstart's layers.6, mod 4
    stats = load_file(run / "features" / "stats.safetensors")
    assert stats["count"].sum() > 0  # latents fired over the pass
    index = run / "dashboard" / "index.html"
    printed = capsys.readouterr().out
    assert f"dashboard: {index.resolve()}" in printed.splitlines()
    # The index lists every latent of the dictionary, each linking to its own page.
    html = index.read_text(encoding="utf-8")
    block = re.search(r'id="latent-data"[^>]*>(.*?)</script>', html, re.S).group(1)
    rows = json.loads(block)["rows"]
    assert [row[0] for row in rows] == list(range(128))
    assert [row[1] for row in rows] == stats["count"].tolist()
    assert {int(p.stem) for p in (run / "dashboard" / "latents").glob("*.html")} == set(range(128))


def test_the_callback_leaves_training_unchanged(tiny_world, tmp_path):
    finals = []
    for features in (False, True):
        run = tmp_path / str(features)
        cli = run_recipe(quickstart(tiny_world, run, features), tmp_path / f"{features}.yaml")
        metrics = json.loads((run / "metrics.json").read_text())
        metrics.pop("run_id")
        weights = load_file(run / "dictionary" / "model.safetensors")
        # Every logged number but the wall-clock throughputs (tokens/s).
        logged = {
            k: float(v)
            for k, v in cli.trainer.callback_metrics.items()
            if "per_second" not in k and k != "tok/s"
        }
        finals.append((metrics, weights, logged))
        assert (run / "features").exists() == features
    (m0, w0, l0), (m1, w1, l1) = finals
    # Same seed, same data, same arithmetic: the pass runs after fit, on copies.
    assert m0 == m1 and l0 == l1
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)


def test_each_dictionary_of_a_multi_dictionary_run_gets_its_own(tiny_world, tmp_path, capsys):
    recipe = tiny_recipe("multi_dictionary.yaml", tiny_world, tmp_path / "run")
    recipe["trainer"]["callbacks"].append(
        {"class_path": "lightning_interp.callbacks.FeatureDashboard", "init_args": {"tokens": 64}}
    )
    run_recipe(recipe, tmp_path / "recipe.yaml")
    names = list(recipe["model"]["init_args"]["dictionaries"])
    printed = capsys.readouterr().out
    for name in names:
        folder = tmp_path / "run" / name
        assert json.loads((folder / "features" / "store.json").read_text())["corpus"]["tokens"]
        assert f"dashboard: {(folder / 'dashboard' / 'index.html').resolve()}" in printed


@pytest.mark.parametrize("bad", [{"tokens": 0}, {"top_k": -1}, {"latents": 0}])
def test_non_positive_settings_are_refused(bad):
    with pytest.raises(ConfigError, match="must be positive"):
        FeatureDashboard(**bad)
