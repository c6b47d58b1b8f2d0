"""Dictionaries take their widths and provenance from the data module, once, at setup."""

from functools import partial

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_interp import create_dictionary
from lightning_interp.data import ActivationCacheWriter, ActivationDataModule
from lightning_interp.errors import ConfigError, ShapeMismatchError
from lightning_interp.modules import DictionaryModule, MultiDictionaryModule
from tests.helpers import quiet_trainer

TOPK = {"architecture": "topk", "d_latent": 64, "k": 4}


@pytest.fixture
def cache(tmp_path):
    """A cache of two sites, x (32 wide) and y (16 wide), recording its provenance."""
    generator = torch.Generator().manual_seed(0)
    rows = {"x": torch.randn(512, 32, generator=generator)}
    rows["y"] = torch.relu(rows["x"][:, :16])
    metadata = {"provenance": {"backbone": "org/model", "dataset": "org/data", "extra": {"a": 1}}}
    folder = tmp_path / "cache"
    with ActivationCacheWriter(
        folder, sites=list(rows), widths={"x": 32, "y": 16}, metadata=metadata
    ) as writer:
        writer.add(rows)
    return str(folder)


def data(cache, **kwargs) -> ActivationDataModule:
    return ActivationDataModule(cache_dir=cache, batch_size=64, val_tokens=128, **kwargs)


def test_an_autoencoder_without_d_in_is_built_from_the_site_width(cache):
    module = DictionaryModule(TOPK)
    with pytest.raises(ConfigError, match="built at setup, from the data module's site widths"):
        module.dictionary  # noqa: B018
    quiet_trainer(max_steps=2).fit(module, datamodule=data(cache, sites=["x"]))
    config = module.dictionary.config
    assert (config.d_in, config.d_out, config.output_width) == (32, None, 32)
    provenance = config.provenance
    assert (provenance.site, provenance.site_out) == ("x", None)
    assert (provenance.backbone, provenance.dataset, provenance.extra) == (
        "org/model",
        "org/data",
        {"a": 1},
    )
    # Checkpoints keep the real size, so load_from_checkpoint rebuilds the dictionary.
    assert module.hparams["dictionary"]["init_args"]["config"]["d_in"] == 32


def test_two_sites_make_a_transcoder_sized_by_both(cache):
    module = DictionaryModule({**TOPK, "apply_b_dec_to_input": False})
    quiet_trainer(max_steps=2).fit(module, datamodule=data(cache))
    config = module.dictionary.config
    assert (config.d_in, config.d_out) == (32, 16)
    assert (config.provenance.site, config.provenance.site_out) == ("x", "y")


def test_a_deferred_dictionary_starts_from_the_weights_an_eager_one_would(cache):
    torch.manual_seed(3)
    eager = create_dictionary("topk", d_in=32, d_latent=64, k=4)
    torch.manual_seed(3)
    module = DictionaryModule(TOPK)
    torch.randn(1000)  # whatever the data module's setup draws in between
    quiet_trainer().validate(module, datamodule=data(cache, sites=["x"]), verbose=False)
    for name, tensor in eager.state_dict().items():
        assert torch.equal(module.dictionary.state_dict()[name], tensor), name


def test_each_dictionary_of_a_multi_run_is_sized_by_its_own_site(cache):
    module = MultiDictionaryModule(
        {
            "y16": {**TOPK, "provenance": {"site": "y"}},
            "x32": create_dictionary("topk", d_in=32, d_latent=64, k=2, provenance={"site": "x"}),
            "x": {**TOPK, "provenance": {"site": "x"}},
        },
        learning_rates={"y16": 1e-3},
    )
    quiet_trainer(max_steps=2).fit(module, datamodule=data(cache))
    assert list(module.dictionaries) == ["y16", "x32", "x"]  # the order given
    widths = {name: d.d_in for name, d in module.dictionaries.items()}
    assert widths == {"y16": 16, "x32": 32, "x": 32}
    assert all(d.config.provenance.backbone == "org/model" for d in module.dictionaries.values())
    assert all(int(learner.tokens_seen) == 128 for learner in module.learners.values())


def test_a_dictionary_naming_no_site_of_a_pair_must_fit_the_pair(cache):
    # Two sites without a named one are a transcoder's: x (32) -> y (16), not 32 -> 32.
    module = MultiDictionaryModule({"sae": create_dictionary("topk", d_in=32, d_latent=64, k=2)})
    with pytest.raises(ShapeMismatchError, match="'sae' writes 32 wide rows but its output site"):
        quiet_trainer(max_steps=1).fit(module, datamodule=data(cache))


def test_a_given_width_is_checked_against_the_site(cache):
    module = DictionaryModule(create_dictionary("topk", d_in=16, d_latent=64, k=4))
    with pytest.raises(ShapeMismatchError, match="d_in=16 but site 'x' of the data is 32 wide"):
        quiet_trainer(max_steps=1).fit(module, datamodule=data(cache, sites=["x"]))


def test_an_open_width_needs_a_data_module_that_gives_it():
    module = DictionaryModule(TOPK)
    loader = DataLoader([torch.randn(64, 32)], batch_size=None)
    with pytest.raises(ConfigError, match="leaves d_in open, and only a data module"):
        quiet_trainer(max_steps=1).fit(module, loader)


def test_a_deferred_run_resumes_and_loads_from_its_checkpoint(cache, tmp_path):
    def fit(steps, ckpt_path=None):
        module = DictionaryModule(TOPK, optimizer=partial(torch.optim.Adam, lr=1e-3))
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
        trainer = quiet_trainer(
            max_steps=steps, enable_checkpointing=True, callbacks=[saver], limit_val_batches=0
        )
        trainer.fit(module, datamodule=data(cache, sites=["x"]), ckpt_path=ckpt_path)
        return module

    first = fit(3)
    last = tmp_path / "ckpt" / "last.ckpt"
    resumed = fit(5, ckpt_path=last)
    assert int(resumed.tokens_seen) == 5 * 64
    loaded = DictionaryModule.load_from_checkpoint(last)  # no trainer, no data module
    assert loaded.dictionary.d_in == 32
    assert torch.equal(loaded.dictionary.W_dec, resumed.dictionary.W_dec)
    assert not torch.equal(first.dictionary.W_dec, resumed.dictionary.W_dec)
