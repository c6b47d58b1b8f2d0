"""End to end: training from the live stream vs from the on-disk cache, and when caching pays.

On the quickstart's setup (``recipes/quickstart.yaml``: the offline SmolLM2-135M-Instruct,
site ``layers.6.resid_post``, offline Wikipedia text, TopK 16x with k 32, batch 2048, Adam
1e-3), over the same first ``--tokens`` training tokens, four timings in one process:

a. **forward**: the backbone alone up to the site, with early exit (``Backbone.capture``
   through ``ActivationStream.rows_in_text_order``: the stream's own capture batches and
   kept positions, no shuffling buffer, no training);
b. **live**: a Lightning ``Trainer`` fitting a ``DictionaryModule`` on a
   ``LanguageModelDataModule``, as the quickstart recipe does (without its evaluation
   callbacks and validation);
c. **cache write**: the same rows, in text order, through an ``ActivationCacheWriter``
   (forward + write; the reader shuffles, so no buffer is needed);
d. **cached**: the same ``Trainer`` and module on an ``ActivationDataModule`` reading that
   cache.

Training tokens/s come from ``benchmarks.throughput.TokensPerSecond`` with its clock moved to
the start of ``fit`` (:class:`WholeFit`): the live stream fills its shuffling buffer before the
first batch, so timing from a later batch would leave up to ``buffer_tokens`` of forwards out.
Both trainings thus include the same fixed costs (the trainer's set-up, the first step), a
small share of a run of 30 batches or more. The backbone is loaded before any clock starts.

Break-even: training E epochs over the same tokens costs ``E / live`` per token from the live
stream and ``1 / write + E / cached`` through the cache, so caching pays once
``E > (1 / write) / (1 / live - 1 / cached)`` (never if the cache does not train faster).
The cache is read right after it was written, so from the page cache; a cache larger than RAM
reads at the disk's speed. Disk bytes per token count every file in the cache folder.

Run from the repository root. At the default 65536 tokens the four parts took 7 minutes on 2
cores at load average 6-7; idle, about 2 minutes (the forward runs ~5x faster idle, see
``benchmarks/capture.py``)::

    nice -n 5 .venv/bin/python benchmarks/end_to_end.py
    .venv/bin/python benchmarks/end_to_end.py --tokens 262144 --dtype bfloat16 --json e2e.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path

import lightning as L
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: benchmarks/ alone is on sys.path
    sys.path.insert(0, str(ROOT))

from benchmarks.throughput import TokensPerSecond  # noqa: E402
from lightning_interp.data import ActivationDataModule, LanguageModelDataModule  # noqa: E402
from lightning_interp.data.cache import ActivationCacheWriter  # noqa: E402
from lightning_interp.modules import DictionaryModule  # noqa: E402

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


@dataclass
class Setup:
    """What is trained on what: the quickstart recipe's data and dictionary settings."""

    model: str
    sites: str
    text: str
    context_size: int
    batch_size: int
    buffer_tokens: int
    d_latent: int
    k: int
    lr: float
    warmup_steps: int
    decay_fraction: float
    dead_tokens_threshold: int


def quickstart_setup(recipe: Path = QUICKSTART) -> Setup:
    """The settings of a recipe shaped like ``recipes/quickstart.yaml``."""
    config = yaml.safe_load(recipe.read_text())
    data = config["data"]["init_args"]
    model = config["model"]["init_args"]
    dictionary = model["dictionary"]["init_args"]["config"]
    return Setup(
        model=data["model"],
        sites=data["sites"],
        text=data["text"],
        context_size=data["context_size"],
        batch_size=data["batch_size"],
        buffer_tokens=data["buffer_tokens"],
        d_latent=dictionary["d_latent"],
        k=dictionary["k"],
        lr=model["optimizer"]["init_args"]["lr"],
        warmup_steps=model["warmup_steps"],
        decay_fraction=model["decay_fraction"],
        dead_tokens_threshold=model["dead_tokens_threshold"],
    )


