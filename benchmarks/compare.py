"""Side-by-side TopK SAE training-step throughput: lightning-interp against SAELens,
dictionary_learning and sparsify, on CPU, with the lone encoder matmul as a yardstick.

Run from the repository root::

    .venv/bin/python benchmarks/compare.py                      # install peers if needed, time
    .venv/bin/python benchmarks/compare.py --skip-install --d-in 384 --steps 10
    .venv/bin/python benchmarks/compare.py --install-only       # just set up the peer venvs
    .venv/bin/python benchmarks/compare.py --wait-idle 120      # on a shared machine
    nice -n 10 .venv/bin/python benchmarks/compare.py --sweep   # cost curves (sweep.py)

What it does:

1. Installs each peer (``benchmarks/peers.py``, shared with ``make crosscheck``) in its own
   virtualenv under ``benchmarks/.peers/`` (git-ignored),
   created with ``python3 -m venv``: ``torch==2.13.0`` first, then the peer with the
   repository's ``constraints.txt`` (which pins that torch, so pip never swaps in a CUDA
   build). ``saelens`` gets ``sae-lens==6.54.*``; ``dictionary_learning`` gets
   ``dictionary-learning==0.1.0`` and then loses ``torchvision`` (the one it pulls does not
   match this torch and breaks the import); ``sparsify`` gets ``eai-sparsify==1.3.3``
   (EleutherAI). A stamp file per venv makes this a no-op once
   done; the time each install took is printed.
2. Times one TopK training step per library, each measurement in its own subprocess run by
   the right venv's python on ``benchmarks/compare_steps.py`` (which imports only torch and
   the library being timed). Every worker seeds torch the same way and draws the same random batch
   ``torch.randn(batch, d_in)``; it runs ``--warmup`` untimed steps, then ``--steps`` timed
   ones (``time.perf_counter``, median reported), and prints one JSON line.

   * ours: ``create_dictionary("topk", ...)``; ``forward_train``, ``loss`` with a dead mask
     (AuxK), backward, ``remove_parallel_decoder_grad_``, fused Adam (lr 2e-4),
     ``normalize_decoder_``, ``zero_grad`` -- the step of ``benchmarks/train_step.py``.
   * SAELens: a real ``SAETrainer`` around a ``TopKTrainingSAE`` (library defaults:
     ``rescale_acts_by_decoder_norm=True``, dense activations), stepped through its public
     per-step seam exactly as ``SAETrainer.fit`` does: ``maybe_reset_sparsity()``,
     ``step(batch)`` (``training_forward_pass`` with MSE + AuxK, firing statistics,
     backward, grad-norm clipping, Adam, LR scheduler), ``n_training_steps += 1``.
   * dictionary_learning: ``TopKTrainer.update(step, x)``, its whole training step (loss
     with AuxK, backward, decoder-gradient projection, grad clipping, Adam, scheduler,
     decoder renormalisation). Step 0 (geometric-median init of ``b_dec``) is a warm-up.
   * sparsify: ``SparseCoder(d_in, SparseCoderConfig(num_latents, k))`` stepped as its
     ``Trainer`` does per batch (decoder renormalisation, forward with fvu + AuxK,
     backward, gradient projection, Adam); see ``compare_steps._worker_sparsify``.
   * the lone dense encoder matmul ``torch.addmm(b, x, W)``, ``[batch, d_in] x
     [d_in, d_latent]``, under ``no_grad``.

   Dead latents: with ``--dead-fraction 0`` (default) no latent is dead, so AuxK is a
   no-op everywhere, as in a healthy SAE. For the extra row (``--extra-dead-fraction``,
   default 0.25) that share of latents is made truly dead in every library (encoder bias
   -100, so they never reach the top k) and each library's own bookkeeping is told so
   (our ``dead_mask``; SAELens' ``n_forward_passes_since_fired``; dictionary_learning's
   ``num_tokens_since_fired``), so that each library's AuxK really runs. Each worker
   reports whether its AuxK loss was non-zero.
3. Prints a markdown table and writes it, with the machine description and the command,
   to ``docs/benchmarks_compare.md`` (``--out``). Besides the median, each row shows the
   fastest timed step and how many cores *other* processes kept busy while that row ran
   (from ``/proc/stat``), since this 2-core machine is often shared; ``--wait-idle S``
   waits up to S seconds before each measurement for the machine to go quiet.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from compare_steps import DEAD_BIAS, EXPANSION, K  # benchmarks/ is on sys.path when run as a script
from peers import PEERS_DIR, install_peers  # the venv set-up, shared with the cross-check test

ROOT = Path(__file__).resolve().parent.parent
OURS_PYTHON = ROOT / ".venv" / "bin" / "python"
DEFAULT_OUT = ROOT / "docs" / "benchmarks_compare.md"
LABELS = {
    "ours": "lightning-interp",
    "saelens": "SAELens",
    "dictionary_learning": "dictionary_learning",
    "sparsify": "sparsify",
    "matmul": "lone matmul",
}


# --------------------------------------------------------------------------- driver side
def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.update(
        OMP_NUM_THREADS="2",
        MKL_NUM_THREADS="2",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        WANDB_MODE="disabled",
        WANDB_SILENT="true",
        TOKENIZERS_PARALLELISM="false",
        PYTHONWARNINGS="ignore",
    )
    return env


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (``/proc/stat``), or None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_for_idle(timeout: float, threshold: float = 0.3, window: float = 3.0) -> None:
    """Wait (up to ``timeout`` s) until other processes use < ``threshold`` cores."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        busy0 = _busy_cpu_seconds()
        if busy0 is None:
            return
        time.sleep(window)
        if (_busy_cpu_seconds() - busy0) / window < threshold:
            return
    print(f"  (machine still busy after --wait-idle {timeout:g} s; timing anyway)", flush=True)


