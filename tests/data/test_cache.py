"""Tests of the on-disk activation cache, its shuffled resumable reader and the data module."""

from __future__ import annotations

import itertools
import json
import math
import os
from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_interp import create_dictionary
from lightning_interp.data import SparseSuperposition, SyntheticActivations, sharding
from lightning_interp.data.cache import (
    ActivationCache,
    ActivationCacheWriter,
    CachedActivations,
    expected_norm_scale,
)
from lightning_interp.data.datamodule import ActivationDataModule
from lightning_interp.errors import ConfigError, CorruptFileError, ShapeMismatchError
from lightning_interp.modules import DictionaryModule


def write_cache(folder, rows: dict, *, shard_tokens=64, chunk=37, **kwargs) -> ActivationCache:
    sites = list(rows)
    widths = {site: tensor.shape[-1] for site, tensor in rows.items()}
    total = next(iter(rows.values())).shape[0]
    with ActivationCacheWriter(
        folder, sites=sites, widths=widths, shard_tokens=shard_tokens, **kwargs
    ) as writer:
        for begin in range(0, total, chunk):
            writer.add({site: tensor[begin : begin + chunk] for site, tensor in rows.items()})
    return ActivationCache(folder)


def indexed_rows(n: int, d: int = 4) -> torch.Tensor:
    """Row i is filled with i, so a batch tells which rows it holds."""
    return torch.arange(n, dtype=torch.float32)[:, None].expand(n, d).contiguous()


def only(batch: dict) -> torch.Tensor:
    """The rows of a one-site batch ``{site: rows}``."""
    (rows,) = batch.values()
    return rows


def row_ids(batches) -> list[int]:
    return [int(v) for batch in batches for v in only(batch)[:, 0]]


# ---------------------------------------------------------------------- writing and reading
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_bitwise_across_shards(tmp_path, dtype):
    x = torch.randn(250, 8)
    y = torch.randn(250, 3)
    cache = write_cache(tmp_path, {"in": x, "out": y}, dtype=dtype)
    want_x, want_y = x.to(getattr(torch, dtype)), y.to(getattr(torch, dtype))
    assert cache.num_shards == 4 and cache.total_tokens == 250
    for site, want in (("in", want_x), ("out", want_y)):
        got = cache.read(site)
        assert got.dtype == want.dtype and torch.equal(
            got.view(torch.uint8), want.view(torch.uint8)
        )
        assert torch.equal(cache.read(site, 60, 131), want[60:131])  # spans three shards
    assert cache.read("in", 64, 64).shape == (0, 8)
    with pytest.raises(ConfigError):
        cache.read("in", 0, 251)
    with pytest.raises(ConfigError):
        cache.read("nope")


def test_manifest_content(tmp_path):
    metadata = {"backbone": "gpt2", "context_size": 128}
    write_cache(
        tmp_path,
        {"layers.0.resid_post": torch.randn(150, 5)},
        metadata=metadata,
        normalization={"layers.0.resid_post": 0.5},
    )
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest == {
        "format": "lightning-interp-activations",
        "version": 1,
        "sites": ["layers.0.resid_post"],
        "widths": {"layers.0.resid_post": 5},
        "dtype": "float32",
        "shards": [
            {"file": "shard-00000.safetensors", "tokens": 64},
            {"file": "shard-00001.safetensors", "tokens": 64},
            {"file": "shard-00002.safetensors", "tokens": 22},
        ],
        "total_tokens": 150,
        "metadata": metadata,
        "normalization": {"layers.0.resid_post": 0.5},
    }
    # No temporary files are left behind.
    assert sorted(os.listdir(tmp_path)) == [
        "manifest.json",
        "shard-00000.safetensors",
        "shard-00001.safetensors",
        "shard-00002.safetensors",
    ]
    cache = ActivationCache(tmp_path)
    assert cache.metadata == metadata and cache.widths == {"layers.0.resid_post": 5}


