"""MultiDictionaryModule's training step with the guard and the FVU metric of another commit.

Per-layer transcoders train side by side on site-keyed batches (``layers.<l>.mlp_in`` ->
``layers.<l>.mlp_out``); every step the non-finite guard checks all ``2 N`` batch tensors and
``N`` losses, and each dictionary logs its batch FVU in float64. This script times that
overhead against the same code as it was at ``--before`` (a git revision, read with
``git show`` and loaded beside the working tree's modules), all in one process:

* ``guard``: :func:`~lightning_interp.modules.guards.batch_problem` over a batch's parts plus
  the loss check (``BatchGuard.usable_loss``) over ``N`` scalar losses;
* ``fvu``: the batch FVU of ``N`` (reconstruction, target) pairs;
* ``step``: whole training steps of a ``MultiDictionaryModule`` under a Lightning ``Trainer``
  (the time between ``on_train_batch_start`` and ``on_train_batch_end``, optimizer included),
  with the guard and the FVU of ``--before`` patched in or not.

Variants alternate round by round (before, after, before, ...) so that a shared machine's
load drifts over both alike; medians are reported, with ``after / before`` ratios. The
default ``--before`` is f498387, the commit before the fused guard and the blocked float64
FVU (4a97c02); to time an uncommitted change pass ``--before HEAD``. Run from the
repository root, with nothing else running (a concurrent job skews whichever variant it
overlaps)::

    .venv/bin/python benchmarks/multi_dictionary_step.py
    .venv/bin/python benchmarks/multi_dictionary_step.py --dictionaries 30 --before HEAD
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import types
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import lightning as L
import torch

from lightning_interp.metrics import functional
from lightning_interp.modules import MultiDictionaryModule, guards, learner

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dictionaries", type=int, default=4, help="transcoders (N)")
    parser.add_argument("--d-model", type=int, default=576)
    parser.add_argument("--d-latent", type=int, default=1152)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--rows", type=int, default=1024, help="rows per batch")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the variants")
    parser.add_argument("--steps", type=int, default=6, help="training steps per round")
    parser.add_argument("--repeats", type=int, default=10, help="guard/FVU calls per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--before", default="f498387", help="git revision of the old code")
    return parser.parse_args()


def load_revision(revision: str, path: str, name: str) -> types.ModuleType:
    """The module at ``path`` as committed at ``revision``, importable beside today's."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{revision}:{path}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    module = types.ModuleType(name)
    module.__file__ = f"{revision}:{path}"
    sys.modules[name] = module  # dataclasses and typing look the module up by name
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


@contextmanager
def old_code(old_guards: types.ModuleType, old_functional: types.ModuleType):
    """Patch the guard and the logged FVU of the old revision into the training path."""
    saved = (guards.batch_problem, guards.BatchGuard.usable_loss, learner.batch_fvu)
    guards.batch_problem = old_guards.batch_problem
    guards.BatchGuard.usable_loss = old_guards.BatchGuard.usable_loss
    learner.batch_fvu = old_functional.fraction_of_variance_unexplained
    try:
        yield
    finally:
        guards.batch_problem, guards.BatchGuard.usable_loss, learner.batch_fvu = saved


def site_batches(args: argparse.Namespace, count: int = 2) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    sites = [f"layers.{i}.mlp_{io}" for i in range(args.dictionaries) for io in ("in", "out")]
    shape = (args.rows, args.d_model)
    return [{s: torch.randn(shape, generator=generator) for s in sites} for _ in range(count)]


def make_module(args: argparse.Namespace) -> MultiDictionaryModule:
    torch.manual_seed(0)
    specs = {
        f"l{i}": {
            "architecture": "topk",
            "d_in": args.d_model,
            "d_out": args.d_model,
            "d_latent": args.d_latent,
            "k": args.k,
            "apply_b_dec_to_input": False,
            "provenance": {"site": f"layers.{i}.mlp_in", "site_out": f"layers.{i}.mlp_out"},
        }
        for i in range(args.dictionaries)
    }
    return MultiDictionaryModule(specs, optimizer=partial(torch.optim.Adam, lr=1e-3))


class StepTimes(L.Callback):
    """Milliseconds from each training batch's start to its end (optimizer step included)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(1000 * (time.perf_counter() - self._start))


def fit_steps(args: argparse.Namespace, data: list[dict[str, torch.Tensor]]) -> list[float]:
    """Step times of a fresh module over ``args.steps`` steps (the first, warm-up, dropped)."""
    timer = StepTimes()
    trainer = L.Trainer(
        max_steps=args.steps + 1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    batches = [data[i % len(data)] for i in range(args.steps + 1)]
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer.fit(make_module(args), loader)
    return timer.times[1:]


def timed_ms(call, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(1000 * (time.perf_counter() - start))
    return times


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    old_guards = load_revision(args.before, "lightning_interp/modules/guards.py", "_old_guards")
    old_functional = load_revision(
        args.before, "lightning_interp/metrics/functional.py", "_old_functional"
    )
    data = site_batches(args)
    parts = {f"inputs of {site!r}": tensor for site, tensor in data[0].items()}
    losses = {f"l{i}": torch.tensor(float(i + 1)) for i in range(args.dictionaries)}
    pairs = [(t + 0.1 * torch.randn_like(t), t) for t in list(data[0].values())[1::2]]

    def guard(module: types.ModuleType) -> None:
        batch_guard = module.BatchGuard("raise", lambda bad, device: bad, print)
        assert module.batch_problem(parts) is None
        assert batch_guard.usable_loss(losses, where="", step=0, batch_idx=0, weights=[])

    def fvu(module: types.ModuleType) -> None:
        for reconstruction, target in pairs:
            module.fraction_of_variance_unexplained(reconstruction, target)

    results: dict[str, dict[str, list[float]]] = {
        part: {"before": [], "after": []} for part in ("guard", "fvu", "step")
    }
    new = {"guard": guards, "fvu": functional}
    old = {"guard": old_guards, "fvu": old_functional}
    for modules in (old, new):  # warm-up: first calls pay for allocations and dispatch
        guard(modules["guard"])
        fvu(modules["fvu"])
    for _ in range(args.rounds):
        for variant, modules in (("before", old), ("after", new)):
            results["guard"][variant] += timed_ms(lambda m=modules: guard(m["guard"]), args.repeats)
            results["fvu"][variant] += timed_ms(lambda m=modules: fvu(m["fvu"]), args.repeats)
            if variant == "before":
                with old_code(old_guards, old_functional):
                    results["step"][variant] += fit_steps(args, data)
            else:
                results["step"][variant] += fit_steps(args, data)
    summary = {"config": vars(args)}
    for part, times in results.items():
        before, after = (statistics.median(times[v]) for v in ("before", "after"))
        summary[part] = {
            "before_ms": round(before, 3),
            "after_ms": round(after, 3),
            "after/before": round(after / before, 3),
        }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
