"""DictionaryModule under a real Lightning Trainer: schedules, state, precision, batches."""

from functools import partial

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_interp import ConfigError, ShapeMismatchError, create_dictionary, list_architectures
from lightning_interp.dictionaries.init import geometric_median
from lightning_interp.modules import DictionaryModule, split_batch
from tests.helpers import loader, make_module, planted_data, quiet_trainer, small_dictionary


class Recorder(L.Callback):
    """Records the learning rate and sparsity scale seen by every training batch."""

    def __init__(self):
        self.lrs, self.scales = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        self.scales.append(pl_module.sparsity_scale())


def test_schedules_warm_up_and_decay():
    recorder = Recorder()
    module = make_module(
        small_dictionary("standard"),
        lr=1e-3,
        warmup_steps=4,
        decay_fraction=0.5,
        sparsity_warmup_steps=5,
    )
    quiet_trainer(max_epochs=1, callbacks=[recorder]).fit(module, loader(planted_data(), 64, 20, 0))
    lrs = torch.tensor(recorder.lrs) / 1e-3
    torch.testing.assert_close(lrs[:4], torch.tensor([0.25, 0.5, 0.75, 1.0]), atol=1e-6, rtol=0)
    assert (lrs[4:10] == 1.0).all()
    torch.testing.assert_close(lrs[10:], torch.linspace(1.0, 0.1, 10), atol=1e-6, rtol=0)
    assert recorder.scales[:6] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])


def test_custom_scheduler_replaces_the_built_in_one():
    recorder = Recorder()
    module = make_module(
        small_dictionary("topk"),
        lr=1e-3,
        lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.5),
    )
    quiet_trainer(max_epochs=1, callbacks=[recorder]).fit(module, loader(planted_data(), 64, 6, 0))
    assert recorder.lrs == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4])


class Endless(IterableDataset):
    def __iter__(self):
        while True:
            yield torch.randn(32, 32)


def test_decay_needs_a_known_run_length():
    module = make_module(small_dictionary("topk"), decay_fraction=0.2)
    with pytest.raises(ConfigError, match="set trainer.max_steps"):
        quiet_trainer(max_epochs=1).fit(module, DataLoader(Endless(), batch_size=None))
    # With max_steps the same stream trains.
    module = make_module(small_dictionary("topk"), decay_fraction=0.2)
    quiet_trainer(max_steps=3).fit(module, DataLoader(Endless(), batch_size=None))
    assert module.global_step == 3


def test_b_dec_starts_at_the_geometric_median_of_the_first_batch():
    data = torch.randn(256, 32) + 5.0
    module = DictionaryModule(small_dictionary("topk"), optimizer=partial(torch.optim.SGD, lr=0.0))
    quiet_trainer(max_steps=2).fit(module, DataLoader(data, batch_size=128))
    torch.testing.assert_close(
        module.dictionary.b_dec.detach(), geometric_median(data[:128]), atol=1e-5, rtol=0
    )
    assert bool(module.b_dec_initialized)


def test_dead_latents_are_counted_in_tokens():
    torch.manual_seed(0)
    dictionary = small_dictionary("topk", d_latent=256, k=1)
    with torch.no_grad():
        dictionary.W_enc[:, 128:] = 0.0
        dictionary.b_enc[128:] = -1e3  # half the latents can never win the top-1
    module = DictionaryModule(
        dictionary, optimizer=partial(torch.optim.SGD, lr=0.0), dead_tokens_threshold=500
    )
    trainer = quiet_trainer(max_steps=10)
    trainer.fit(module, loader(planted_data(), 100, 10, 0))
    assert int(module.tokens_seen) == 1000
    assert (module.tokens_since_fired[128:] == 1000).all()
    assert trainer.callback_metrics["train/dead_fraction"] >= 0.5


def test_checkpoint_restores_dictionary_and_training_state(tmp_path):
    module = make_module(small_dictionary("jumprelu"))
    trainer = quiet_trainer(max_steps=20, enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(module, loader(planted_data(), 128, 20, 0))
    path = (
        trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path
    )
    restored = DictionaryModule.load_from_checkpoint(path)
    assert restored.dictionary.config == module.dictionary.config
    for name, tensor in module.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[name], tensor, rtol=0, atol=0)
    assert int(restored.tokens_seen) == 20 * 128


