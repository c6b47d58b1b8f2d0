"""ExportDictionary: a final evaluation, the run's own folder, the field's dead fraction."""

import json
from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_interp import create_dictionary, load_dictionary
from lightning_interp.callbacks import ExportDictionary
from lightning_interp.data import ActivationCacheWriter, ActivationDataModule, expected_norm_scale
from lightning_interp.errors import ConfigError, NonFiniteError, OutputExistsError
from lightning_interp.modules import DictionaryModule, MultiDictionaryModule
from lightning_interp.modules.scales import record_activation_scales
from lightning_interp.zoo.card import CardEntry, build_card
from tests.helpers import make_module, quiet_trainer, small_dictionary


def batches(n: int, rows: int = 64, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        [torch.randn(rows, 32, generator=generator) for _ in range(n)], batch_size=None
    )


class Validations(L.Callback):
    """The global steps at which a (non-sanity) validation ended."""

    def __init__(self):
        self.steps = []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.steps.append(trainer.global_step)


def run(root, module=None, *, export=None, **trainer_kwargs):
    module = module or make_module(small_dictionary("topk"), decay_fraction=0.0)
    validations = Validations()
    callbacks = [export or ExportDictionary(), validations, *trainer_kwargs.pop("callbacks", [])]
    kwargs = dict(max_epochs=1, num_sanity_val_steps=0, default_root_dir=root, callbacks=callbacks)
    trainer = quiet_trainer(**{**kwargs, **trainer_kwargs})
    trainer.fit(module, batches(20), batches(2, seed=1))
    return trainer, validations.steps


def metrics(folder) -> dict:
    return json.loads((folder / "metrics.json").read_text())


@pytest.mark.parametrize(
    ("trainer_kwargs", "validated_at"),
    [
        ({"max_steps": 7}, [7]),  # stops mid-epoch, where Lightning does not validate
        ({}, [20]),  # the epoch's own validation is the last step: no second pass
        ({"max_steps": 7, "val_check_interval": 5}, [5, 7]),
        ({"max_epochs": 3, "check_val_every_n_epoch": 2}, [40, 60]),
    ],
)
def test_every_run_ends_with_an_evaluation(tmp_path, trainer_kwargs, validated_at):
    trainer, steps = run(tmp_path, **trainer_kwargs)
    assert steps == validated_at
    summary = metrics(tmp_path)
    assert 0 < summary["fvu"] < 2 and summary["l0"] == pytest.approx(4.0)
    assert summary["tokens_trained"] == 64 * trainer.global_step


def test_without_validation_data_the_export_still_happens(tmp_path):
    module = make_module(small_dictionary("topk"), decay_fraction=0.0)
    trainer = quiet_trainer(max_steps=3, default_root_dir=tmp_path, callbacks=[ExportDictionary()])
    trainer.fit(module, batches(5))
    summary = metrics(tmp_path)
    assert summary["fvu"] is None and summary["dead_window_tokens"] == 3 * 64
    assert (tmp_path / "dictionary" / "model.safetensors").is_file()


def test_output_follows_the_root_dir_and_never_replaces_another_run(tmp_path):
    first = tmp_path / "runs" / "a"
    run(first, max_steps=2)
    owner = metrics(first)["run_id"]
    module = make_module(small_dictionary("topk"), decay_fraction=0.0)
    with pytest.raises(OutputExistsError, match=f"{first} already holds the export of another"):
        run(first, module, max_steps=2)
    assert module.global_step == 0  # refused before any training
    assert metrics(first)["run_id"] == owner
    run(first, export=ExportDictionary(overwrite=True), max_steps=2)
    assert metrics(first)["run_id"] != owner


