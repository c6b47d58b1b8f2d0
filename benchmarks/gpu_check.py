"""One-shot GPU check: CUDA tests, the step benchmark on the GPU, and the quickstart's tokens/s.

Run from the repository root on a machine with CUDA (``make gpu-check`` does this)::

    .venv/bin/python benchmarks/gpu_check.py                 # report in runs/gpu_check.{json,md}
    .venv/bin/python benchmarks/gpu_check.py --no-peers      # skip SAELens / sparsify rows

Three parts, each time-boxed so the whole check stays under ``--budget`` seconds (default 450,
under 8 minutes), each recorded even if it fails:

1. ``pytest -m cuda``: every test marked ``cuda`` (bf16-mixed training of every architecture,
   devices and placement, the attention head's xformers path, sparse kernels equal to dense on
   CUDA...), with a JUnit XML file read back for passed / failed / skipped counts.
2. The TopK step of ``benchmarks/compare.py`` on the GPU (``--device cuda``): ours, SAELens and
   sparsify (each in its own venv, see ``benchmarks/peers.py``) and the lone encoder matmul,
   d_in 768, d_latent 12288, k 32, batch 4096, fp32 weights. Each timed step is bracketed by
   ``torch.cuda.synchronize()``; peak memory is ``torch.cuda.max_memory_allocated``. sparsify
   runs its forward under bf16 autocast on CUDA (its own default); the others in fp32. A
   first run creates the peer venvs (pip downloads a CUDA torch): that install is timed and
   reported separately and is not part of the budget; ``--no-peers`` leaves the peers out.
3. The quickstart recipe (``recipes/quickstart.yaml``: SmolLM2-135M, TopK 16x, offline data)
   on one GPU with ``bf16-mixed``, callbacks replaced by
   ``benchmarks.throughput.TokensPerSecond``: training tokens/s from the live stream after
   10 warm-up batches.

Without CUDA it prints why, writes the report with ``"status": "skipped"`` and exits 0.
The report is one JSON file and its markdown rendering (``--out``, default
``runs/gpu_check``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
PYTHON = Path(sys.executable)
DEFAULT_OUT = ROOT / "runs" / "gpu_check"


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", WANDB_MODE="disabled")


def _run(cmd: list[str], timeout: float) -> tuple[subprocess.CompletedProcess | None, dict]:
    """Run ``cmd`` from the repository root; ``(None, {"status": "timeout", ...})`` on timeout."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return None, {"status": "timeout", "seconds": time.perf_counter() - start}
    return proc, {"exit_code": proc.returncode, "seconds": time.perf_counter() - start}


