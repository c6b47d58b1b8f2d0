"""The cost curve: TopK step time and peak memory of every library over d_latent and batch size.

Run through ``benchmarks/compare.py --sweep`` (same peers, same worker subprocesses, same
``--device``, ``--steps``/``--warmup``/``--threads``), e.g. on this shared CPU::

    nice -n 10 .venv/bin/python benchmarks/compare.py --sweep --skip-install --steps 2 --warmup 1

Two sweeps at ``d_in = 768``, no dead latents:

- d_latent in ``--sweep-latents`` (default 6144, 16384, 32768, 65536) at batch ``--sweep-batch``
  (default 1024);
- batch in ``--sweep-batches`` (default 256, 1024, 4096) at d_latent ``--sweep-fixed-latent``
  (default 16384).

Every point is one worker subprocess per library (``compare_steps.py``), plus the lone encoder
matmul. Results go to ``--sweep-json`` (default ``runs/benchmark_sweep.json``, appended as they
arrive, so an interrupted sweep keeps what it measured); the plot (time and peak memory, log
axes) to ``docs/img/benchmark_sweep.png`` when matplotlib is installed (``pip install -e
'.[bench]'``); a markdown table is printed.
"""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
D_IN = 768
LATENTS = (6144, 16384, 32768, 65536)
BATCHES = (256, 1024, 4096)
SWEEP_BATCH = 1024
FIXED_LATENT = 16384
DEFAULT_JSON = ROOT / "runs" / "benchmark_sweep.json"
DEFAULT_PNG = ROOT / "docs" / "img" / "benchmark_sweep.png"
ORDER = ("ours", "saelens", "dictionary_learning", "sparsify", "matmul")
LABELS = {
    "ours": "lightning-interp",
    "saelens": "SAELens",
    "dictionary_learning": "dictionary_learning",
    "sparsify": "sparsify",
    "matmul": "lone encoder matmul",
}


def points(args) -> list[tuple[str, int, int]]:
    """``(sweep, d_latent, batch)`` for both sweeps (a shared point is measured once)."""
    latents = getattr(args, "sweep_latents", None) or LATENTS
    batches = getattr(args, "sweep_batches", None) or BATCHES
    batch = getattr(args, "sweep_batch", None) or SWEEP_BATCH
    fixed = getattr(args, "sweep_fixed_latent", None) or FIXED_LATENT
    grid = [("d_latent", n, batch) for n in latents]
    grid += [
        ("batch", fixed, b) for b in batches if (fixed, b) != (fixed, batch) or fixed not in latents
    ]
    return grid


def run_sweep(args, libraries: list[str], measure) -> list[dict]:
    """Measure every point for every library (and the matmul), then table and plot."""
    out = Path(os.environ.get("SWEEP_JSON", DEFAULT_JSON))
    out.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "measured": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, {platform.processor()}",
        "device": args.device,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": args.threads,
        "load_before": Path("/proc/loadavg").read_text().split()[:3],
    }
    results: list[dict] = []
    for sweep, d_latent, batch in points(args):
        for library in [*libraries, "matmul"]:
            try:
                r = measure(library, D_IN, 0.0, args, d_latent=d_latent, batch=batch)
            except (RuntimeError, OSError) as err:  # e.g. out of memory: keep the rest
                print(f"  {library} d_latent={d_latent} batch={batch} failed: {err}", flush=True)
                continue
            r["sweep"] = sweep
            results.append(r)
            out.write_text(json.dumps({**header, "results": results}, indent=1))
    header["load_after"] = Path("/proc/loadavg").read_text().split()[:3]
    out.write_text(json.dumps({**header, "results": results}, indent=1))
    print(table(results))
    plot(results, DEFAULT_PNG)
    return results


def _axes(results: list[dict]) -> tuple[int, int]:
    """The d_latent sweep's batch and the batch sweep's d_latent, read from the results."""
    batch = next(r["batch"] for r in results if r["sweep"] == "d_latent")
    fixed = next((r["d_latent"] for r in results if r["sweep"] == "batch"), FIXED_LATENT)
    return batch, fixed


def table(results: list[dict]) -> str:
    """Markdown: one row per point, ms/step and peak MiB per library."""
    libs = [lib for lib in ORDER if any(r["library"] == lib for r in results)]
    cells = {(r["sweep"], r["d_latent"], r["batch"], r["library"]): r for r in results}
    keys = sorted({(r["sweep"], r["d_latent"], r["batch"]) for r in results})
    head = "| sweep | d_latent | batch | " + " | ".join(f"{LABELS[lib]} ms / MiB" for lib in libs)
    lines = [head + " |", "|---|---:|---:|" + "---:|" * len(libs)]
    for key in keys:
        row = []
        for lib in libs:
            r = cells.get((*key, lib))
            row.append("—" if r is None else f"{r['ms']:.0f} / {r['peak_mb']:.0f}")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    """Four panels: time and peak memory against d_latent and against batch size."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'); no plot drawn")
        return
    batch, fixed = _axes(results)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = (("d_latent", "batch", batch), ("batch", "d_latent", fixed))
    for col, (x_key, held, value) in enumerate(panels):
        for row, (y_key, y_label) in enumerate((("ms", "ms / step"), ("peak_mb", "peak MiB"))):
            ax = axes[row][col]
            for lib in ORDER:
                pts = sorted(
                    (r[x_key], r[y_key])
                    for r in results
                    if r[held] == value and r["library"] == lib
                )
                if pts and not (lib == "matmul" and y_key == "peak_mb"):
                    style = "--" if lib == "matmul" else "-o"
                    ax.plot(*zip(*pts, strict=True), style, label=LABELS[lib])
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(f"{x_key} ({held} {value})")
            ax.set_ylabel(y_label)
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    device = results[0].get("device", "cpu") if results else "cpu"
    fig.suptitle(f"TopK training step, d_in {D_IN}, k 32, fp32, {device}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":  # redraw from a saved sweep: python benchmarks/sweep.py [json]
    import sys

    saved = json.loads(Path(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_JSON).read_text())
    print(table(saved["results"]))
    plot(saved["results"], DEFAULT_PNG)