def test_trains_under_bf16_mixed_precision():
    torch.manual_seed(0)
    module = make_module(small_dictionary("topk"))
    trainer = quiet_trainer(max_epochs=1, precision="bf16-mixed")
    data = planted_data()
    trainer.fit(module, loader(data, 256, 40, 1))
    result = trainer.validate(module, loader(data, 1024, 1, 9), verbose=False)[0]
    assert module.dictionary.W_enc.dtype == torch.float32
    assert 0.0 < result["val/fvu"] < 0.6
    assert result["val/l0"] <= 4.0
    assert torch.isfinite(torch.tensor(list(result.values()))).all()


@pytest.mark.parametrize("architecture", list_architectures())
def test_every_architecture_survives_bf16_mixed(architecture):
    module = make_module(small_dictionary(architecture))
    trainer = quiet_trainer(max_steps=5, precision="bf16-mixed")
    trainer.fit(module, loader(planted_data(), 128, 5, 0))
    assert all(torch.isfinite(p).all() for p in module.dictionary.parameters())


def test_transcoder_learns_a_map_between_two_sites():
    torch.manual_seed(0)
    data = planted_data()
    x = data.sample(8192, generator=torch.Generator().manual_seed(0))[0]
    mix = torch.randn(32, 24) / 32**0.5
    y = torch.relu(x) @ mix  # a nonlinear "MLP" from one site to another
    transcoder = create_dictionary(
        "topk", d_in=32, d_latent=128, d_out=24, k=8, apply_b_dec_to_input=False
    )
    module = make_module(transcoder, lr=1e-2)
    batches = DataLoader(TensorDataset(x, y), batch_size=256, shuffle=True)
    trainer = quiet_trainer(max_epochs=10)
    before = trainer.validate(module, DataLoader(TensorDataset(x, y), batch_size=4096))[0]
    trainer.fit(module, batches)
    after = trainer.validate(module, DataLoader(TensorDataset(x, y), batch_size=4096))[0]
    assert after["val/fvu"] < 0.3 < before["val/fvu"]


def test_split_batch_accepts_the_documented_shapes():
    x, y = torch.randn(2, 5, 8), torch.randn(2, 5, 4)
    assert split_batch(x)[0].shape == (10, 8) and split_batch(x)[1] is None
    inputs, targets = split_batch((x, y))
    assert inputs.shape == (10, 8) and targets.shape == (10, 4)
    assert split_batch({"activations": x})[0].shape == (10, 8)
    assert split_batch({"inputs": x, "targets": y})[1].shape == (10, 4)
    with pytest.raises(ConfigError, match="'activations' or 'inputs'"):
        split_batch({"x": x})
    with pytest.raises(ConfigError, match="cannot read activations"):
        split_batch("text")
    with pytest.raises(ShapeMismatchError, match="10 rows but targets have 3"):
        split_batch((x, torch.randn(3, 4)))


def test_wrong_width_batches_fail_with_the_dictionary_error():
    module = make_module(small_dictionary("topk"))
    with pytest.raises(ShapeMismatchError, match="d_in=32"):
        quiet_trainer(max_steps=1).fit(module, DataLoader(torch.randn(64, 16), batch_size=32))


def test_rejects_a_non_dictionary():
    with pytest.raises(ConfigError, match="expected a Dictionary"):
        DictionaryModule(torch.nn.Linear(2, 2))


class SlowBatches(IterableDataset):
    """Bursty batches like a buffered stream: every 4th waits 80 ms (a capture), 20 ms avg."""

    def __iter__(self):
        import time

        generator = torch.Generator().manual_seed(0)
        for i in range(24):
            if i % 4 == 0:
                time.sleep(0.08)
            yield torch.randn(64, 32, generator=generator)


def test_progress_bar_shows_end_to_end_tokens_per_second():
    module = DictionaryModule(small_dictionary("topk"))
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(module, DataLoader(SlowBatches(), batch_size=None))
    bar = trainer.progress_bar_metrics
    # End to end includes the waits, 20 ms per batch on average: at most 64 / 0.02 = 3200
    # rows/s however fast the steps between waits are; the step-only rate excludes them.
    assert 0 < bar["tok/s"] <= 3200
    assert trainer.callback_metrics["train/step_tokens_per_second"] > bar["tok/s"]
