"""The peer libraries' virtualenvs (SAELens, dictionary_learning, sparsify, circuit-tracer),
shared by the side-by-side benchmark (``benchmarks/compare.py``) and the cross-check tests
(``tests/zoo/test_peer_crosscheck.py``, ``tests/circuits/test_circuit_tracer_crosscheck.py``).

Each peer lives in its own virtualenv under ``benchmarks/.peers/<name>`` (git-ignored), made
with ``python3 -m venv``: ``torch==2.13.0`` first, then the peer with the repository's
``constraints.txt`` (which pins that torch, so pip never swaps in a CUDA build), then the
packages listed to uninstall (dictionary_learning pulls a ``torchvision`` that does not match
this torch and breaks its import). A stamp file records what was installed, so a second call
is a no-op.

Importable both as ``peers`` (benchmarks/ on ``sys.path``, as when a benchmark script runs)
and as ``benchmarks.peers`` (repository root on ``sys.path``, as under pytest); it imports
nothing outside the standard library.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS_DIR = ROOT / "benchmarks" / ".peers"
CONSTRAINTS = ROOT / "constraints.txt"
TORCH_PIN = "torch==2.13.0"

#: venv name -> (pip requirement, packages to uninstall afterwards)
PEERS: dict[str, tuple[str, list[str]]] = {
    "saelens": ("sae-lens==6.54.*", []),
    "dictionary_learning": ("dictionary-learning==0.1.0", ["torchvision"]),
    "sparsify": ("eai-sparsify==1.3.3", []),
    "circuit_tracer": ("circuit-tracer==0.5.0", []),
}

#: venv name -> constraints.txt pins dropped for it: circuit-tracer 0.5.0 requires
#: transformers<=4.57.3 and huggingface-hub<1, and the datasets that its transformer-lens
#: imports needs fsspec<=2026.2 (else pip falls back to a datasets that the pinned pyarrow breaks)
UNPINNED: dict[str, list[str]] = {
    "circuit_tracer": ["transformers", "huggingface_hub", "tokenizers", "fsspec"],
}


def peer_python(name: str) -> Path:
    """The python executable of peer ``name``'s virtualenv (it may not exist yet)."""
    return PEERS_DIR / name / "bin" / "python"


def _run(cmd: list) -> None:
    cmd = [str(c) for c in cmd]
    print("  $", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def _wanted(name: str) -> dict:
    requirement, uninstall = PEERS[name]
    return {
        "torch": TORCH_PIN,
        "requirement": requirement,
        "uninstall": uninstall,
        "constraints": CONSTRAINTS.read_text(),
        **({"unpinned": UNPINNED[name]} if name in UNPINNED else {}),
    }


def is_installed(name: str) -> bool:
    """Whether peer ``name``'s venv exists and its stamp matches what would be installed."""
    stamp = PEERS_DIR / name / ".installed.json"
    return (
        peer_python(name).exists()
        and stamp.exists()
        and json.loads(stamp.read_text()) == _wanted(name)
    )


def install_peer(name: str, *, skip: bool = False) -> float:
    """Create and fill peer ``name``'s virtualenv unless its stamp says it is done.

    Args:
        name: A key of :data:`PEERS`.
        skip: Never install; only check that the venv's python exists.

    Returns:
        Seconds spent installing (0 when nothing was done).

    Raises:
        FileNotFoundError: ``skip`` is set and the venv does not exist.
        subprocess.CalledProcessError: venv creation or a pip step failed (e.g. no network).
    """
    requirement, uninstall = PEERS[name]
    venv, python = PEERS_DIR / name, peer_python(name)
    if is_installed(name):
        print(f"[install] {name}: up to date ({venv})")
        return 0.0
    if skip:
        if not python.exists():
            raise FileNotFoundError(f"--skip-install given but {python} does not exist")
        print(f"[install] {name}: skipped (--skip-install), stamp missing or stale")
        return 0.0
    print(f"[install] {name}: installing into {venv}", flush=True)
    start = time.perf_counter()
    PEERS_DIR.mkdir(parents=True, exist_ok=True)
    if not python.exists():
        _run([shutil.which("python3") or sys.executable, "-m", "venv", venv])
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run([*pip, TORCH_PIN])
    constraints = CONSTRAINTS
    if name in UNPINNED:
        constraints = venv / "constraints.txt"
        keep = [
            line
            for line in CONSTRAINTS.read_text().splitlines()
            if line.split("==")[0].strip().lower() not in UNPINNED[name]
        ]
        constraints.write_text("\n".join(keep) + "\n")
    _run([*pip, "-c", constraints, requirement])
    if uninstall:
        _run([python, "-m", "pip", "uninstall", "-y", "-q", *uninstall])
    # Written last: an interrupted or failed install is retried on the next call.
    (venv / ".installed.json").write_text(json.dumps(_wanted(name), indent=1))
    seconds = time.perf_counter() - start
    print(f"[install] {name}: done in {seconds:.0f} s", flush=True)
    return seconds


def install_peers(skip: bool) -> None:
    """Create and fill every peer's virtualenv (see :func:`install_peer`)."""
    for name in PEERS:
        try:
            install_peer(name, skip=skip)
        except FileNotFoundError as err:
            sys.exit(str(err))