class WholeFit(TokensPerSecond):
    """``TokensPerSecond`` timing the whole fit: from ``on_fit_start``, every batch counted."""

    def __init__(self, out: str) -> None:
        super().__init__(out, skip=0)

    def on_fit_start(self, trainer, pl_module) -> None:  # noqa: D102
        self._sync(pl_module)
        self.start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: D102
        pass  # the clock started at on_fit_start


def live_datamodule(setup: Setup, tokens: int) -> LanguageModelDataModule:
    """The quickstart's data module serving ``tokens`` training rows, backbone loaded."""
    datamodule = LanguageModelDataModule(
        model=setup.model,
        sites=setup.sites,
        text=setup.text,
        context_size=setup.context_size,
        batch_size=setup.batch_size,
        buffer_tokens=setup.buffer_tokens,
        train_tokens=tokens,
        val_tokens=setup.batch_size,
    )
    datamodule.setup("fit")  # loads the backbone now, outside every timing
    return datamodule


def dictionary_module(setup: Setup) -> DictionaryModule:
    """The quickstart's TopK dictionary and optimiser (``d_in`` comes from the data)."""
    return DictionaryModule(
        {"architecture": "topk", "d_latent": setup.d_latent, "k": setup.k},
        optimizer=partial(torch.optim.Adam, lr=setup.lr),
        warmup_steps=setup.warmup_steps,
        decay_fraction=setup.decay_fraction,
        dead_tokens_threshold=setup.dead_tokens_threshold,
    )


def time_forward(datamodule: LanguageModelDataModule, tokens: int) -> dict:
    """(a) The backbone's forward up to the site, early exit, over the first ``tokens`` rows."""
    start = time.perf_counter()
    rows = sum(
        next(iter(batch.values())).shape[0]
        for batch in datamodule.train_stream.rows_in_text_order(tokens)
    )
    return {"tokens": rows, "seconds": time.perf_counter() - start}


def write_cache(
    datamodule: LanguageModelDataModule,
    tokens: int,
    folder: Path,
    dtype: str = "float32",
    shard_tokens: int = 16384,
) -> dict:
    """(c) Capture the first ``tokens`` rows and write them as a cache in ``folder``."""
    site = datamodule.sites[0]
    start = time.perf_counter()
    writer = None
    for batch in datamodule.train_stream.rows_in_text_order(tokens):
        rows = batch[site]
        if writer is None:  # the width is known once the first rows exist
            writer = ActivationCacheWriter(
                folder,
                sites=[site],
                widths={site: rows.shape[-1]},
                dtype=dtype,
                shard_tokens=shard_tokens,
                metadata={"provenance": datamodule.provenance},
                overwrite=True,
            )
        writer.add(rows)
    if writer is None:
        raise RuntimeError(f"the text gave no rows at {site}; nothing to cache")
    written = writer.total_tokens
    writer.close()
    seconds = time.perf_counter() - start
    files = [path for path in folder.iterdir() if path.is_file() and path.name != ".writer.lock"]
    disk = sum(path.stat().st_size for path in files)
    return {
        "tokens": written,
        "seconds": seconds,
        "disk_bytes": disk,
        "d_in": writer.widths[site],
        "dtype_bytes": torch.empty((), dtype=writer.dtype).element_size(),
        "files": len(files),
        "folder": str(folder),
    }


def time_training(module: DictionaryModule, datamodule: L.LightningDataModule, out: Path) -> dict:
    """(b)/(d) One epoch of ``module`` on ``datamodule``; WholeFit's JSON as a dict."""
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[WholeFit(str(out))],
    )
    trainer.fit(module, datamodule=datamodule)
    return json.loads(out.read_text())


def break_even(live_tps: float, write_tps: float, cached_tps: float) -> float | None:
    """Epochs over the same tokens after which caching is cheaper (``None``: never)."""
    saved_per_epoch = 1 / live_tps - 1 / cached_tps
    return (1 / write_tps) / saved_per_epoch if saved_per_epoch > 0 else None


def progress(phase: str) -> None:
    """Say which measurement runs (stderr, so the table on stdout stays clean)."""
    print(f"[end-to-end] {time.strftime('%H:%M:%S')} {phase}", file=sys.stderr, flush=True)