def measure(
    library: str,
    d_in: int,
    dead_fraction: float,
    args: argparse.Namespace,
    *,
    d_latent: int | None = None,
    batch: int | None = None,
) -> dict:
    """Run one worker subprocess and return its JSON result."""
    if args.wait_idle > 0:
        wait_for_idle(args.wait_idle)
    python = OURS_PYTHON if library in ("ours", "matmul") else PEERS_DIR / library / "bin/python"
    cmd = [
        str(python),
        str(Path(__file__).resolve().parent / "compare_steps.py"),
        "--worker",
        library,
        "--d-in",
        str(d_in),
        *(["--d-latent", str(d_latent)] if d_latent else []),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--dead-fraction",
        str(dead_fraction),
        "--batch",
        str(batch or args.batch),
        "--device",
        getattr(args, "device", "cpu"),
        "--threads",
        str(args.threads),
        "--seed",
        str(args.seed),
    ]
    env = _worker_env()
    if library == "ours":
        env["PYTHONPATH"] = str(ROOT)  # the working tree, whatever the venv has installed
    busy0, own0, start = _busy_cpu_seconds(), _children_cpu_seconds(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600)
    wall = time.perf_counter() - start
    busy1, own1 = _busy_cpu_seconds(), _children_cpu_seconds()
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise RuntimeError(f"worker {library} d_in={d_in} failed (exit {proc.returncode})")
    result = json.loads(lines[-1])
    result["wall_s"] = wall
    # Cores kept busy by everything else on the machine while this worker ran (whole
    # subprocess, imports included): a contention gauge for this row, ~0 on an idle box.
    others = None
    if busy0 is not None and busy1 is not None:
        others = max(0.0, (busy1 - busy0) - (own1 - own0)) / wall
    result["others_cpu"] = others
    print(
        f"  {LABELS[library]:<20} d_in={d_in:<4} d_latent={result['d_latent']:<6} "
        f"batch={result['batch']:<5} dead={result['n_dead']:<5} "
        f"{result['ms']:8.1f} ms/step  {result['peak_mb']:7.0f} MiB  (AuxK {result['auxk']:.4g}; "
        f"steps {', '.join(f'{t:.0f}' for t in result['times'])}; {wall:.0f} s wall; "
        f"other processes {'?' if others is None else f'{others:.2f}'} cores)",
        flush=True,
    )
    return result


def _fmt_load(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}"


