"""Every shipped recipe runs through the real CLI with its backbone swapped for a tiny one.

The recipe's YAML is kept as written (architecture, optimizer, schedules, callbacks,
precision, sites) except for what a tiny random model and a small text file force:
dictionary sizes, layer numbers, token budgets and paths. No recipe types a width (``d_in``,
``d_out``): the module takes them from the tiny model's sites at setup.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from lightning_interp import load_dictionary
from lightning_interp.cli import build_cli
from tests.backbones.tiny_models import build
from tests.data.test_tokens import make_tokenizer, random_texts

# Dictionary-training recipes (concept-head recipes are tested in tests/concepts).
RECIPES = sorted(
    p.name
    for p in Path("recipes").glob("*.yaml")
    if "DictionaryModule"
    in (yaml.safe_load(p.read_text()).get("model") or {}).get("class_path", "")
)
# Which tiny family stands in for each recipe's backbone.
FAMILY_OF_MODEL = {
    "offline:smollm2": "llama",
    "offline:minilm": "bert",
    "openai-community/gpt2": "gpt2",
    "EleutherAI/pythia-70m-deduped": "gpt_neox",
    "google/gemma-2-2b": "gemma2",
    "meta-llama/Llama-3.2-1B": "llama",
    "openai/clip-vit-base-patch32": "clip",
    "HuggingFaceTB/SmolVLM-256M-Instruct": "idefics3",
}
TINY_WIDTH = 32  # hidden size of every tiny model
TINY_LAYERS = 4


def make_tiny_world(root: Path, documents: int = 120) -> tuple[dict[str, Path], Path]:
    """Tiny models of each family saved under ``root``, and a text file of ``documents``."""
    folders = {}
    for family in set(FAMILY_OF_MODEL.values()):
        folder = root / family
        model = build(family)
        model.config.bos_token_id, model.config.eos_token_id = 1, 2
        model.save_pretrained(folder)
        if family != "clip":
            make_tokenizer().save_pretrained(folder)
        folders[family] = folder
    text = root / "texts.txt"
    text.write_text("\n".join(random_texts(documents, seed=0)) + "\n")
    return folders, text


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """Tiny models of each family saved to disk, and a small text file."""
    return make_tiny_world(tmp_path_factory.mktemp("tiny-world"))


def _shrink_dictionary_config(config: dict) -> None:
    config["d_latent"] = 128
    if "k" in config:
        config["k"] = min(config["k"], 8)
    if "aux_k" in config:
        config["aux_k"] = 16


def tiny_recipe(name: str, tiny_world, run_dir: Path) -> dict:
    """The recipe ``name`` rewritten for tiny models; returns the config dict."""
    folders, text = tiny_world
    source = Path("recipes", name).read_text()
    # Layers past the tiny models' four map into range (distinct layers stay distinct).
    source = re.sub(
        r"layers\.(\d+)\.", lambda m: f"layers.{int(m.group(1)) % TINY_LAYERS}.", source
    )
    recipe = yaml.safe_load(source)
    trainer = recipe["trainer"]
    trainer.update(
        accelerator="cpu",
        devices=1,
        default_root_dir=str(run_dir),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=8,
        limit_val_batches=2,
        max_epochs=1,
    )
    trainer.pop("val_check_interval", None)
    for config in dictionary_configs(recipe):
        _shrink_dictionary_config(config)
    data = recipe["data"]["init_args"]
    family = FAMILY_OF_MODEL[data["model"]]
    data["model"] = str(folders[family])
    if family == "clip":
        data.update(
            batch_size=64, buffer_tokens=512, images_per_capture=16, images="offline:digits"
        )
    elif family == "idefics3":  # a multimodal LLM: images with a caption of tiny-vocab words
        data.update(batch_size=64, buffer_tokens=512, images_per_capture=16, caption="w1 w2")
    else:
        data.update(
            text=str(text),
            context_size=16,
            batch_size=64,
            buffer_tokens=512,
            train_tokens=64 * 8,
            val_tokens=128,
            contexts_per_capture=8,
            downstream_contexts=4,
            val_fraction=0.1,
        )
        if "val_text" in data:
            data["val_text"] = str(text)
    return recipe


def run_recipe(recipe: dict, path: Path, *extra: str):
    path.write_text(yaml.safe_dump(recipe))
    return build_cli(["fit", "--config", str(path), *extra])


@pytest.fixture(autouse=True)
def quiet_one_thread(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-interp"])  # LightningCLI also reads argv
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_trains_and_exports(name, tiny_world, tmp_path):
    run = tmp_path / "run"
    recipe = tiny_recipe(name, tiny_world, run)
    cli = run_recipe(recipe, tmp_path / "recipe.yaml")
    assert cli.trainer.global_step == 8
    model_args = recipe["model"]["init_args"]
    names = list(model_args["dictionaries"]) if "dictionaries" in model_args else [None]
    causal = FAMILY_OF_MODEL[
        yaml.safe_load(Path("recipes", name).read_text())["data"]["init_args"]["model"]
    ] not in ("bert", "clip")
    downstream = any(
        "DownstreamMetrics" in callback["class_path"] for callback in recipe["trainer"]["callbacks"]
    )
    for member in names:
        folder = run if member is None else run / member
        spec = model_args["dictionary"] if member is None else model_args["dictionaries"][member]
        metrics = json.loads((folder / "metrics.json").read_text())
        dictionary = load_dictionary(folder / "dictionary")
        # Saved in inference form: BatchTopK-style models as JumpReLU, a variational TopK as
        # the TopK SAE of its posterior means.
        inference_forms = (spec["class_path"].rsplit(".", 1)[1], "JumpReLUSAE", "TopKSAE")
        assert type(dictionary).__name__ in inference_forms
        # The width of the site read (an MLP hidden site is wider than the residual stream).
        width = cli.datamodule.site_widths[dictionary.config.provenance.site]
        assert dictionary.d_in == width and dictionary.d_latent == 128
        assert dictionary.config.provenance.site is not None
        assert metrics["tokens_trained"] == 8 * 64 or "clip" in name
        # Eight tiny steps prove the wiring, not the quality (tests/dictionaries does that).
        assert torch.isfinite(torch.tensor(metrics["fvu"])) and metrics["l0"] > 0
        # Transcoders too: their output is spliced in at site_out.
        if downstream and causal:
            assert metrics["ce_loss_recovered"] is not None
        else:
            assert metrics["ce_loss_recovered"] is None


def dictionary_configs(recipe: dict) -> list[dict]:
    model_args = recipe["model"]["init_args"]
    dictionaries = model_args.get("dictionaries") or {"": model_args["dictionary"]}
    return [spec["init_args"]["config"] for spec in dictionaries.values()]


@pytest.mark.parametrize("name", RECIPES)
def test_no_recipe_types_a_width(name):
    # Widths come from the data module's sites at setup (ActivationSource.site_widths).
    recipe = yaml.safe_load(Path("recipes", name).read_text())
    for config in dictionary_configs(recipe):
        assert "d_in" not in config and "d_out" not in config, config


def test_transcoder_recipe_records_both_sites(tiny_world, tmp_path):
    recipe = tiny_recipe("pythia70m_mlp_transcoder.yaml", tiny_world, tmp_path / "run")
    run_recipe(recipe, tmp_path / "recipe.yaml")
    dictionary = load_dictionary(tmp_path / "run" / "dictionary")
    provenance = dictionary.config.provenance
    assert (provenance.site, provenance.site_out) == ("layers.3.mlp_in", "layers.3.mlp_out")
    # Both widths came from the tiny GPT-NeoX's MLP: 32 in, 32 out.
    assert (dictionary.config.d_in, dictionary.config.d_out) == (TINY_WIDTH, TINY_WIDTH)


def test_multi_dictionary_recipe_trains_each_on_its_own_site(tiny_world, tmp_path):
    recipe = tiny_recipe("multi_dictionary.yaml", tiny_world, tmp_path / "run")
    cli = run_recipe(recipe, tmp_path / "recipe.yaml")
    module = cli.model
    # One parameter group per dictionary, with its own learning rate.
    groups = cli.trainer.optimizers[0].param_groups
    assert len(groups) == 4
    lr_of = {id(p): g["initial_lr"] for g in groups for p in g["params"]}
    lrs = {name: lr_of[id(d.W_enc)] for name, d in module.dictionaries.items()}
    assert lrs == {"l3_k32": 0.0005, "l6_k16": 0.001, "l6_k32": 0.001, "l6_batchtopk": 0.001}
    sites = {n: d.config.provenance.site for n, d in module.dictionaries.items()}
    assert sites["l3_k32"] == "layers.3.resid_post" and sites["l6_k32"] == "layers.2.resid_post"
    # The same captured batch feeds every dictionary: each saw every training row.
    seen = {n: int(learner.tokens_seen) for n, learner in module.learners.items()}
    assert set(seen.values()) == {8 * 64}
    for member in ("l6_k16", "l6_k32", "l3_k32"):
        metrics = json.loads((tmp_path / "run" / member / "metrics.json").read_text())
        assert metrics["l0"] <= 8 + 1e-6


def test_ddp_overlay_sets_the_strategy(capsys):
    with pytest.raises(SystemExit):
        build_cli(
            [
                "fit",
                "--config",
                "recipes/llama3_batchtopk.yaml",
                "--config",
                "recipes/ddp.yaml",
                "--print_config",
            ]
        )
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["strategy"] == "ddp" and printed["trainer"]["devices"] == -1
    assert printed["trainer"]["precision"] == "bf16-mixed"


@pytest.mark.parametrize("name", RECIPES)
def test_no_recipe_pins_its_outputs_to_one_folder(name, capsys):
    # ${trainer.default_root_dir} would resolve when the YAML is read, before a
    # --trainer.default_root_dir on the command line: outputs must follow the root instead.
    assert "${" not in Path("recipes", name).read_text()
    with pytest.raises(SystemExit):
        build_cli(["fit", "--config", f"recipes/{name}", "--print_config"])
    callbacks = yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"]
    for callback in callbacks:
        assert (callback.get("init_args") or {}).get("dirpath") is None, callback


# Every recipe that trains something (overlays such as ddp.yaml name no model).
TRAINING_RECIPES = sorted(
    p.name for p in Path("recipes").glob("*.yaml") if "model" in yaml.safe_load(p.read_text())
)


@pytest.mark.parametrize("name", TRAINING_RECIPES)
def test_every_training_recipe_can_resume(name):
    trainer = yaml.safe_load(Path("recipes", name).read_text())["trainer"]
    checkpoints = [
        c for c in trainer.get("callbacks", []) if c["class_path"].endswith(".ModelCheckpoint")
    ]
    if trainer.get("enable_checkpointing") is False:
        # Concept heads on cached embeddings: minutes of training, no resume; the CLI
        # refuses --ckpt_path last for them (tests/test_cli.py).
        assert not checkpoints and "ConceptBottleneckModule" in Path("recipes", name).read_text()
    else:
        (checkpoint,) = checkpoints
        assert checkpoint["init_args"]["save_last"] is True


class FirstStep(L.Callback):
    """Records the global step a fit starts from (after any checkpoint was restored)."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.step = trainer.global_step


@pytest.mark.parametrize("name", ["quickstart.yaml", "multi_dictionary.yaml"])
def test_ckpt_path_last_continues_the_run(name, tiny_world, tmp_path):
    recipe = tiny_recipe(name, tiny_world, tmp_path / "run")
    callbacks = recipe["trainer"]["callbacks"]
    (checkpoint,) = [c for c in callbacks if c["class_path"].endswith(".ModelCheckpoint")]
    checkpoint["init_args"]["every_n_train_steps"] = 2
    callbacks.append({"class_path": "tests.test_recipes.FirstStep"})
    path = tmp_path / "recipe.yaml"
    first = run_recipe(recipe, path, "--trainer.max_steps=4")
    assert first.trainer.global_step == 4
    resumed = build_cli(["fit", "--config", str(path), "--ckpt_path", "last"])
    (started,) = [c for c in resumed.trainer.callbacks if isinstance(c, FirstStep)]
    assert started.step == 4 and resumed.trainer.global_step == 8
    tokens = {int(learner.tokens_seen) for learner in resumed.model.learners.values()}
    assert tokens == {8 * 64}