def test_a_resumed_run_replaces_its_own_export(tmp_path):
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    run(tmp_path, max_steps=4, enable_checkpointing=True, callbacks=[checkpoints])
    owner = metrics(tmp_path)["run_id"]
    module = make_module(small_dictionary("topk"), decay_fraction=0.0)
    trainer = quiet_trainer(max_steps=6, default_root_dir=tmp_path, callbacks=[ExportDictionary()])
    trainer.fit(module, batches(20), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert metrics(tmp_path)["run_id"] == owner
    assert metrics(tmp_path)["tokens_trained"] == 6 * 64


class BreakWeights(L.Callback):
    def on_train_end(self, trainer, pl_module):
        with torch.no_grad():
            pl_module.learners["main"].dictionary.W_dec[3, 0] = float("nan")


def test_nonfinite_weights_are_never_exported(tmp_path):
    with pytest.raises(NonFiniteError, match=r"not exporting .*\['W_dec'\]\); nothing was written"):
        run(tmp_path, max_steps=2, callbacks=[BreakWeights()])
    assert not (tmp_path / "dictionary").exists() and not (tmp_path / "metrics.json").exists()


def test_dead_fraction_is_a_training_window_in_tokens(tmp_path):
    torch.manual_seed(0)
    dictionary = small_dictionary("topk", d_latent=256, k=1)
    with torch.no_grad():
        dictionary.W_enc[:, 128:] = 0.0
        dictionary.b_enc[128:] = -1e3  # half the latents can never win the top-1
    frozen = partial(torch.optim.SGD, lr=0.0)  # firing stays as initialised
    module = DictionaryModule(dictionary, optimizer=frozen, dead_tokens_threshold=500)
    validations = Validations()
    trainer = quiet_trainer(
        max_steps=10, default_root_dir=tmp_path, callbacks=[ExportDictionary(), validations]
    )
    # 10 training batches of 100 rows; a validation set of only 16 rows.
    trainer.fit(module, batches(10, rows=100), batches(1, rows=16, seed=1))
    summary = metrics(tmp_path)
    since = module.tokens_since_fired
    assert summary["dead_window_tokens"] == 500
    assert summary["dead_fraction"] == pytest.approx(float((since >= 500).double().mean()))
    assert 0.5 <= summary["dead_fraction"] < 0.75  # the 128 live latents mostly fire
    # 16 rows fire at most 16 of 256 latents: the validation count reads far higher.
    assert summary["dead_fraction_val"] >= 1 - 16 / 256 > summary["dead_fraction"]


def test_a_multi_dictionary_run_exports_each_dictionary(tmp_path):
    module = MultiDictionaryModule(
        {"k2": small_dictionary("topk", k=2), "k4": small_dictionary("topk", k=4)}
    )
    run(tmp_path, module, max_steps=3)
    for name, k in (("k2", 2), ("k4", 4)):
        assert metrics(tmp_path / name)["l0"] == pytest.approx(k)
        assert load_dictionary(str(tmp_path / name / "dictionary")).config.k == k


def test_readme_style_training_creates_the_default_dirpath(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no default_root_dir: Lightning's default, the working dir
    module = make_module(create_dictionary("topk", d_in=32, d_latent=64, k=2), decay_fraction=0)
    quiet_trainer(max_steps=2, callbacks=[ExportDictionary()]).fit(module, batches(3))
    assert (tmp_path / "dictionary" / "config.json").is_file()


def write_cache(folder, rows: dict, scales: dict):
    widths = {site: tensor.shape[-1] for site, tensor in rows.items()}
    with ActivationCacheWriter(
        folder, sites=list(rows), widths=widths, shard_tokens=512, normalization=scales
    ) as writer:
        writer.add(rows)


@pytest.mark.parametrize("transcoder", [False, True])
def test_the_export_folds_the_training_scale_and_takes_raw_activations(tmp_path, transcoder):
    generator = torch.Generator().manual_seed(0)
    x = 7.0 * torch.randn(2048, 32, generator=generator) + 3.0
    rows, scales = {"x": x}, {"x": expected_norm_scale(x)}
    if transcoder:
        rows["y"] = 0.3 * torch.relu(x) @ torch.randn(32, 16, generator=generator)
        scales["y"] = expected_norm_scale(rows["y"])
        dictionary = create_dictionary(
            "topk", d_in=32, d_latent=64, d_out=16, k=4, apply_b_dec_to_input=False
        )
    else:
        dictionary = create_dictionary("topk", d_in=32, d_latent=64, k=4)
    write_cache(tmp_path / "cache", rows, scales)
    data = ActivationDataModule(
        cache_dir=str(tmp_path / "cache"), batch_size=256, val_tokens=512, apply_normalization=True
    )
    module = make_module(dictionary, decay_fraction=0.0)
    trainer = quiet_trainer(max_steps=4, default_root_dir=tmp_path, callbacks=[ExportDictionary()])
    trainer.fit(module, datamodule=data)

    s_in = scales["x"]
    s_out = scales.get("y", s_in)
    assert abs(s_in - 1) > 0.5 and abs(s_out - 1) > 0.5  # a real scaling, not a no-op
    trained = module.dictionary  # the training form: reads s_in * x, writes s_out * y
    assert trained.config.provenance.activation_scale == pytest.approx(s_in)
    exported = load_dictionary(str(tmp_path / "dictionary"))
    assert exported.config.provenance.activation_scale == 1.0  # folded: takes raw input
    raw = x[:64]
    with torch.no_grad():
        expected = trained(s_in * raw) / s_out
        torch.testing.assert_close(exported(raw), expected, rtol=1e-4, atol=1e-4 * s_out**-1)


def test_recorded_scales_refuse_double_scaling_and_unfoldable_transcoders():
    sae = create_dictionary("topk", d_in=8, d_latent=16, k=2)
    assert record_activation_scales(sae, {"x": 0.5}, ["x"])
    assert sae.config.provenance.site == "x" and sae.config.provenance.activation_scale == 0.5
    assert record_activation_scales(sae, {"x": 0.5}, ["x"])  # idempotent
    with pytest.raises(ConfigError, match="activation_scale is 0.5 but the training data"):
        record_activation_scales(sae, {"x": 0.25}, ["x"])
    assert not record_activation_scales(sae, {}, ["x"])  # data that does not scale
    transcoder = create_dictionary("topk", d_in=8, d_latent=16, d_out=8, k=2)  # resid -> resid
    with pytest.raises(ConfigError, match="set apply_b_dec_to_input: false"):
        record_activation_scales(transcoder, {"x": 0.5, "y": 2.0}, ["x", "y"])


def test_the_card_states_the_dead_window():
    entry = CardEntry(
        path="",
        config=create_dictionary("topk", d_in=8, d_latent=16, k=2).config.to_dict(),
        metrics={"fvu": 0.2, "l0": 2.0, "dead_fraction": 0.01, "dead_window_tokens": 200_000},
    )
    text = str(build_card([entry], repo_id="user/sae"))
    assert "| dead window (tokens) |" in text and "| 0.01 | – | 200,000 |" in text
    assert "did not fire in the last *dead window* training tokens" in text
