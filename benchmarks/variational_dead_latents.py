"""Dead latents of variational TopK SAEs against a TopK SAE at equal k, on planted data.

Baker et al. (2025, "Analysis of Variational Sparse Autoencoders") report that the KL term
of a variational TopK SAE leaves far more latents dead than a TopK SAE with the same ``k``
(Pythia-70M residual stream, 8192 latents: 5-37% alive against 81-98%). This script checks
that finding on the planted-dictionary generator: every model trains through a real
Lightning ``Trainer`` (``DictionaryModule``, Adam, the same warm-up and decay) on the same
stream of synthetic rows, then a held-out set is encoded with the inference form (the mean
for the variational models) and a latent that fires on none of its rows counts as dead.
``--kl 0`` (the default list starts with it) is a control: sampling without the KL, which
tells the deaths the KL causes from those the sampling causes.

Run from the repository root::

    .venv/bin/python benchmarks/variational_dead_latents.py
    .venv/bin/python benchmarks/variational_dead_latents.py --kl 0.001 --log-var-init -4 --seeds 0 1

Each line is one run: its dead fraction on the held-out rows, FVU, L0 and mean max cosine
of its decoder rows with the planted atoms. Dead fractions are counts, so they do not depend
on timing, but training is stochastic: use several ``--seeds``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import warnings
from functools import partial

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_interp import create_dictionary
from lightning_interp.data import (
    SparseSuperposition,
    SyntheticActivations,
    mean_max_cosine_similarity,
)
from lightning_interp.modules import DictionaryModule


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=32, help="activation width")
    parser.add_argument("--features", type=int, default=64, help="planted atoms")
    parser.add_argument("--d-latent", type=int, default=128)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument(
        "--kl", type=float, nargs="+", default=[0.0, 1e-3, 1e-2, 1e-1, 1.0], help="kl_coefficient"
    )
    parser.add_argument(
        "--log-var-init", type=float, default=-2.0, help="log_var_init (-2: the reference's)"
    )
    parser.add_argument("--steps", type=int, default=600, help="training batches")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    return parser.parse_args()


def train(architecture: str, args: argparse.Namespace, seed: int, **kwargs) -> dict[str, float]:
    """Train one dictionary on the planted stream; held-out metrics of its inference form."""
    data = SparseSuperposition(
        d=args.d,
        n_features=args.features,
        firing_probability=3 / args.features,  # about 3 active atoms per row
        offset_norm=1.0,
        seed=0,  # one planted dictionary for every run: only the training seed varies
    )
    torch.manual_seed(seed)
    dictionary = create_dictionary(
        architecture, d_in=args.d, d_latent=args.d_latent, k=args.k, **kwargs
    )
    module = DictionaryModule(
        dictionary,
        optimizer=partial(torch.optim.Adam, lr=args.lr),
        warmup_steps=20,
        decay_fraction=0.2,
        dead_tokens_threshold=20_000,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )

    def batches(size: int, count: int, stream: int) -> DataLoader:
        return DataLoader(SyntheticActivations(data, size, count, stream), batch_size=None)

    trainer.fit(module, batches(args.batch, args.steps, stream=1))
    result = trainer.validate(module, batches(2048, 4, stream=999), verbose=False)[0]
    return {
        "dead": result["val/dead_fraction"],
        "fvu": result["val/fvu"],
        "l0": result["val/l0"],
        "cos": mean_max_cosine_similarity(module.dictionary.W_dec, data.atoms),
    }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # Lightning's advice on data loaders and workers
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # and its banners
    runs = [("topk", {})] + [
        ("variational_topk", {"kl_coefficient": kl, "log_var_init": args.log_var_init})
        for kl in args.kl
    ]
    print(
        f"planted: {args.features} atoms in {args.d} dims, ~3 active per row; "
        f"{args.d_latent} latents, k={args.k}, {args.steps} x {args.batch} rows, "
        f"seeds {args.seeds}"
    )
    print(f"{'model':<54} {'dead':>12} {'fvu':>7} {'l0':>5} {'cos':>6}")
    for architecture, kwargs in runs:
        results = [train(architecture, args, seed, **kwargs) for seed in args.seeds]
        name = architecture + "".join(f" {k}={v:g}" for k, v in kwargs.items())
        dead = [r["dead"] for r in results]
        spread = f"±{statistics.stdev(dead):.3f}" if len(dead) > 1 else ""
        mean = {key: statistics.mean(r[key] for r in results) for key in results[0]}
        print(
            f"{name:<54} {mean['dead']:>6.3f}{spread:<6} {mean['fvu']:>7.3f} "
            f"{mean['l0']:>5.2f} {mean['cos']:>6.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
