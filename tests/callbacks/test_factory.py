"""Enabling the probe from configuration: the callbacks_factory entry point and LightningCLI."""

from __future__ import annotations

from importlib.metadata import entry_points

import lightning as L
import pytest
import torch
from lightning.pytorch.cli import LightningCLI

from lightning_interp.callbacks import DictionaryProbe
from lightning_interp.callbacks.factory import ENV_VAR, callbacks_factory, parse_probe_spec
from lightning_interp.errors import ConfigError
from tests.callbacks.users import DigitsData, DigitsMLP
from tests.helpers import quiet_trainer


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def probes(trainer: L.Trainer) -> list[DictionaryProbe]:
    return [c for c in trainer.callbacks if isinstance(c, DictionaryProbe)]


def test_entry_point_is_installed():
    (entry,) = [
        e
        for e in entry_points(group="lightning.pytorch.callbacks_factory")
        if e.name == "lightning_interp"
    ]
    assert entry.load() is callbacks_factory


def test_without_the_variable_every_trainer_is_untouched(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert callbacks_factory() == []
    assert probes(quiet_trainer()) == []
    monkeypatch.setenv(ENV_VAR, "  ")
    assert probes(quiet_trainer()) == []


def test_with_the_variable_every_trainer_gets_a_probe(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "net.1;k=4;d_latent=128;batch_size=64;prefix=env")
    trainer = quiet_trainer(max_epochs=1)
    (probe,) = probes(trainer)
    assert (probe.sites, probe.k, probe.d_latent, probe.batch_size) == (["net.1"], 4, 128, 64)
    L.seed_everything(0, verbose=False)
    trainer.fit(DigitsMLP(), DigitsData())
    assert probe.trainers["net.1"].steps > 0
    assert "env/net.1/fvu" in trainer.callback_metrics


def test_the_variable_with_sites_only_uses_working_defaults(monkeypatch):
    # Once a crash at the first batch (TopK without k): the defaults must train.
    monkeypatch.setenv(ENV_VAR, "net.1")
    trainer = quiet_trainer(max_epochs=2)
    (probe,) = probes(trainer)
    L.seed_everything(0, verbose=False)
    trainer.fit(DigitsMLP(), DigitsData())
    site = probe.trainers["net.1"]
    assert (site.dictionary.d_latent, site.dictionary.config.k) == (32 * 64, 16)
    assert site.steps >= probe.min_steps  # the plan sized batches and reuse to the run
    assert float(trainer.callback_metrics["probe/net.1/epoch_fvu"]) < 0.3


def test_spec_formats_and_errors():
    assert parse_probe_spec("a.b, c.d ; k=8 ; lr=0.01 ; dirpath=runs/x") == {
        "sites": ["a.b", "c.d"],
        "k": 8,
        "lr": 0.01,
        "dirpath": "runs/x",
    }
    assert parse_probe_spec('{"sites": "net.0", "expansion_factor": 2}') == {
        "sites": ["net.0"],
        "expansion_factor": 2,
    }
    with pytest.raises(ConfigError, match="names no sites"):
        parse_probe_spec("k=8")
    with pytest.raises(ConfigError, match="cannot read"):
        parse_probe_spec("net.0;k")
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse_probe_spec("{sites")


def test_unknown_option_in_the_variable(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "net.1;kk=4")
    with pytest.raises(ConfigError, match="kk"):
        quiet_trainer()


def test_lightning_cli_adds_a_probe(tmp_path):
    L.seed_everything(0, verbose=False)
    cli = LightningCLI(
        DigitsMLP,
        DigitsData,
        args=[
            "fit",
            "--trainer.max_epochs=2",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks+=lightning_interp.callbacks.DictionaryProbe",
            "--trainer.callbacks.sites=net.1",
            "--trainer.callbacks.k=4",
            "--trainer.callbacks.d_latent=128",
            "--trainer.callbacks.batch_size=64",
            f"--trainer.callbacks.dirpath={tmp_path / 'dicts'}",
        ],
        save_config_callback=None,
    )
    (probe,) = probes(cli.trainer)
    assert probe.dictionaries["net.1"].config.k == 4
    assert probe.trainers["net.1"].steps > 0
    assert (tmp_path / "dicts" / "net.1" / "model.safetensors").is_file()
