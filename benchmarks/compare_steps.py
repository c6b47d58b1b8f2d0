"""One library's TopK training step, timed in the process that runs it.

Run by ``benchmarks/compare.py`` under each library's own virtualenv (so this file imports
only torch and the library being timed), it prints one JSON line::

    python benchmarks/compare_steps.py --worker ours --d-in 384 --steps 5 --warmup 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

K = 32
EXPANSION = 16
DEAD_BIAS = -100.0  # encoder bias that keeps a latent out of every top k (pre-acts are ~N(0, 1))


def _median_ms(step, steps: int, warmup: int) -> tuple[float, list[float]]:
    """Run ``step(i)`` ``warmup`` times untimed then ``steps`` times timed."""
    for i in range(warmup):
        step(i)
    times = []
    for i in range(warmup, warmup + steps):
        start = time.perf_counter()
        step(i)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times), times


def _dead_ids(torch, d_latent: int, fraction: float, seed: int):
    n_dead = int(round(fraction * d_latent))
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randperm(d_latent, generator=gen)[:n_dead]


def _worker_ours(torch, x, args, dead_ids) -> dict:
    from lightning_interp import __version__, create_dictionary

    d_in, d_latent = x.shape[1], EXPANSION * x.shape[1]
    sae = create_dictionary("topk", d_in=d_in, d_latent=d_latent, k=K)
    sae.train()
    dead_mask = torch.zeros(d_latent, dtype=torch.bool)
    dead_mask[dead_ids] = True
    with torch.no_grad():
        sae.b_enc[dead_ids] = DEAD_BIAS
    from train_step import make_train_step  # ours runs in our venv, beside this file

    optimizer = torch.optim.Adam(sae.parameters(), lr=2e-4, fused=True)
    train_step = make_train_step(sae, optimizer, x, dead_mask)
    auxk = []

    def step(_: int) -> None:
        auxk.append(train_step()["auxk_loss"].detach())

    ms, times = _median_ms(step, args.steps, args.warmup)
    return {"version": __version__, "ms": ms, "times": times, "auxk": float(auxk[-1])}


def _worker_saelens(torch, x, args, dead_ids) -> dict:
    import itertools
    from importlib.metadata import version

    from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    batch, d_in = x.shape
    d_latent = EXPANSION * d_in
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_latent, k=K))
    cfg = SAETrainerConfig(
        total_training_samples=batch * 10**6,
        train_batch_size_samples=batch,
        lr=2e-4,
        lr_end=2e-4,  # required; the default "constant" schedule ignores it
    )
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=itertools.repeat(x))
    with torch.no_grad():
        sae.b_enc[dead_ids] = DEAD_BIAS
    # SAETrainer.dead_neurons is n_forward_passes_since_fired > dead_feature_window; the
    # dead latents never fire, so this stays true for them.
    trainer.n_forward_passes_since_fired[dead_ids] = cfg.dead_feature_window + 1
    auxk = []

    def step(_: int) -> None:
        # One iteration of SAETrainer.fit's loop, minus wandb logging and checkpointing
        # (both off by default): maybe_reset_sparsity, step (training_forward_pass, firing
        # stats, backward, clip_grad_norm_, Adam, lr/coefficient schedulers), count.
        trainer.maybe_reset_sparsity()
        out = trainer.step(x)
        trainer.n_training_steps += 1
        auxk.append(out.losses["auxiliary_reconstruction_loss"].detach())

    ms, times = _median_ms(step, args.steps, args.warmup)
    return {"version": version("sae-lens"), "ms": ms, "times": times, "auxk": float(auxk[-1])}


def _worker_dictionary_learning(torch, x, args, dead_ids) -> dict:
    from importlib.metadata import version

    from dictionary_learning.trainers.top_k import TopKTrainer

    d_in = x.shape[1]
    trainer = TopKTrainer(
        steps=10**6,
        activation_dim=d_in,
        dict_size=EXPANSION * d_in,
        k=K,
        layer=0,  # metadata only (required)
        lm_name="none",  # metadata only (required)
        lr=2e-4,
        device="cpu",
    )
    with torch.no_grad():
        trainer.ae.encoder.bias[dead_ids] = DEAD_BIAS
    # Dead means num_tokens_since_fired >= dead_feature_threshold (10M tokens).
    trainer.num_tokens_since_fired[dead_ids] = trainer.dead_feature_threshold
    auxk = []

    def step(i: int) -> None:
        trainer.update(i, x)
        loss = trainer.pre_norm_auxk_loss  # -1 when no latent is dead (AuxK skipped)
        auxk.append(float(loss) if trainer.dead_features > 0 else 0.0)

    ms, times = _median_ms(step, args.steps, args.warmup)
    return {
        "version": version("dictionary-learning"),
        "ms": ms,
        "times": times,
        "auxk": auxk[-1],
    }


def _worker_matmul(torch, x, args, dead_ids) -> dict:
    d_in = x.shape[1]
    w = torch.randn(d_in, EXPANSION * d_in) / d_in**0.5
    b = torch.zeros(EXPANSION * d_in)

    def step(_: int) -> None:
        torch.addmm(b, x, w)

    with torch.no_grad():
        ms, times = _median_ms(step, args.steps, args.warmup)
    return {"version": None, "ms": ms, "times": times, "auxk": 0.0}


def run_worker(args: argparse.Namespace) -> None:
    """Time one library's step and print a JSON line (runs inside that library's venv)."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    (d_in,) = args.d_in
    x = torch.randn(args.batch, d_in)
    dead_ids = _dead_ids(torch, EXPANSION * d_in, args.dead_fraction, args.seed)
    fn = {
        "ours": _worker_ours,
        "saelens": _worker_saelens,
        "dictionary_learning": _worker_dictionary_learning,
        "matmul": _worker_matmul,
    }[args.worker]
    result = fn(torch, x, args, dead_ids)
    result.update(
        library=args.worker,
        d_in=d_in,
        d_latent=EXPANSION * d_in,
        k=K,
        batch=args.batch,
        dead_fraction=args.dead_fraction,
        n_dead=len(dead_ids),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
    )
    print(json.dumps(result), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags set by compare.py for one measurement."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--worker", required=True, choices=["ours", "saelens", "dictionary_learning", "matmul"]
    )
    parser.add_argument("--d-in", type=int, action="append", required=True)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dead-fraction", type=float, default=0.0)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_worker(parse_args())