def make_table(results: list[dict], matmul: dict[int, dict]) -> str:
    """Markdown table: one row per (d_in, dead fraction, library)."""
    header = (
        "| d_in | d_latent | library | dead latents | AuxK ran | steps/s | ms/step "
        "| speedup of ours (peer ms / our ms) | lone matmul ms | step / matmul "
        "| fastest step ms | peak MiB | other load (cores) |\n"
        "|---:|---:|---|---:|:---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    ours = {(r["d_in"], r["dead_fraction"]): r for r in results if r["library"] == "ours"}
    rows = [header]
    for r in results:
        mm = matmul[r["d_in"]]["ms"]
        base = ours.get((r["d_in"], r["dead_fraction"]))
        if r["library"] == "ours" or base is None:
            speedup = "—"
        else:
            speedup = f"{r['ms'] / base['ms']:.2f}×"
        dead = f"{r['n_dead']} ({100 * r['dead_fraction']:.0f}%)"
        rows.append(
            f"| {r['d_in']} | {r['d_latent']} | {LABELS[r['library']]} | {dead} "
            f"| {'yes' if r['auxk'] > 0 else 'no'} | {1000 / r['ms']:.3f} | {r['ms']:.0f} "
            f"| {speedup} | {mm:.0f} | {r['ms'] / mm:.1f} | {min(r['times']):.0f} "
            f"| {r['peak_mb']:.0f} | {_fmt_load(r.get('others_cpu'))} |"
        )
    return "\n".join(rows)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def _git_head() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "lightning_interp"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        return head + (" (+ uncommitted changes in lightning_interp/)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _command() -> str:
    def rel(p: str) -> str:
        path = Path(p)
        try:
            return str(path.relative_to(ROOT)) if path.is_absolute() else p
        except ValueError:
            return p

    return shlex.join([rel(sys.executable), rel(str(Path(__file__).resolve())), *sys.argv[1:]])


def write_report(
    path: Path,
    table: str,
    results: list[dict],
    matmul: dict[int, dict],
    args: argparse.Namespace,
    load_before: str,
    load_after: str,
) -> None:
    """Write the table, machine description and command to ``path``."""
    versions = {}
    torches = {}
    for r in results:
        versions.setdefault(r["library"], r["version"])
        torches.setdefault(r["library"], r["torch"])
    lib_lines = "\n".join(
        f"- {LABELS[lib]} {versions[lib]} (torch {torches[lib]})"
        for lib in ("ours", "saelens", "dictionary_learning", "sparsify")
        if lib in versions
    )
    threads = sorted({r["threads"] for r in results})
    matmul_lines = "\n".join(
        f"- d_in={d}: {m['ms']:.0f} ms (fastest {min(m['times']):.0f} ms, "
        f"other load {_fmt_load(m.get('others_cpu'))} cores)"
        for d, m in matmul.items()
    )
    text = f"""# Side-by-side TopK training step (`benchmarks/compare.py`)

Measured {datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}.

```
{_command()}
```

Machine: {os.cpu_count()} CPUs (nproc), {_cpu_model()}, {platform.machine()},
Python {platform.python_version()}, `torch.set_num_threads({", ".join(map(str, threads))})`,
fp32.
Load average (1/5/15 min) before timing: {load_before}; after: {load_after}.

Versions (each peer in its own venv under `benchmarks/.peers/`, same torch pin):
{lib_lines}
- lightning-interp working tree: {_git_head()}

TopK, k={K}, d_latent = {EXPANSION}·d_in, batch {args.batch}, the same `torch.randn` batch in
every process (seed {args.seed}). Median of {args.steps} timed steps after {args.warmup}
warm-up steps, each library in its own subprocess. "AuxK ran" means the library's own AuxK
loss was non-zero; for the dead rows that share of latents is made truly dead (encoder bias
{DEAD_BIAS:g}) and each library's dead-latent bookkeeping says so. "fastest step" is the
minimum over the timed steps; "peak MiB" is the memory the library's steps added at
their peak (CPU: growth of the process's peak resident set over set-up, measured after
the library was imported and our numba kernels compiled, weights and optimizer state
included; CUDA: `torch.cuda.max_memory_allocated`); "other load" is how
many cores other processes kept busy while that row's subprocess ran (from `/proc/stat`;
~0 on an idle machine, up to 2 here).

{table}

Lone matmul yardstick (`torch.addmm`, own subprocess):
{matmul_lines}

What one step is, per library:

- **lightning-interp**: `create_dictionary("topk", d_in, d_latent, k)`; `forward_train`,
  `loss(x, out, dead_mask=...)`, `backward`, `remove_parallel_decoder_grad_`,
  `torch.optim.Adam(lr=2e-4, fused=True).step`, `normalize_decoder_`, `zero_grad`.
- **SAELens**: `SAETrainer(cfg=SAETrainerConfig(lr=2e-4, lr_end=2e-4, ...),
  sae=TopKTrainingSAE(TopKTrainingSAEConfig(d_in, d_sae, k)), ...)`, then per step what
  `SAETrainer.fit` does: `maybe_reset_sparsity()`, `step(batch)` (→ `_train_step`:
  `training_forward_pass(TrainStepInput(...))` with MSE + TopK AuxK, firing statistics,
  `backward`, `clip_grad_norm_(1.0)`, Adam, schedulers), `n_training_steps += 1`. Library
  defaults: `rescale_acts_by_decoder_norm=True` (no decoder renormalisation step),
  `use_sparse_activations=False` (dense codes and dense decode).
- **dictionary_learning**: `TopKTrainer(steps, activation_dim, dict_size, k, layer, lm_name,
  lr=2e-4).update(step, x)`: loss with AuxK (dense), `backward`,
  `remove_gradient_parallel_to_decoder_directions`, `clip_grad_norm_(1.0)`, Adam,
  scheduler, `set_decoder_norm_to_unit_norm`.
- **lone matmul**: `torch.addmm(b, x, W)`, `[batch, d_in] × [d_in, d_latent]`, no grad.
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags of the driver."""
    parser = argparse.ArgumentParser(
        description="Side-by-side TopK SAE training-step throughput (see module docstring).",
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument(
        "--d-in",
        type=int,
        action="append",
        help="input width, repeatable (default: 384 and 768)",
    )
    parser.add_argument("--skip-install", action="store_true", help="do not touch the venvs")
    parser.add_argument("--install-only", action="store_true", help="set up the venvs, then stop")
    parser.add_argument(
        "--dead-fraction",
        type=float,
        default=0.0,
        help="share of dead latents (AuxK inputs) in the main rows; 0 = healthy SAE",
    )
    parser.add_argument(
        "--extra-dead-fraction",
        type=float,
        default=0.25,
        help="also time every library with this share of dead latents (negative: skip)",
    )
    parser.add_argument(
        "--libraries",
        default="ours,saelens,dictionary_learning,sparsify",
        help="comma-separated subset of ours,saelens,dictionary_learning,sparsify",
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each measurement, wait up to this long for other processes to go quiet",
    )
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown report path")
    parser.add_argument("--device", default="cpu", help="where every library runs (cpu, cuda)")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="time and peak memory over d_latent and batch size at d_in 768 (sweep.py)",
    )
    parser.add_argument("--sweep-latents", type=int, nargs="+", help="d_latent values")
    parser.add_argument("--sweep-batch", type=int, help="batch of the d_latent sweep")
    parser.add_argument("--sweep-batches", type=int, nargs="+", help="batch sizes")
    parser.add_argument("--sweep-fixed-latent", type=int, help="d_latent of the batch sweep")
    args = parser.parse_args(argv)
    args.d_in = args.d_in or [384, 768]
    return args


def main() -> None:
    args = parse_args()

    libraries = [lib.strip() for lib in args.libraries.split(",") if lib.strip()]
    unknown = set(libraries) - {"ours", "saelens", "dictionary_learning", "sparsify"}
    if unknown:
        sys.exit(f"unknown libraries: {sorted(unknown)}")
    PEERS_DIR.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    install_peers(args.skip_install)
    print(f"[install] total {time.perf_counter() - start:.0f} s", flush=True)
    if args.install_only:
        return
    if args.sweep:
        from sweep import run_sweep  # benchmarks/ is on sys.path when run as a script

        run_sweep(args, libraries, measure)
        return

    fractions = [args.dead_fraction]
    if args.extra_dead_fraction >= 0 and args.extra_dead_fraction != args.dead_fraction:
        fractions.append(args.extra_dead_fraction)

    load_before = _loadavg()
    print(f"[time] load average before: {load_before}", flush=True)
    results, matmul = [], {}
    for d_in in args.d_in:
        matmul[d_in] = measure("matmul", d_in, 0.0, args)
        for fraction in fractions:
            for library in libraries:
                results.append(measure(library, d_in, fraction, args))
    load_after = _loadavg()
    print(f"[time] load average after: {load_after}\n", flush=True)

    table = make_table(results, matmul)
    print(table)
    write_report(args.out, table, results, matmul, args, load_before, load_after)


if __name__ == "__main__":
    main()