def run(
    setup: Setup, tokens: int, work: Path, dtype: str = "float32", shard_tokens: int = 16384
) -> dict:
    """All four measurements and the break-even, as a report dict."""
    datamodule = live_datamodule(setup, tokens)
    progress("(a) forward")
    forward = time_forward(datamodule, tokens)
    progress("(c) cache write")
    cache = write_cache(datamodule, tokens, work / "cache", dtype, shard_tokens)
    progress("(b) training from the live stream")
    torch.manual_seed(0)
    live = time_training(dictionary_module(setup), datamodule, work / "live.json")
    progress("(d) training from the cache")
    cached_data = ActivationDataModule(cache_dir=str(work / "cache"), batch_size=setup.batch_size)
    torch.manual_seed(0)
    cached = time_training(dictionary_module(setup), cached_data, work / "cached.json")
    rates = {
        name: part["tokens"] / part["seconds"]
        for name, part in (("forward", forward), ("cache_write", cache))
    }
    rates["live"], rates["cached"] = live["tokens_per_second"], cached["tokens_per_second"]
    return {
        "setup": {f.name: getattr(setup, f.name) for f in fields(setup)},
        "tokens": tokens,
        "forward": forward,
        "live": live,
        "cache_write": cache,
        "cached": cached,
        "tokens_per_second": rates,
        "break_even_epochs": break_even(rates["live"], rates["cache_write"], rates["cached"]),
        "disk_bytes_per_token": cache["disk_bytes"] / cache["tokens"],
    }


def machine() -> str:
    """CPU, cores, torch and load, one line."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():  # Linux names the CPU model; platform.processor() often does not
        names = [line for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    return (
        f"{cpu}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {load}"
    )


def markdown(report: dict) -> str:
    """The report as a markdown table and the break-even line."""
    s, rates = report["setup"], report["tokens_per_second"]
    cache = report["cache_write"]
    lines = [
        f"{s['model']} at {s['sites']}, TopK d_latent {s['d_latent']} k {s['k']}, batch "
        f"{s['batch_size']}, {report['tokens']} tokens of {s['text']}",
        "",
        "| path | tokens | seconds | tokens/s | vs forward |",
        "|---|---:|---:|---:|---:|",
    ]
    names = {
        "forward": "(a) backbone forward to the site",
        "live": "(b) training from the live stream",
        "cache_write": f"(c) writing the cache ({cache['d_in']} x {cache['dtype_bytes']} B)",
        "cached": "(d) training from the cache",
    }
    for key, name in names.items():
        part = report[key]
        lines.append(
            f"| {name} | {part['tokens']} | {part['seconds']:.1f} | {rates[key]:,.0f} | "
            f"{rates[key] / rates['forward']:.2f} |"
        )
    epochs = report["break_even_epochs"]
    verdict = (
        f"caching pays after {epochs:.2f} epochs over the same tokens"
        if epochs is not None
        else "caching never pays: training from the cache is not faster than from the stream"
    )
    lines += [
        "",
        f"Break-even: {verdict}. Disk: {report['disk_bytes_per_token']:,.2f} bytes per token "
        f"({cache['disk_bytes'] / 2**20:,.1f} MiB in {cache['files']} files).",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=65536, help="training tokens per run")
    parser.add_argument("--recipe", type=Path, default=QUICKSTART, help="quickstart-shaped YAML")
    parser.add_argument("--dtype", default="float32", help="cache storage dtype")
    parser.add_argument("--shard-tokens", type=int, default=16384, help="rows per cache shard")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--work", type=Path, default=None, help="cache folder (default: a temp)")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the four measurements and print the table."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    setup = quickstart_setup(args.recipe)
    with tempfile.TemporaryDirectory(prefix="end-to-end-") as tmp:
        work = args.work or Path(tmp)
        before = machine()
        report = run(setup, args.tokens, work, args.dtype, args.shard_tokens)
        report["machine"] = {"before": before, "after": machine()}
    print(f"before: {report['machine']['before']}")
    print(f"after:  {report['machine']['after']}")
    print(markdown(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