def test_add_rejects_bad_input(tmp_path):
    with ActivationCacheWriter(tmp_path, sites=["a", "b"], widths={"a": 4, "b": 2}) as writer:
        with pytest.raises(ShapeMismatchError, match="width 4"):
            writer.add({"a": torch.randn(3, 5), "b": torch.randn(3, 2)})
        with pytest.raises(ShapeMismatchError, match="same number of rows"):
            writer.add({"a": torch.randn(3, 4), "b": torch.randn(2, 2)})
        with pytest.raises(ConfigError):
            writer.add({"a": torch.randn(3, 4)})
        with pytest.raises(ConfigError):
            writer.add(torch.randn(3, 4))
        writer.add({"a": torch.randn(2, 3, 4), "b": torch.randn(6, 2)})  # [batch, seq, d] is rows
    assert ActivationCache(tmp_path).total_tokens == 6
    with pytest.raises(ConfigError):
        ActivationCacheWriter(tmp_path / "x", sites=["a"], widths={"b": 1})
    with pytest.raises(ConfigError):
        ActivationCacheWriter(tmp_path / "x", sites=["a"], widths={"a": 1}, metadata={"f": print})


def test_failure_inside_with_leaves_an_empty_folder(tmp_path):
    with pytest.raises(RuntimeError, match="capture failed"):
        with ActivationCacheWriter(tmp_path, sites=["a"], widths={"a": 4}, shard_tokens=16) as w:
            w.add(torch.randn(40, 4))  # two full shards are on disk by now
            assert len(list(tmp_path.glob("shard-*"))) == 2
            raise RuntimeError("capture failed")
    assert os.listdir(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        ActivationCache(tmp_path)


def test_existing_cache_needs_overwrite(tmp_path):
    write_cache(tmp_path, {"a": torch.randn(200, 4)})
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ActivationCacheWriter(tmp_path, sites=["a"], widths={"a": 4})
    assert ActivationCache(tmp_path).total_tokens == 200  # untouched
    cache = write_cache(tmp_path, {"a": torch.randn(70, 4)}, overwrite=True)
    assert cache.total_tokens == 70
    # The new generation has new shard names; the old shards are gone once it is committed.
    listed = [shard["file"] for shard in cache._manifest["shards"]]
    assert len(listed) == 2 and sorted(os.listdir(tmp_path)) == sorted(["manifest.json", *listed])


# ---------------------------------------------------------------------- damaged caches
@pytest.fixture
def cache_dir(tmp_path):
    write_cache(tmp_path, {"a": torch.randn(150, 4)})
    return tmp_path


def test_missing_folder_and_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ActivationCache(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="ActivationCacheWriter"):
        ActivationCache(tmp_path)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: "{not json",
        lambda m: json.dumps({**m, "format": "something-else"}),
        lambda m: json.dumps({**m, "version": 2}),
        lambda m: json.dumps({**m, "total_tokens": 151}),
        lambda m: json.dumps({k: v for k, v in m.items() if k != "shards"}),
        lambda m: json.dumps({**m, "widths": {"a": 0}}),
        lambda m: json.dumps({**m, "dtype": "int8"}),
        lambda m: json.dumps({**m, "shards": [{"file": "../x", "tokens": 150}]}),
        lambda m: json.dumps({**m, "shards": [{"file": "..", "tokens": 150}]}),
        lambda m: json.dumps({**m, "shards": [{"file": "/etc/passwd", "tokens": 150}]}),
        lambda m: json.dumps(
            {**m, "shards": [{"file": "shard-00000.safetensors", "tokens": True}]}
        ),
    ],
    ids=[
        "json",
        "format",
        "version",
        "total",
        "no-shards",
        "width",
        "dtype",
        "path",
        "parent",
        "absolute",
        "bool-tokens",
    ],
)
def test_corrupt_manifest(cache_dir, edit):
    path = cache_dir / "manifest.json"
    path.write_text(edit(json.loads(path.read_text())))
    with pytest.raises(CorruptFileError, match="manifest.json"):
        ActivationCache(cache_dir)


