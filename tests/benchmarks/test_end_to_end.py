"""The end-to-end benchmark's measurements on a tiny random Llama: positive and consistent."""

import json
from pathlib import Path

import pytest

from benchmarks.end_to_end import Setup, break_even, markdown, quickstart_setup, run
from lightning_interp.data.cache import ActivationCache
from tests.backbones.tiny_models import build
from tests.data.test_tokens import BOS, EOS, make_tokenizer, random_texts

TOKENS, BATCH = 384, 64


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("end-to-end")
    model = build("llama")
    model.config.bos_token_id, model.config.eos_token_id = BOS, EOS
    model.save_pretrained(root / "llama")
    make_tokenizer().save_pretrained(root / "llama")
    (root / "texts.txt").write_text("\n".join(random_texts(80, seed=0)) + "\n")
    setup = Setup(
        model=str(root / "llama"),
        sites="layers.1.resid_post",
        text=str(root / "texts.txt"),
        context_size=16,
        batch_size=BATCH,
        buffer_tokens=2 * BATCH,
        d_latent=64,
        k=4,
        lr=1e-3,
        warmup_steps=1,
        decay_fraction=0.2,
        dead_tokens_threshold=10_000,
    )
    return run(setup, TOKENS, root / "work", shard_tokens=128)


def test_every_rate_is_positive_and_every_path_saw_the_same_tokens(report):
    assert set(report["tokens_per_second"]) == {"forward", "live", "cache_write", "cached"}
    assert all(rate > 0 for rate in report["tokens_per_second"].values())
    # The forward and the cache cover the first TOKENS rows; each training run whole batches.
    assert report["forward"]["tokens"] == report["cache_write"]["tokens"] == TOKENS
    assert report["live"]["tokens"] == report["cached"]["tokens"] == TOKENS // BATCH * BATCH
    assert report["live"]["batches"] == report["cached"]["batches"] == TOKENS // BATCH


def test_cache_bytes_per_token_are_the_row_size_plus_headers_and_manifest(report):
    cache = report["cache_write"]
    folder = Path(cache["folder"])
    assert ActivationCache(folder).total_tokens == TOKENS
    assert cache["d_in"] == 32 and cache["dtype_bytes"] == 4 and cache["files"] == 3 + 1
    # Every byte on disk is a row, a shard's safetensors header or the manifest.
    headers = 0
    for shard in folder.glob("shard-*.safetensors"):
        with shard.open("rb") as f:
            headers += 8 + int.from_bytes(f.read(8), "little")
    manifest = (folder / "manifest.json").stat().st_size
    rows = TOKENS * cache["d_in"] * cache["dtype_bytes"]
    assert cache["disk_bytes"] == rows + headers + manifest
    overhead = report["disk_bytes_per_token"] - cache["d_in"] * cache["dtype_bytes"]
    assert 0 < overhead * TOKENS < 16 * 1024  # a few KiB of headers and manifest in all
    assert json.dumps(report)  # the report is JSON, as --json writes it


def test_the_break_even_is_when_the_cache_path_catches_up():
    epochs = break_even(live_tps=100.0, write_tps=100.0, cached_tps=400.0)
    live_cost = epochs / 100.0
    cache_cost = 1 / 100.0 + epochs / 400.0
    assert epochs == pytest.approx(4 / 3) and live_cost == pytest.approx(cache_cost)
    assert break_even(live_tps=100.0, write_tps=100.0, cached_tps=90.0) is None


def test_the_table_names_every_path_and_the_default_setup_is_the_quickstart(report):
    table = markdown(report)
    for label in ("(a)", "(b)", "(c)", "(d)", "Break-even", "bytes per token"):
        assert label in table
    setup = quickstart_setup()
    assert (setup.model, setup.sites, setup.d_latent, setup.k) == (
        "offline:smollm2",
        "layers.6.resid_post",
        9216,
        32,
    )
