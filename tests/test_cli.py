"""The lightning-interp CLI runs the shipped quickstart recipe end to end on a tiny backbone."""

import json
import sys

import pytest
import torch
import transformers as T
import yaml

from lightning_interp import load_dictionary
from lightning_interp.cli import build_cli as main
from lightning_interp.cli import main as cli_main
from tests.data.test_tokens import BOS, EOS, make_tokenizer, random_texts


@pytest.fixture(autouse=True)
def argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-interp"])  # LightningCLI also reads argv


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
    callbacks = recipe["trainer"]["callbacks"]
    (checkpoint,) = [c for c in callbacks if "ModelCheckpoint" in c["class_path"]]
    checkpoint["init_args"]["every_n_train_steps"] = 10
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
    with pytest.raises(SystemExit) as exit_info:
        cli_main(
            ["fit", "--config", str(recipe), "--model.init_args.dictionary.init_args.config.k=many"]
        )
    assert exit_info.value.code == 2  # a usage error, as argparse's
    err = capsys.readouterr().err
    assert err.startswith("usage: lightning-interp") and "config.k" in err and "many" in err


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
    # The recipe keeps one file, last.ckpt, at step 30.
    (checkpoint,) = (run / "checkpoints").glob("*.ckpt")
    assert checkpoint.name == "last.ckpt"
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


def run_main(args, capsys) -> tuple[int, str, str]:
    """``lightning-interp ARGS`` in this process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error" in line.lower()]


K0 = "--model.init_args.dictionary.init_args.config.k=0"
D_IN_16 = "--model.init_args.dictionary.init_args.config.d_in=16"


@pytest.mark.parametrize(
    "command,bad,says",
    [
        ("fit", K0, "k must be an integer in [1, d_latent=128], got 0"),  # building the model
        ("fit", "--data.init_args.sites=layers.9.resid_post", "unknown site"),  # data setup
        ("fit", D_IN_16, "d_in=16"),  # the first training batch
        ("validate", D_IN_16, "d_in=16"),
        ("test", D_IN_16, "d_in=16"),
    ],
)
def test_library_errors_are_one_line_and_exit_2(tiny_recipe, capsys, command, bad, says):
    recipe, _ = tiny_recipe
    code, _, err = run_main([command, "--config", str(recipe), bad], capsys)
    assert code == 2
    assert "Traceback" not in err
    (line,) = error_lines(err)
    assert line.startswith(f"lightning-interp {command}: error: ") and says in line


@pytest.mark.parametrize(
    "content,says",
    [(b"", "is empty (0 bytes)"), (b"PK\x03\x04" + bytes(200), "is truncated"), (None, "no such")],
)
def test_a_bad_checkpoint_file_is_one_line_and_exit_2(tiny_recipe, tmp_path, capsys, content, says):
    recipe, _ = tiny_recipe
    checkpoint = tmp_path / "bad.ckpt"
    if content is not None:
        checkpoint.write_bytes(content)
    for command in ("fit", "validate"):
        code, _, err = run_main(
            [command, "--config", str(recipe), "--ckpt_path", str(checkpoint)], capsys
        )
        assert code == 2 and "Traceback" not in err
        (line,) = error_lines(err)
        assert line.startswith(f"lightning-interp {command}: error: ") and says in line


def test_version(capsys):
    from importlib.metadata import version

    code, out, _ = run_main(["--version"], capsys)
    assert code == 0 and out == f"lightning-interp {version('lightning-interp')}\n"


@pytest.mark.parametrize("args", [["fitt", "--config", "x.yaml"], []])
def test_a_mistyped_or_missing_command_lists_every_command(args, capsys):
    code, _, err = run_main(args, capsys)
    assert code == 2
    for command in ("fit", "validate", "test", "predict", "publish", "pull", "card", "zoo"):
        assert command in err
    assert ("did you mean 'fit'?" in err) == bool(args)


def test_top_level_optimizer_goes_into_the_module(tiny_recipe, capsys):
    recipe, _ = tiny_recipe
    cli = main(
        ["fit", "--config", str(recipe), "--trainer.max_steps=3"]
        + ["--optimizer=torch.optim.SGD", "--optimizer.lr=0.05"]
    )
    assert "used as model.init_args.optimizer" in capsys.readouterr().err
    (optimizer,) = cli.trainer.optimizers
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["initial_lr"] == 0.05
    # The module's own warm-up (10 steps in the recipe) still schedules it, every step.
    (scheduler,) = cli.trainer.lr_scheduler_configs
    assert scheduler.interval == "step"
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 4 / 10)


def test_a_scheduler_the_module_cannot_take_is_refused(capsys):
    code, _, err = run_main(
        ["fit", "--config", "recipes/clip_pcbm.yaml"]
        + ["--lr_scheduler=torch.optim.lr_scheduler.StepLR", "--lr_scheduler.step_size=3"],
        capsys,
    )
    assert code == 2
    (line,) = error_lines(err)
    assert "--lr_scheduler is not used by ConceptBottleneckModule" in line


def test_resuming_a_run_that_keeps_no_checkpoints_is_refused(capsys):
    code, _, err = run_main(
        ["fit", "--config", "recipes/clip_pcbm.yaml", "--ckpt_path", "last"], capsys
    )
    assert code == 2
    (line,) = error_lines(err)
    assert "--ckpt_path last: this run saves no checkpoints" in line


def test_outputs_follow_the_root_dir_given_on_the_command_line(tiny_recipe, tmp_path):
    recipe, run = tiny_recipe
    for name in ("a", "b"):
        root = tmp_path / name
        main(
            ["fit", "--config", str(recipe), f"--trainer.default_root_dir={root}"]
            + ["--data.init_args.train_tokens=640"]
        )
        assert load_dictionary(root / "dictionary").d_in == 32
        assert json.loads((root / "metrics.json").read_text())["tokens_trained"] == 640
        assert (root / "checkpoints" / "last.ckpt").is_file()
        assert (root / "lightning_logs" / "version_0" / "metrics.csv").is_file()
    assert not run.exists()  # the recipe's own default_root_dir was not written