def test_missing_shard(cache_dir):
    (cache_dir / "shard-00001.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="shard-00001.safetensors is missing"):
        ActivationCache(cache_dir)


def test_truncated_shard(cache_dir):
    path = cache_dir / "shard-00001.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptFileError, match="shard-00001.*truncated"):
        ActivationCache(cache_dir)
    cache = ActivationCache(cache_dir, verify=False)  # found on first read instead
    assert cache.read("a", 0, 64).shape == (64, 4)
    with pytest.raises(CorruptFileError):
        cache.read("a", 60, 70)


@pytest.mark.parametrize(("width", "dtype"), [(3, "float32"), (4, "bfloat16")])
def test_shard_contradicting_manifest(cache_dir, tmp_path_factory, width, dtype):
    other = tmp_path_factory.mktemp("other")
    write_cache(other, {"a": torch.randn(150, width)}, dtype=dtype)
    (other / "shard-00000.safetensors").replace(cache_dir / "shard-00000.safetensors")
    with pytest.raises(CorruptFileError, match="manifest says"):
        ActivationCache(cache_dir)


# ---------------------------------------------------------------------- shuffled reading
@pytest.fixture
def indexed_cache(tmp_path):
    return write_cache(tmp_path, {"a": indexed_rows(300)}, shard_tokens=40)


def test_epoch_covers_every_row_once_and_reshuffles(indexed_cache):
    ds = CachedActivations(indexed_cache, batch_size=32, drop_last=False, seed=3)
    assert len(ds) == math.ceil(300 / 32)
    epoch0, epoch1 = list(ds), list(ds)
    for epoch in (epoch0, epoch1):
        assert sorted(row_ids(epoch)) == list(range(300))
    assert row_ids(epoch0) != row_ids(epoch1)
    again = CachedActivations(indexed_cache, batch_size=32, drop_last=False, seed=3)
    assert row_ids(list(again)) == row_ids(epoch0)
    other_seed = CachedActivations(indexed_cache, batch_size=32, drop_last=False, seed=4)
    assert row_ids(list(other_seed)) != row_ids(epoch0)
    # Rows of a batch come from more than one shard.
    shards_per_batch = [len({int(v) // 40 for v in only(b)[:, 0]}) for b in epoch0[:-1]]
    assert min(shards_per_batch) >= 2
    dropped = CachedActivations(indexed_cache, batch_size=32, seed=3)
    assert len(dropped) == 9 and all(only(b).shape == (32, 4) for b in dropped)


def test_unshuffled_reads_in_order(indexed_cache):
    ds = CachedActivations(indexed_cache, batch_size=50, shuffle=False, start=30, stop=230)
    assert row_ids(list(ds)) == list(range(30, 230))


def test_two_sites_stay_aligned(tmp_path):
    x = torch.randn(300, 6)
    cache = write_cache(tmp_path, {"mlp_in": x, "mlp_out": 2 * x[:, :3] + 1}, shard_tokens=50)
    ds = CachedActivations(cache, batch_size=64, sites=["mlp_out", "mlp_in"], seed=1)
    for batch in ds:
        assert list(batch) == ["mlp_out", "mlp_in"]  # keyed by site, in the order asked
        assert torch.equal(batch["mlp_out"], 2 * batch["mlp_in"][:, :3] + 1)
    single = next(iter(CachedActivations(cache, batch_size=8, sites=["mlp_in"])))
    assert list(single) == ["mlp_in"] and single["mlp_in"].shape == (8, 6)


def test_workers_split_the_stream(indexed_cache):
    in_process = list(CachedActivations(indexed_cache, batch_size=16, seed=5))
    ds = CachedActivations(indexed_cache, batch_size=16, seed=5)
    loaded = list(DataLoader(ds, batch_size=None, num_workers=2))
    assert len(loaded) == len(in_process) == len(ds)
    assert row_ids(loaded) == row_ids(in_process)  # same batches, same order, none repeated


def test_ranks_split_the_stream_evenly(indexed_cache, monkeypatch):
    full = list(CachedActivations(indexed_cache, batch_size=32, seed=0))  # 9 batches
    per_rank = []
    for rank in range(2):
        monkeypatch.setattr(sharding, "world", lambda r=rank: (r, 2))
        ds = CachedActivations(indexed_cache, batch_size=32, seed=0)
        per_rank.append(list(ds))
        assert len(ds) == 4 == len(per_rank[-1])  # the ninth batch is dropped for both
    interleaved = [b for pair in zip(*per_rank, strict=True) for b in pair]
    assert row_ids(interleaved) == row_ids(full[:8])


def test_resume_mid_epoch(indexed_cache):
    make = partial(CachedActivations, indexed_cache, batch_size=16, seed=2)
    reference = make()
    epoch0, epoch1 = list(reference), list(reference)
    interrupted = make()
    list(interrupted)  # epoch 0 done
    assert interrupted.state_dict() == {"epoch": 1, "batches_yielded": 0}
    list(itertools.islice(iter(interrupted), 7))
    state = interrupted.state_dict()
    assert state == {"epoch": 1, "batches_yielded": 7}
    resumed = make()
    resumed.load_state_dict(state)
    assert row_ids(list(resumed)) == row_ids(epoch1[7:])
    assert resumed.state_dict() == {"epoch": 2, "batches_yielded": 0}
    resumed.set_epoch(0)
    assert row_ids(list(resumed)) == row_ids(epoch0)
    with pytest.raises(ConfigError):
        resumed.load_state_dict({"epoch": -1})


# ---------------------------------------------------------------------- normalisation
def test_expected_norm_scale():
    x = torch.randn(4000, 64) * 3 + 1
    scale = expected_norm_scale(x)
    assert (scale * x).norm(dim=-1).mean().item() == pytest.approx(8.0, rel=1e-5)
    assert (expected_norm_scale(x, 2.0) * x).norm(dim=-1).mean().item() == pytest.approx(2.0)
    with pytest.raises(ConfigError):
        expected_norm_scale(torch.zeros(5, 3))


def test_normalization_round_trips_and_applies(tmp_path):
    x = torch.randn(256, 16) * 7
    y = torch.randn(256, 4)
    scale = expected_norm_scale(x)
    cache = write_cache(tmp_path, {"x": x, "y": y}, normalization={"x": scale})
    assert cache.normalization == {"x": scale}
    assert torch.equal(cache.read("x"), x)  # stored raw
    raw = CachedActivations(cache, batch_size=256, shuffle=False)
    scaled = CachedActivations(cache, batch_size=256, shuffle=False, apply_normalization=True)
    (rx, ry), (sx, sy) = next(iter(raw)).values(), next(iter(scaled)).values()
    torch.testing.assert_close(sx, rx * scale)
    assert torch.equal(sy, ry)  # no scale recorded for y
    assert sx.norm(dim=-1).mean().item() == pytest.approx(4.0, rel=1e-5)
    with pytest.raises(ConfigError):
        write_cache(tmp_path / "bad", {"x": x}, normalization={"x": -1.0})


# ---------------------------------------------------------------------- the data module
@pytest.fixture(scope="module")
def planted_cache(tmp_path_factory):
    data = SparseSuperposition(d=32, n_features=64, firing_probability=3 / 64, offset_norm=1.0)
    folder = tmp_path_factory.mktemp("planted")
    x, _ = data.sample(8192, generator=torch.Generator().manual_seed(0))
    write_cache(folder, {"layers.0.resid_post": x}, shard_tokens=1024, chunk=500)
    return folder


def new_module() -> DictionaryModule:
    torch.manual_seed(0)
    return DictionaryModule(
        create_dictionary("topk", d_in=32, d_latent=128, k=4),
        optimizer=partial(torch.optim.Adam, lr=3e-3),
        warmup_steps=5,
        decay_fraction=0.2,
        dead_tokens_threshold=20_000,
    )


def test_datamodule_trains_with_validation(planted_cache, trainer_kwargs):
    dm = ActivationDataModule(cache_dir=str(planted_cache), batch_size=256, val_tokens=1024)
    module = new_module()
    trainer = L.Trainer(max_epochs=1, **trainer_kwargs)
    trainer.fit(module, datamodule=dm)
    assert dm.val_tokens == 1024
    assert int(module.tokens_seen) == (8192 - 1024) // 256 * 256
    assert trainer.num_val_batches == [4]
    fvu = trainer.callback_metrics["val/fvu"].item()
    assert 0 < fvu < 0.8


class RecordBatches(Callback):
    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(only(batch).clone())


@pytest.mark.parametrize(("num_workers", "steps"), [(0, (7, 14, 21)), (2, (21,))])
def test_datamodule_resumes_exactly(planted_cache, tmp_path, trainer_kwargs, num_workers, steps):
    # 14 batches an epoch, 24 steps: checkpoints mid epoch 0, at its very end, mid epoch 1.
    # Workers run ahead of training (prefetch), so their position cannot come from the dataset.
    kwargs = {**trainer_kwargs, "enable_checkpointing": True, "max_steps": 24}
    kwargs["default_root_dir"] = tmp_path / "root"  # the resumed runs' default checkpoints
    make_dm = partial(
        ActivationDataModule,
        cache_dir=str(planted_cache),
        batch_size=512,
        seed=7,
        num_workers=num_workers,
    )
    full_record = RecordBatches()
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=7, save_top_k=-1)
    full = new_module()
    L.Trainer(callbacks=[full_record, saver], **kwargs).fit(full, datamodule=make_dm())
    assert len(full_record.batches) == 24
    assert not torch.equal(full_record.batches[0], full_record.batches[14])  # a new epoch
    for step in steps:
        (ckpt,) = tmp_path.glob(f"*step={step}.ckpt")
        record = RecordBatches()
        resumed = new_module()
        trainer = L.Trainer(callbacks=[record], **kwargs)
        trainer.fit(resumed, datamodule=make_dm(), ckpt_path=ckpt)
        assert len(record.batches) == 24 - step
        for got, want in zip(record.batches, full_record.batches[step:], strict=True):
            assert torch.equal(got, want)
        for name, value in full.dictionary.state_dict().items():
            torch.testing.assert_close(resumed.dictionary.state_dict()[name], value)


def test_datamodule_workers_advance_epochs(indexed_cache):
    dm = ActivationDataModule(cache_dir=str(indexed_cache.directory), batch_size=32, num_workers=2)
    loader = dm.train_dataloader()
    reference = CachedActivations(indexed_cache, batch_size=32)
    for _ in range(2):  # with workers the dataset is copied; each pass must still advance
        assert row_ids(list(loader)) == row_ids(list(reference))
    assert dm.val_dataloader() == []


def test_datamodule_serves_live_datasets(trainer_kwargs):
    data = SparseSuperposition(d=32, n_features=64, firing_probability=3 / 64)
    dm = ActivationDataModule(
        train_dataset=partial(SyntheticActivations, data, 128, 10, seed=1),
        val_dataset=SyntheticActivations(data, 128, 2, seed=2),
    )
    module = new_module()
    trainer = L.Trainer(max_epochs=1, **trainer_kwargs)
    trainer.fit(module, datamodule=dm)
    assert int(module.tokens_seen) == 1280 and "val/fvu" in trainer.callback_metrics
    assert dm.state_dict() == {}  # SyntheticActivations has no position to store


def test_datamodule_rejects_bad_arguments(planted_cache):
    with pytest.raises(ConfigError, match="exactly one"):
        ActivationDataModule()
    with pytest.raises(ConfigError, match="exactly one"):
        ActivationDataModule(cache_dir="x", train_dataset=lambda: None)
    dm = ActivationDataModule(cache_dir=str(planted_cache), val_tokens=8192)
    with pytest.raises(ConfigError, match="no training rows"):
        dm.setup("fit")


def test_datamodule_arguments_parse_from_the_command_line(planted_cache):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(ActivationDataModule, "data")
    config = parser.parse_args(
        ["--data.cache_dir", str(planted_cache), "--data.val_tokens", "1024", "--data.sites",
         "[layers.0.resid_post]"]
    )  # fmt: skip
    dm = parser.instantiate_classes(config).data
    assert isinstance(dm, ActivationDataModule) and dm.val_tokens == 1024
