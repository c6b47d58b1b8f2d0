"""DictionaryProbe with no options: sparsify's defaults, sized to the run, or a warning."""

from __future__ import annotations

import math
import warnings

import lightning as L
import pytest
import torch
from torch import nn

from lightning_interp import list_architectures
from lightning_interp.callbacks import DictionaryProbe
from lightning_interp.callbacks.probe import UndertrainedProbeWarning
from lightning_interp.callbacks.site_trainer import (
    DEFAULT_MIN_STEPS,
    MAX_AUTO_REPLAY,
    default_k,
    default_lr,
    plan_training,
    site_folder,
)
from lightning_interp.errors import CheckpointError, ConfigError, UnsafePathError
from lightning_interp.metrics import FractionOfVarianceUnexplained
from tests.callbacks.users import DigitsData, DigitsMLP, digits
from tests.helpers import quiet_trainer


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fit(probe: DictionaryProbe, module: L.LightningModule | None = None, **trainer_kwargs):
    L.seed_everything(0, verbose=False)
    module = module or DigitsMLP()
    trainer = quiet_trainer(callbacks=[probe], **trainer_kwargs)
    trainer.fit(module, DigitsData())
    return module, trainer


def held_out_fvu(module: DigitsMLP, probe: DictionaryProbe) -> float:
    x, _ = digits("val").tensors
    module.eval()
    with torch.no_grad():
        acts = module.net[1](module.net[0](x))
        return float(FractionOfVarianceUnexplained()(probe.dictionaries["net.1"](acts), acts))


def test_defaults_learn_a_useful_dictionary_on_a_small_run():
    # A 64-wide MLP layer, 1,437 rows, 3 epochs: 4,311 rows in all. The old defaults
    # crashed (TopK without k); given k, their batches of 1,024 from a 4,096-row buffer
    # made 1 step in the whole run.
    probe = DictionaryProbe("net.1")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UndertrainedProbeWarning)
        module, _ = fit(probe, max_epochs=3)
    dictionary = probe.dictionaries["net.1"]
    site = probe.trainers["net.1"]
    # sparsify's defaults: 32x latents, k=32 (here capped at d_in/4), Adam lr 2e-4/sqrt(n/2^14).
    assert dictionary.d_latent == 32 * 64
    assert dictionary.config.k == 16
    assert site.optimizer.param_groups[0]["lr"] == pytest.approx(2e-4 / math.sqrt(2048 / 2**14))
    # The plan shrank the batch and reused rows to reach min_steps.
    assert site.plan.batch_size == 128 and site.plan.replay > 1
    assert site.steps >= DEFAULT_MIN_STEPS  # measured 564
    assert site.rows_buffered == 3 * 1437
    fvu = held_out_fvu(module, probe)
    assert fvu < 0.2, fvu  # measured 0.083-0.086 over 6 seeds (0.24 after 1 epoch, 268 steps)
    assert probe.last_metrics["net.1"]["fvu"] < 0.3  # last epoch, rows not yet trained on


def test_too_little_data_is_reported():
    probe = DictionaryProbe("net.1")
    with pytest.warns(UndertrainedProbeWarning, match=r"'net\.1' took only \d+ steps"):
        fit(probe, max_epochs=1, limit_train_batches=5)
    site = probe.trainers["net.1"]
    assert site.plan.replay == MAX_AUTO_REPLAY
    assert 0 < site.steps < DEFAULT_MIN_STEPS
    with pytest.warns(UndertrainedProbeWarning, match="captured no activations"):
        fit(DictionaryProbe("net.1"), max_steps=0)


def test_max_tokens_is_not_reported_as_too_little_data():
    probe = DictionaryProbe("net.1", max_tokens=1024)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UndertrainedProbeWarning)
        fit(probe, max_epochs=1)
    assert int(probe.trainers["net.1"].learner.tokens_seen) == 1024


@pytest.mark.parametrize("architecture", list_architectures())
def test_every_architecture_runs_with_its_defaults(architecture):
    probe = DictionaryProbe("net.1", architecture=architecture, expansion_factor=4)
    with pytest.warns(UndertrainedProbeWarning):
        fit(probe, max_epochs=1, limit_train_batches=6)
    dictionary = probe.dictionaries["net.1"]
    assert probe.trainers["net.1"].steps > 0
    assert all(torch.isfinite(p).all() for p in dictionary.parameters())


def test_plan_training():
    # A language model's run: plenty of rows, trained as sparsify does (each row once).
    plenty = plan_training(8 * 1024, 10_000)
    assert (plenty.batch_size, plenty.replay, plenty.buffer_size) == (1024, 1, 4096)
    assert plenty.expected_steps > DEFAULT_MIN_STEPS
    assert plan_training(8 * 1024, math.inf).expected_steps == math.inf
    # Fewer rows: a smaller batch first, then reuse, and the plan reaches min_steps.
    medium = plan_training(64, 3000)
    assert medium.batch_size == 256 and medium.replay == 1
    small = plan_training(64, 46)
    assert small.batch_size == 128 and small.replay > 1
    assert small.expected_steps >= DEFAULT_MIN_STEPS
    # The buffer spans several user batches, so copies of one do not fill it alone.
    assert small.buffer_size >= 4 * small.replay * 64
    tiny = plan_training(64, 5)
    assert tiny.replay == MAX_AUTO_REPLAY and tiny.expected_steps < DEFAULT_MIN_STEPS
    # Explicit values win.
    fixed = plan_training(64, 46, batch_size=32, replay=2, buffer_size=100)
    assert (fixed.batch_size, fixed.replay, fixed.buffer_size) == (32, 2, 100)
    assert plan_training(64, 46, buffer_size=100).batch_size == 100
    with pytest.raises(ConfigError, match="buffer_size"):
        plan_training(64, 46, batch_size=256, buffer_size=100)


def test_default_k_and_lr():
    assert [default_k(d) for d in (2, 32, 64, 128, 768, 4096)] == [1, 8, 16, 32, 32, 32]
    assert default_lr(2**14) == pytest.approx(2e-4)
    assert default_lr(4 * 2**14) == pytest.approx(1e-4)


def test_bad_options():
    for kwargs in ({"batch_size": 0}, {"replay": 0}, {"k": True}, {"min_steps": 1.5}):
        with pytest.raises(ConfigError, match="positive integer"):
            DictionaryProbe("net.1", **kwargs)
    with pytest.raises(ConfigError, match="lr"):
        DictionaryProbe("net.1", lr=float("nan"))


class InPlace(DigitsMLP):
    """A user's MLP whose ReLU overwrites the Linear output in place."""

    def __init__(self) -> None:
        super().__init__(dropout=0.0)
        self.net[1] = nn.ReLU(inplace=True)


def test_rows_are_copied_before_the_users_forward_changes_them():
    probe = DictionaryProbe("net.0", replay=1, batch_size=64, buffer_size=10_000)
    fit(probe, InPlace(), max_epochs=1, limit_train_batches=3)
    rows = probe.trainers["net.0"].buffer.rows()
    assert rows.shape == (3 * 64, 64)
    assert rows.min() < 0  # pre-ReLU values, as the hook saw them


def test_state_of_another_release_and_unsafe_site_folders_are_refused():
    with pytest.raises(CheckpointError, match="prefix="):
        DictionaryProbe("net.1").load_state_dict({"version": 1, "batches_seen": 3, "sites": {}})
    assert site_folder("model.h.1:input") == "model.h.1-input"
    for name in ("..", ".hidden"):
        with pytest.raises(UnsafePathError):
            site_folder(name)
