"""The lightning-interp CLI runs the shipped quickstart recipe end to end on a tiny backbone."""

import json

import pytest
import torch
import transformers as T
import yaml

from lightning_interp import load_dictionary
from lightning_interp.cli import build_cli as main
from tests.data.test_tokens import BOS, EOS, make_tokenizer, random_texts


@pytest.fixture
def tiny_recipe(tmp_path):
    """recipes/quickstart.yaml with a tiny random GPT-2 (saved to disk) and a small text file."""
    torch.manual_seed(0)
    model_dir = tmp_path / "tiny-gpt2"
    config = T.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, bos_token_id=BOS, eos_token_id=EOS
    )
    T.GPT2LMHeadModel(config).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    text = tmp_path / "texts.txt"
    text.write_text("\n".join(random_texts(200, seed=0)) + "\n")

    with open("recipes/quickstart.yaml") as f:
        recipe = yaml.safe_load(f)
    recipe["trainer"]["default_root_dir"] = str(tmp_path / "run")
    recipe["trainer"]["enable_progress_bar"] = False
    recipe["trainer"]["callbacks"][1]["init_args"]["dirpath"] = str(tmp_path / "run")
    recipe["model"]["init_args"]["dictionary"]["init_args"]["config"].update(
        d_in=32, d_latent=128, k=4
    )
    recipe["data"]["init_args"].update(
        model=str(model_dir),
        sites="layers.1.resid_post",
        text=str(text),
        context_size=16,
        batch_size=64,
        buffer_tokens=512,
        train_tokens=64 * 30,
        val_tokens=256,
        contexts_per_capture=8,
        downstream_contexts=4,
        val_fraction=0.1,
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path, tmp_path / "run"


def test_fit_writes_a_loadable_dictionary_and_metrics(tiny_recipe):
    recipe, run = tiny_recipe
    cli = main(["fit", "--config", str(recipe)])
    assert cli.trainer.global_step == 30
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) >= {"fvu", "l0", "dead_fraction", "ce_loss_recovered", "tokens_trained"}
    assert metrics["tokens_trained"] == 64 * 30
    assert metrics["l0"] <= 4.0 and 0.0 < metrics["fvu"] < 1.0
    assert metrics["ce_loss_recovered"] is not None
    dictionary = load_dictionary(run / "dictionary")
    assert dictionary.config.provenance.site == "layers.1.resid_post"
    assert dictionary.d_in == 32 and dictionary.config.k == 4


def test_config_errors_name_the_key(tiny_recipe, capsys):
    recipe, _ = tiny_recipe
    with pytest.raises(SystemExit):
        main(
            ["fit", "--config", str(recipe), "--model.init_args.dictionary.init_args.config.k=many"]
        )
    assert "k" in capsys.readouterr().err


def test_print_config_resolves_the_recipe(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "recipes/quickstart.yaml", "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["dictionary"]["init_args"]["config"]["d_latent"] == 9216
    assert printed["data"]["init_args"]["model"] == "offline:smollm2"


def test_validate_and_test_subcommands_reproduce_the_final_metrics(tiny_recipe):
    recipe, run = tiny_recipe
    main(["fit", "--config", str(recipe)])
    final = json.loads((run / "metrics.json").read_text())
    (checkpoint,) = (run / "checkpoints").glob("*.ckpt")
    validated = main(["validate", "--config", str(recipe), "--ckpt_path", str(checkpoint)])
    # The held-out stream is deterministic, so validating the saved weights gives the
    # numbers the end of fit reported.
    metrics = validated.trainer.callback_metrics
    assert float(metrics["val/fvu"]) == pytest.approx(final["fvu"], rel=1e-5)
    assert float(metrics["val/ce_loss_recovered"]) == pytest.approx(
        final["ce_loss_recovered"], rel=1e-5
    )
    tested = main(["test", "--config", str(recipe), "--ckpt_path", str(checkpoint)])
    assert "test/fvu" in tested.trainer.callback_metrics
