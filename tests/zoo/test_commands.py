"""The zoo's command-line tools, driven through the real `lightning-interp` entry point."""

import json

import pytest

from lightning_interp import load_dictionary
from lightning_interp.cli import main
from lightning_interp.zoo.formats import read_folder, write_folder
from tests.zoo.helpers import assert_same_weights, make_sae, write_run

METRICS = {
    "fvu": 0.2,
    "l0": 4.0,
    "dead_fraction": 0.0,
    "ce_loss_recovered": None,
    "tokens_trained": 4096,
}


def run(*argv):
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    return info.value.code


def test_publish_pull_and_card(hub, tmp_path, capsys):
    saes = {
        "l0": make_sae("layers.0.resid_post", seed=3),
        "l1": make_sae("layers.1.resid_post", seed=4),
    }
    run_dir = write_run(tmp_path / "run", saes, {"l0": METRICS, "l1": METRICS})
    assert run("publish", str(run_dir), "--repo-id", "org/cli", "--license", "mit") == 0
    out = capsys.readouterr().out
    sha = hub.state.repos["org/cli"].branches["main"]
    assert sha in out

    assert run("card", str(run_dir), "--repo-id", "org/cli", "--license", "mit") == 0
    card = capsys.readouterr().out
    assert card == hub.state.repos["org/cli"].commits[sha]["README.md"].content.decode()

    target = tmp_path / "pulled"
    assert run("pull", "org/cli", str(target), "--site", "layers.1.resid_post") == 0
    assert sha in capsys.readouterr().out
    assert_same_weights(load_dictionary(target), saes["l1"])
    assert json.loads((target / "config.json").read_text())["provenance"]["revision"] == sha


def test_pull_default_folder(hub, tmp_path, monkeypatch, capsys):
    make_sae().push_to_hub("org/solo")
    monkeypatch.chdir(tmp_path)
    assert run("pull", "org/solo") == 0
    assert (tmp_path / "solo" / "model.safetensors").is_file()


def test_convert_between_formats(tmp_path, capsys):
    sae = make_sae()
    write_folder(sae, tmp_path / "saelens", format="saelens")
    assert (
        run(
            "convert",
            str(tmp_path / "saelens"),
            str(tmp_path / "native"),
            "--from",
            "saelens",
            "--to",
            "native",
        )
        == 0
    )
    assert_same_weights(read_folder(tmp_path / "native"), sae)


def test_zoo_list_and_show(capsys):
    assert run("zoo", "list") == 0
    listing = capsys.readouterr().out
    assert "gpt2-small-res-jb" in listing and "gemma-scope-2b-pt-res" in listing
    assert run("zoo", "show", "gpt2-small-res-jb") == 0
    shown = capsys.readouterr().out
    assert "jbloom/GPT2-Small-SAEs-Reformatted@main" in shown
    assert "blocks.8.hook_resid_pre" in shown and "layers.8.resid_pre" in shown


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("zoo", "show", "no-such-release"), "no catalogue release 'no-such-release'"),
        (("pull", "org/missing"), "'org/missing' was not found"),
        (("card", "does-not-exist"), "holds no dictionary folder"),
        (("convert", "nowhere", "out", "--to", "pickle"), "unknown dictionary format 'pickle'"),
    ],
)
def test_errors_are_one_line_and_exit_2(hub, argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert run(*argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_usage_errors_and_help(capsys):
    assert run("publish", "some-dir") == 2  # --repo-id is required
    assert "--repo-id" in capsys.readouterr().err
    assert run("zoo", "--help") == 0


@pytest.mark.parametrize("where", ["run", "head"])
def test_card_with_a_corrupt_metrics_json_is_one_line_and_exit_2(where, tmp_path, capsys):
    if where == "run":
        folder = write_run(tmp_path / "run", {"l0": make_sae("layers.0.resid_post")})
        metrics = folder / "l0" / "metrics.json"
    else:
        from tests.zoo.test_heads_hub import make_pcbm

        folder = make_pcbm().save_pretrained(tmp_path / "head")
        metrics = folder / "metrics.json"
    metrics.write_text('{"fvu": 0.2,')  # truncated
    assert run("card", str(folder), "--repo-id", "org/cli") == 2
    err = capsys.readouterr().err
    assert "metrics.json is not valid JSON" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    metrics.write_bytes(b"\xff\xfe not utf-8")
    assert run("card", str(folder), "--repo-id", "org/cli") == 2
    err = capsys.readouterr().err
    assert "metrics.json is not valid JSON" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_card_entries_come_from_the_staged_files(tmp_path):
    from lightning_interp.zoo.publish import PublishItem, _stage

    sae = make_sae("layers.0.resid_post")
    items = [PublishItem("a", sae, METRICS), PublishItem("b/c", make_sae("layers.1.resid_post"))]
    entries = _stage(items, tmp_path)
    assert [e.path for e in entries] == ["a", "b/c"]
    for entry in entries:
        staged = json.loads((tmp_path / entry.path / "config.json").read_text())
        assert entry.config == staged
    assert entries[0].metrics == METRICS == json.loads((tmp_path / "a/metrics.json").read_text())
    assert entries[1].metrics is None and not (tmp_path / "b/c/metrics.json").exists()


def test_convert_refuses_to_overwrite_a_dictionary_unless_asked(tmp_path, capsys):
    first, second = make_sae(seed=1), make_sae(seed=2)
    write_folder(first, tmp_path / "a", format="saelens")
    write_folder(second, tmp_path / "b", format="saelens")
    assert run("convert", str(tmp_path / "a"), str(tmp_path / "out")) == 0
    assert run("convert", str(tmp_path / "b"), str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "already holds a dictionary" in err and "--overwrite" in err
    assert_same_weights(read_folder(tmp_path / "out"), first)  # untouched
    assert run("convert", str(tmp_path / "b"), str(tmp_path / "out"), "--overwrite") == 0
    assert_same_weights(read_folder(tmp_path / "out"), second)
