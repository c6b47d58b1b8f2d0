"""Every registered architecture's training step and encoder, timed against TopK's.

One process, one input batch, the same step ``DictionaryModule`` runs per batch
(:func:`train_step.make_train_step`: forward, loss with a dead-latent mask so auxiliary
losses run, backward, parallel-gradient removal, Adam, decoder renormalisation), or the
closed-form update for learners fitted without gradients (semi-NMF's ``fit_step``). The
architectures are timed in rounds, each round visiting every architecture once, and the
median per architecture is reported, so a load that changes during the run affects all of
them alike. ``encode`` is the inference encoder (``encode_sparse`` of ``to_inference()``).

Run from the repository root::

    .venv/bin/python benchmarks/architectures.py [--d-in 384 --d-latent 6144 --k 32]
    .venv/bin/python benchmarks/architectures.py --only topk,mp,matryoshka_batchtopk

Each architecture is built as ``create_dictionary(name, d_in=..., d_latent=..., k=...)``
with its defaults for everything else (architectures without ``k`` get their defaults).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from lightning_interp import create_dictionary
from lightning_interp.dictionaries import list_architectures
from lightning_interp.errors import ConfigError

try:  # run as a script from the repository root
    from train_step import make_train_step
except ImportError:  # imported as benchmarks.architectures
    from benchmarks.train_step import make_train_step


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=384)
    parser.add_argument("--d-latent", type=int, default=6144)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds")
    parser.add_argument("--dead-fraction", type=float, default=0.25)
    parser.add_argument("--only", default="", help="comma-separated architectures")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def build(name: str, args: argparse.Namespace):
    """The architecture with ``k`` when it takes one, else with its defaults."""
    try:
        return create_dictionary(name, d_in=args.d_in, d_latent=args.d_latent, k=args.k)
    except (ConfigError, TypeError):
        return create_dictionary(name, d_in=args.d_in, d_latent=args.d_latent)


def step_and_encode(name: str, args, x, dead_mask) -> tuple[Callable, Callable]:
    """Closures for one training step and one inference encode of ``x``."""
    dictionary = build(name, args)
    dictionary.train()
    if dictionary.fits_in_closed_form:

        def train_step() -> None:
            dictionary.fit_step(x)

    else:
        optimizer = torch.optim.Adam(dictionary.parameters(), lr=2e-4)
        train_step = make_train_step(dictionary, optimizer, x, dead_mask)
    train_step()  # estimates thresholds etc. that the inference form needs
    inference = dictionary.to_inference().eval()

    def encode() -> None:
        with torch.no_grad():
            inference.encode_sparse(x)

    return train_step, encode


def timed(fn: Callable) -> float:
    start = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - start)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    names = args.only.split(",") if args.only else list_architectures()
    if "topk" not in names:
        names = ["topk", *names]
    x = torch.randn(args.batch, args.d_in)
    dead_mask = torch.zeros(args.d_latent, dtype=torch.bool)
    dead_mask[torch.randperm(args.d_latent)[: int(args.dead_fraction * args.d_latent)]] = True
    closures = {name: step_and_encode(name, args, x, dead_mask) for name in names}
    steps: dict[str, list[float]] = {name: [] for name in names}
    encodes: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name, (train_step, encode) in closures.items():
            steps[name].append(timed(train_step))
            encodes[name].append(timed(encode))
    step = {name: statistics.median(times) for name, times in steps.items()}
    enc = {name: statistics.median(times) for name, times in encodes.items()}
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; d_in={args.d_in} "
        f"d_latent={args.d_latent} k={args.k} batch={args.batch} fp32; "
        f"{int(dead_mask.sum())} latents marked dead; median of {args.rounds} rounds"
    )
    print("| architecture | ms/step | step / topk | ms encode | encode / topk |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        print(
            f"| {name} | {step[name]:.0f} | {step[name] / step['topk']:.2f} | "
            f"{enc[name]:.0f} | {enc[name] / enc['topk']:.2f} |"
        )


if __name__ == "__main__":
    main()