def device_info(torch) -> dict:
    """What CUDA device this is (or why there is none)."""
    info = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "python": platform.python_version(),
    }
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        info.update(
            device_count=torch.cuda.device_count(),
            name=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    return info


def run_cuda_tests(timeout: float, workdir: Path) -> dict:
    """``pytest -m cuda`` in a subprocess; counts from its JUnit XML."""
    junit = workdir / "cuda-tests.xml"
    cmd = [str(PYTHON), "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider"]
    cmd += [f"--junitxml={junit}", "tests"]
    proc, result = _run(cmd, timeout)
    if proc is None:
        return result
    result["tail"] = proc.stdout[-2000:]
    if junit.exists():
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"]
        counts["passed"] -= counts["skipped"]
        result.update(counts)
    # 5: no tests collected (nothing marked cuda) is not a failure of the check itself.
    result["status"] = "ok" if proc.returncode in (0, 5) else "failed"
    return result


def run_step_benchmark(libraries: list[str], timeout: float) -> dict:
    """compare.py's measurement on the GPU, one worker subprocess per library."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from compare import measure  # noqa: E402  (benchmarks/ on sys.path, as compare.py runs)

    args = SimpleNamespace(
        steps=10, warmup=3, batch=4096, threads=2, seed=0, wait_idle=0.0, device="cuda"
    )
    rows, errors = [], {}
    deadline = time.perf_counter() + timeout
    for library in ["matmul", *libraries]:
        if time.perf_counter() > deadline:
            errors[library] = "out of time"
            continue
        try:
            rows.append(measure(library, 768, 0.0, args, d_latent=12288))
        except (RuntimeError, OSError, subprocess.SubprocessError) as err:
            errors[library] = str(err)
    status = "ok" if rows and not errors else ("partial" if rows else "failed")
    return {"status": status, "rows": rows, "errors": errors}


def install_peer_venvs(libraries: list[str]) -> dict:
    """Create the peers' venvs if missing (timed; outside the budget)."""
    from peers import install_peer

    seconds, errors = {}, {}
    for name in libraries:
        if name == "ours":
            continue
        try:
            seconds[name] = install_peer(name)
        except (OSError, subprocess.SubprocessError) as err:
            errors[name] = str(err)
    return {"seconds": seconds, "errors": errors}


def quickstart_recipe(
    workdir: Path, tokens_out: Path, steps: int, precision: str = "bf16-mixed"
) -> Path:
    """The quickstart recipe on one GPU, mixed precision, only the tokens/s callback."""
    import yaml

    recipe = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    trainer = recipe["trainer"]
    trainer.update(
        accelerator="gpu",
        devices=1,
        precision=precision,
        default_root_dir=str(workdir / "quickstart"),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        callbacks=[
            {
                "class_path": "benchmarks.throughput.TokensPerSecond",
                "init_args": {"out": str(tokens_out), "skip": 10},
            }
        ],
    )
    data = recipe["data"]["init_args"]
    data["train_tokens"] = data["batch_size"] * steps
    path = workdir / "quickstart_gpu.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_quickstart(timeout: float, workdir: Path, precision: str, steps: int = 80) -> dict:
    """Training tokens/s of the quickstart on the GPU (live activation stream)."""
    tokens_out = workdir / "quickstart_tokens.json"
    recipe = quickstart_recipe(workdir, tokens_out, steps, precision)
    cmd = [str(PYTHON), "-m", "lightning_interp.cli", "fit", "--config", str(recipe)]
    proc, result = _run(cmd, timeout)
    if proc is None:
        return result
    if proc.returncode != 0 or not tokens_out.exists():
        result.update(status="failed", tail=(proc.stdout + proc.stderr)[-3000:])
        return result
    result.update(status="ok", precision=precision, **json.loads(tokens_out.read_text()))
    return result


def markdown(report: dict) -> str:
    """The report as a short markdown page."""
    lines = ["# GPU check (`benchmarks/gpu_check.py`)", ""]
    lines.append(f"Status: **{report['status']}** ({report['finished']})")
    if report["status"] == "skipped":
        lines += ["", f"Skipped: {report['reason']}"]
    lines += ["", "```", json.dumps(report["device"], indent=1), "```"]
    tests = report.get("cuda_tests")
    if tests:
        lines += ["", "## CUDA tests (`pytest -m cuda`)", ""]
        lines.append(
            f"{tests['status']}: {tests.get('passed', '?')} passed, "
            f"{tests.get('failures', '?')} failed, {tests.get('errors', '?')} errors, "
            f"{tests.get('skipped', '?')} skipped in {tests['seconds']:.0f} s"
        )
    bench = report.get("step_benchmark")
    if bench:
        lines += ["", "## TopK step on the GPU (d_in 768, d_latent 12288, k 32, batch 4096)", ""]
        lines += ["| library | ms/step | steps/s | peak MiB |", "|---|---:|---:|---:|"]
        for r in bench["rows"]:
            lines.append(
                f"| {r['library']} {r.get('version') or ''} | {r['ms']:.2f} "
                f"| {1000 / r['ms']:.1f} | {r['peak_mb']:.0f} |"
            )
        lines += [f"- {lib}: {err}" for lib, err in bench["errors"].items()]
    quick = report.get("quickstart")
    if quick:
        lines += ["", "## Quickstart training tokens/s (mixed precision, live stream)", ""]
        if quick["status"] == "ok":
            lines.append(
                f"{quick['tokens_per_second']:.0f} tokens/s over {quick['tokens']} tokens "
                f"({quick['batches']} batches after 10 warm-up ones); peak "
                f"{quick['max_memory_allocated_mb']:.0f} MiB allocated"
            )
        else:
            lines.append(f"{quick['status']}: see the JSON report")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    """Write ``out.json`` and ``out.md``."""
    report["finished"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out.with_suffix(".json"), out.with_suffix(".md")
    json_path.write_text(json.dumps(report, indent=1, default=str))
    md_path.write_text(markdown(report))
    return json_path, md_path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="report path, no suffix")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for all three parts")
    parser.add_argument("--no-peers", action="store_true", help="time only ours on the GPU")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-quickstart", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the check; 0 when it passed or was skipped for lack of CUDA, 1 when a part failed."""
    args = parse_args(argv)
    import torch

    report: dict = {"started": datetime.now(timezone.utc).isoformat(), "device": {}}
    report["device"] = device_info(torch)
    if not report["device"]["cuda_available"]:
        report["status"] = "skipped"
        report["reason"] = (
            f"no CUDA device (torch {torch.__version__}, built with CUDA "
            f"{torch.version.cuda or 'none'}); run this on a machine with an NVIDIA GPU"
        )
        json_path, _ = write_report(report, args.out)
        print(f"gpu-check skipped: {report['reason']}. Report: {json_path}")
        return 0
    sys.path.insert(0, str(ROOT / "benchmarks"))
    libraries = ["ours"] if args.no_peers else ["ours", "saelens", "sparsify"]
    if not args.no_peers:
        report["peer_install"] = install_peer_venvs(libraries)
        libraries = [lib for lib in libraries if lib not in report["peer_install"]["errors"]]
    deadline = time.perf_counter() + args.budget
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        workdir = Path(tmp)
        if not args.skip_tests:
            print("[gpu-check] pytest -m cuda", flush=True)
            report["cuda_tests"] = run_cuda_tests(0.45 * args.budget, workdir)
        print("[gpu-check] step benchmark", flush=True)
        remaining = deadline - time.perf_counter()
        report["step_benchmark"] = run_step_benchmark(libraries, max(60.0, 0.6 * remaining))
        if not args.skip_quickstart:
            print("[gpu-check] quickstart tokens/s", flush=True)
            remaining = deadline - time.perf_counter()
            # bf16 where the GPU has it (Ampere and later), else fp16 with loss scaling.
            bf16 = report["device"]["bf16_supported"]
            precision = "bf16-mixed" if bf16 else "16-mixed"
            report["quickstart"] = run_quickstart(max(90.0, remaining), workdir, precision)
    parts = [report.get(k) for k in ("cuda_tests", "step_benchmark", "quickstart")]
    failed = [p for p in parts if p and p["status"] not in ("ok", "partial")]
    report["status"] = "failed" if failed else "ok"
    json_path, md_path = write_report(report, args.out)
    print(md_path.read_text())
    print(f"gpu-check {report['status']}: {json_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
