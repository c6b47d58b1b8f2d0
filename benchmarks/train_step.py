"""Throughput of one TopK SAE training step on CPU, against the lone encoder matmul.

A training step is what ``DictionaryModule`` does per batch: ``forward_train``, ``loss``
(with a dead-latent mask so the AuxK loss runs), backward, removal of the decoder-gradient
component parallel to the rows, an Adam step (lr 2e-4), decoder renormalisation and
``zero_grad``. The lone dense encoder matmul ``torch.addmm(b_enc, x, W_enc)`` at the same
shape is timed as a yardstick, and the same GEMM without the bias (``torch.mm``): the
step/matmul ratio says how many matmul-equivalents a step costs. Both allocate a fresh
``[batch, d_latent]`` output, whose first touch page-faults (28 ms of the 81 ms at the
default shape on a 2-core Xeon); the training step reuses its output buffer
(``dictionaries/workspace.py``), so the GEMM into a reused output is printed as a third,
stricter yardstick. Step and yardsticks are
timed interleaved in one process (step, addmm, mm, step, ...) so that a shared machine's
load drifts over all three alike; medians are reported.

Run from the repository root::

    .venv/bin/python benchmarks/train_step.py
    .venv/bin/python benchmarks/train_step.py --no-auxk --steps 20 --threads 1
    .venv/bin/python benchmarks/train_step.py --dead-bias   # dead latents truly dead

Dead latents: by default only marked dead in the AuxK mask, so about half of their
pre-activations are positive and AuxK must rank them (the expensive case); ``--dead-bias``
also sets their encoder bias to -100 as ``compare.py`` does (they never fire, as real dead
latents, and AuxK's selection has nothing positive to rank).

Timings are medians over the timed steps (``time.perf_counter``), after ``--warmup``
untimed steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_interp import create_dictionary


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", default="topk", help="any k-sparse learner")
    parser.add_argument("--d-in", type=int, default=384)
    parser.add_argument("--d-latent", type=int, default=6144)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument(
        "--dead-fraction",
        type=float,
        default=0.25,
        help="share of latents marked dead in the AuxK mask",
    )
    parser.add_argument("--no-auxk", action="store_true", help="pass no dead mask (no AuxK)")
    parser.add_argument("--dead-bias", action="store_true", help="dead latents get b_enc -100")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def interleaved_ms(fns: dict, steps: int, warmup: int) -> dict[str, float]:
    """Median wall time (ms) of each ``fns[name]()``, run in turn ``steps`` times."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def make_train_step(dictionary, optimizer, x, dead_mask):
    """The step DictionaryModule runs per batch, as a closure returning its loss terms.

    Shared with compare_steps.py so both benchmarks time exactly the same step.
    """

    def train_step() -> dict:
        out = dictionary.forward_train(x)
        losses = dictionary.loss(x, out, dead_mask=dead_mask)
        losses["loss"].backward()
        dictionary.remove_parallel_decoder_grad_()
        optimizer.step()
        dictionary.normalize_decoder_()
        optimizer.zero_grad(set_to_none=True)
        return losses

    return train_step


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    dictionary = create_dictionary(
        args.architecture, d_in=args.d_in, d_latent=args.d_latent, k=args.k
    )
    dictionary.train()
    optimizer = torch.optim.Adam(dictionary.parameters(), lr=2e-4, fused=True)
    x = torch.randn(args.batch, args.d_in)
    dead_mask = None
    if not args.no_auxk:
        dead_mask = torch.zeros(args.d_latent, dtype=torch.bool)
        n_dead = max(1, int(args.dead_fraction * args.d_latent))
        dead_mask[torch.randperm(args.d_latent)[:n_dead]] = True

    if dead_mask is not None and args.dead_bias:
        with torch.no_grad():
            dictionary.b_enc[dead_mask] = -100.0
    train_step = make_train_step(dictionary, optimizer, x, dead_mask)

    # Check once that AuxK really is (or is not) part of the step being timed.
    losses = dictionary.loss(x, dictionary.forward_train(x), dead_mask=dead_mask)
    auxk_on = bool(
        losses.get("auxk_loss", torch.zeros(())).detach() != 0
    )  # not every learner has AuxK

    w_enc = dictionary.W_enc.detach().clone()
    b_enc = dictionary.b_enc.detach().clone()

    def addmm() -> None:
        with torch.no_grad():
            torch.addmm(b_enc, x, w_enc)

    def mm() -> None:
        with torch.no_grad():
            torch.mm(x, w_enc)

    reused = torch.empty(args.batch, args.d_latent)

    def mm_reused() -> None:
        with torch.no_grad():
            torch.mm(x, w_enc, out=reused)

    yardsticks = {"addmm": addmm, "mm": mm, "mm_reused": mm_reused}
    ms = interleaved_ms({"step": train_step, **yardsticks}, args.steps, args.warmup)
    step_ms, matmul_ms, mm_ms, gemm_ms = ms["step"], ms["addmm"], ms["mm"], ms["mm_reused"]
    load = " ".join(open("/proc/loadavg").read().split()[:3])

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(
        f"{args.architecture} d_in={args.d_in} d_latent={args.d_latent} k={args.k} "
        f"batch={args.batch} fp32, "
        f"AuxK {'on' if auxk_on else 'off'}"
        + (f" ({int(dead_mask.sum())} dead latents)" if dead_mask is not None else "")
        + f", median of {args.steps} interleaved rounds after {args.warmup} warm-up"
        + f", load average {load}"
    )
    rows = [
        ("steps/s", f"{1000 / step_ms:.3f}"),
        ("ms/step (median)", f"{step_ms:.1f}"),
        ("ms lone encoder matmul (addmm)", f"{matmul_ms:.1f}"),
        ("ms GEMM without bias (mm)", f"{mm_ms:.1f}"),
        ("ms GEMM into a reused output", f"{gemm_ms:.1f}"),
        ("step / matmul (addmm)", f"{step_ms / matmul_ms:.2f}"),
        ("step / GEMM (mm)", f"{step_ms / mm_ms:.2f}"),
        ("step / GEMM into a reused output", f"{step_ms / gemm_ms:.2f}"),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"| {'metric':<{width}} | {'value':>9} |")
    print(f"|{'-' * (width + 2)}|{'-' * 11}|")
    for name, value in rows:
        print(f"| {name:<{width}} | {value:>9} |")


if __name__ == "__main__":
    main()
