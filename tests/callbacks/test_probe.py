"""DictionaryProbe on plain user models: leaves the run alone, learns, resumes, errors clearly."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lightning_interp import load_dictionary
from lightning_interp.backbones.sites import UnknownSiteError
from lightning_interp.callbacks import DictionaryProbe
from lightning_interp.callbacks.module_sites import resolve_module_sites
from lightning_interp.errors import ConfigError, ShapeMismatchError
from lightning_interp.metrics import FractionOfVarianceUnexplained
from tests.callbacks.users import DigitsData, DigitsMLP, TinyGPT, digits, token_batches
from tests.helpers import quiet_trainer


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def probe(**kwargs) -> DictionaryProbe:
    defaults = dict(sites="net.1", d_latent=256, k=8, batch_size=128, lr=3e-3)
    return DictionaryProbe(**{**defaults, **kwargs})


def fit_digits(callbacks, epochs=3, dropout=0.1, shuffle=True, **trainer_kwargs):
    L.seed_everything(0, verbose=False)
    module = DigitsMLP(dropout=dropout)
    trainer = quiet_trainer(max_epochs=epochs, callbacks=callbacks, **trainer_kwargs)
    trainer.fit(module, DigitsData(shuffle=shuffle))
    return module, trainer


def hidden_activations(module: DigitsMLP, split: str = "val") -> torch.Tensor:
    x, _ = digits(split).tensors
    module.eval()
    with torch.no_grad():
        return module.net[1](module.net[0](x))


def test_user_weights_bitwise_identical_with_and_without_probe():
    # Shuffled loader and dropout: any draw from the global RNG would change the run.
    plain, _ = fit_digits([])
    probe_ = probe()
    probed, _ = fit_digits([probe_])
    assert probe_.trainers["net.1"].steps > 20
    for (name, a), (_, b) in zip(
        plain.state_dict().items(), probed.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert not probed.net[1]._forward_hooks  # teardown removed the hook


def test_probe_learns_and_logs_through_user_logger(tmp_path):
    probe_ = probe(dirpath=str(tmp_path / "dicts"))
    module, trainer = fit_digits(
        [probe_], epochs=10, logger=CSVLogger(tmp_path, name="logs"), log_every_n_steps=5
    )
    # Held-out activations of the final model: the probe has never seen them.
    acts = hidden_activations(module)
    dictionary = probe_.dictionaries["net.1"]
    fvu = FractionOfVarianceUnexplained()(dictionary(acts), acts)
    assert fvu < 0.2, float(fvu)  # measured 0.069 (10 epochs, 542 steps, rows used 5x)
    assert dictionary.config.provenance.site == "net.1"
    with open(trainer.logger.log_dir + "/metrics.csv") as handle:
        columns = next(csv.reader(handle))
    for key in ("fvu", "l0", "dead_fraction", "epoch_fvu", "epoch_l0", "epoch_dead_fraction"):
        assert f"probe/net.1/{key}" in columns
    assert float(trainer.callback_metrics["probe/net.1/epoch_l0"]) == pytest.approx(8.0)
    # Saved at the end in the native format, site recorded.
    saved = load_dictionary(tmp_path / "dicts" / "net.1")
    assert saved.config.provenance.site == "net.1"
    torch.testing.assert_close(saved(acts), dictionary(acts))


def _probe_state(p: DictionaryProbe) -> dict:
    t = p.trainers["net.1"]
    return {
        **{k: v.clone() for k, v in t.learner.state_dict().items()},
        "steps": t.steps,
        "batches": p.batches_seen,
    }


def test_resume_continues_probe_exactly(tmp_path):
    # Deterministic user run (no dropout, fixed order) so the two runs can be compared.
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    full = probe(buffer_size=300)
    fit_digits([full, checkpoints], epochs=4, dropout=0.0, shuffle=False, enable_checkpointing=True)
    first = tmp_path / "epoch=1-step=46.ckpt"
    assert first.exists(), sorted(p.name for p in tmp_path.iterdir())
    saved = torch.load(first, weights_only=True)["callbacks"][full.state_key]
    assert saved["sites"]["net.1"]["buffer_rows"].shape[1] == 64
    assert saved["sites"]["net.1"]["plan"]["replay"] > 1  # the plan travels with the probe

    resumed = probe(buffer_size=300)
    L.seed_everything(0, verbose=False)
    quiet_trainer(max_epochs=4, callbacks=[resumed]).fit(
        DigitsMLP(dropout=0.0), DigitsData(shuffle=False), ckpt_path=first
    )
    assert saved["sites"]["net.1"]["steps"] < resumed.trainers["net.1"].steps
    assert resumed.trainers["net.1"].plan == full.trainers["net.1"].plan
    a, b = _probe_state(full), _probe_state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key
    opt_a = full.trainers["net.1"].optimizer.state_dict()["state"]
    opt_b = resumed.trainers["net.1"].optimizer.state_dict()["state"]
    for i in opt_a:
        for name in opt_a[i]:
            assert torch.equal(opt_a[i][name], opt_b[i][name])


def test_two_probes_coexist_and_checkpoint_side_by_side(tmp_path):
    a = probe(sites="net.0", prefix="first", k=4, d_latent=128)
    b = probe(sites=["net.1"], prefix="second")
    assert a.state_key != b.state_key
    _, trainer = fit_digits([a, b], epochs=2)
    path = tmp_path / "both.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["callbacks"]
    assert {a.state_key, b.state_key} <= set(state)
    assert a.trainers["net.0"].steps > 0 and b.trainers["net.1"].steps > 0
    assert a.dictionaries["net.0"].config.k == 4
    assert "first/net.0/fvu" in trainer.callback_metrics
    assert "second/net.1/fvu" in trainer.callback_metrics


def test_bf16_mixed_activations_meet_fp32_dictionary():
    probe_ = probe(sites="net.0")  # a Linear output: bf16 under autocast
    module, trainer = fit_digits([probe_], epochs=3, precision="bf16-mixed")
    dictionary = probe_.dictionaries["net.0"]
    assert dictionary.dtype == torch.float32
    assert probe_.trainers["net.0"].steps >= probe_.min_steps
    x, _ = digits("val").tensors
    with torch.no_grad():
        acts = module.net[0](x)
    fvu = FractionOfVarianceUnexplained()(dictionary(acts), acts)
    assert fvu < 0.2, float(fvu)  # measured 0.052 after 505 steps


def test_train_every_n_steps_and_max_tokens():
    every = probe(train_every_n_steps=2)
    fit_digits([every], epochs=1)
    # 1,437 rows in 23 batches: batches 0, 2, ..., 22 are captured, the last has 29 rows.
    assert every.trainers["net.1"].rows_buffered == 11 * 64 + 29
    capped = probe(max_tokens=256)
    fit_digits([capped], epochs=2)
    assert int(capped.trainers["net.1"].learner.tokens_seen) == 256


def test_unknown_site_names_close_matches():
    with pytest.raises(UnknownSiteError, match=r"net\.1"):
        resolve_module_sites(DigitsMLP(), "net.11")
    with pytest.raises(UnknownSiteError, match="Closest module paths"):
        fit_digits([probe(sites="net.11")], epochs=1)


def test_d_in_mismatch_is_a_clear_error():
    with pytest.raises(ShapeMismatchError, match="d_in=32"):
        fit_digits([probe(d_in=32)], epochs=1)


def test_bad_options():
    with pytest.raises(ConfigError, match="not both"):
        DictionaryProbe("net.1", d_latent=64, expansion_factor=4)
    with pytest.raises(KeyError, match="Did you mean 'topk'"):
        DictionaryProbe("net.1", architecture="topkk")
    with pytest.raises(ConfigError, match="buffer_size"):
        DictionaryProbe("net.1", batch_size=64, buffer_size=32)


def test_site_resolution_paths_globs_and_canonical_names():
    mlp = DigitsMLP()
    assert [s.module_path for s in resolve_module_sites(mlp, "net.*")] == [
        "net.0",
        "net.1",
        "net.2",
        "net.3",
    ]
    (site,) = resolve_module_sites(mlp, "net.3:input")
    assert (site.module_path, site.direction) == ("net.3", "input")
    gpt = TinyGPT()
    (site,) = resolve_module_sites(gpt, "layers.1.resid_post")
    assert site.module_path == "model.transformer.h.1"
    sites = resolve_module_sites(gpt, ["layers.*.mlp_out", "model.transformer.h.0.mlp"])
    assert [s.module_path for s in sites] == [
        "model.transformer.h.0.mlp",
        "model.transformer.h.1.mlp",
    ]


def fit_gpt(callbacks):
    L.seed_everything(0, verbose=False)
    module = TinyGPT()
    quiet_trainer(max_epochs=2, callbacks=callbacks).fit(
        module, DataLoader(token_batches(), batch_size=None)
    )
    return module


def test_transformer_user_model_masked_tokens_and_identical_weights():
    plain = fit_gpt([])
    probe_ = DictionaryProbe(
        ["layers.1.resid_post", "model.transformer.h.0.mlp"],
        expansion_factor=4,
        k=8,
        batch_size=64,
        buffer_size=128,
    )
    probed = fit_gpt([probe_])
    for (name, a), (_, b) in zip(
        plain.state_dict().items(), probed.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    unmasked = sum(int(b["attention_mask"].sum()) for b in token_batches())
    for site in ("layers.1.resid_post", "model.transformer.h.0.mlp"):
        assert probe_.trainers[site].rows_buffered == 2 * unmasked  # padding dropped
        assert probe_.dictionaries[site].d_latent == 4 * 32
        assert probe_.trainers[site].steps > 0


class BuiltLate(DigitsMLP):
    """A user module that creates its layers in configure_model (after callback setup)."""

    def __init__(self) -> None:
        super().__init__(dropout=0.0)
        del self.net

    def configure_model(self) -> None:
        if not hasattr(self, "net"):
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(
                torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
            )


def test_layers_built_in_configure_model_are_hooked():
    probe_ = probe(sites="net.1", d_latent=64, k=4)
    L.seed_everything(0, verbose=False)
    quiet_trainer(max_epochs=1, callbacks=[probe_]).fit(BuiltLate(), DigitsData())
    assert probe_.dictionaries["net.1"].d_in == 32
    assert probe_.trainers["net.1"].steps > 0
