"""One library's TopK training step, timed in the process that runs it.

Run by ``benchmarks/compare.py`` under each library's own virtualenv (so this file imports
only torch and the library being timed), it prints one JSON line::

    python benchmarks/compare_steps.py --worker ours --d-in 384 --steps 5 --warmup 2
    python benchmarks/compare_steps.py --worker sparsify --d-in 768 --d-latent 24576 --device cuda

Every worker builds its model on ``--device``; on CUDA each timed step is bracketed by
``torch.cuda.synchronize()`` (kernels run asynchronously, so the host clock alone would time
only the launches). Peak memory of the steps: on CUDA ``torch.cuda.max_memory_allocated``
(reset after set-up, so it is what the steps add at their peak, weights and optimizer state
included); on CPU the process's peak resident set (``ru_maxrss``) minus the resident set
measured just before the model was built (torch, the batch and the library already loaded;
for us, the numba kernels already compiled by one tiny step, ``_prepare_ours``).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

K = 32
EXPANSION = 16
DEAD_BIAS = -100.0  # encoder bias that keeps a latent out of every top k (pre-acts are ~N(0, 1))


def _median_ms(step, steps: int, warmup: int, sync=None) -> tuple[float, list[float]]:
    """Run ``step(i)`` ``warmup`` times untimed then ``steps`` times timed.

    ``sync`` (``torch.cuda.synchronize`` on a GPU) runs before the clock starts and before
    it stops, so a timed step includes all the kernels it launched.
    """
    sync = sync or (lambda: None)
    for i in range(warmup):
        step(i)
    times = []
    for i in range(warmup, warmup + steps):
        sync()
        start = time.perf_counter()
        step(i)
        sync()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times), times


def _rss_mb() -> float:
    """Peak resident set of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _dead_ids(torch, d_latent: int, fraction: float, seed: int):
    n_dead = int(round(fraction * d_latent))
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randperm(d_latent, generator=gen)[:n_dead]


def _worker_ours(torch, x, args, dead_ids, timer) -> dict:
    from lightning_interp import __version__, create_dictionary

    d_in, d_latent = x.shape[1], args.d_latent
    sae = create_dictionary("topk", d_in=d_in, d_latent=d_latent, k=K).to(x.device)
    sae.train()
    dead_mask = torch.zeros(d_latent, dtype=torch.bool, device=x.device)
    dead_mask[dead_ids] = True
    with torch.no_grad():
        sae.b_enc[dead_ids] = DEAD_BIAS
    from train_step import make_train_step  # ours runs in our venv, beside this file

    optimizer = torch.optim.Adam(sae.parameters(), lr=2e-4, fused=True)
    train_step = make_train_step(sae, optimizer, x, dead_mask)
    auxk = []

    def step(_: int) -> None:
        auxk.append(train_step()["auxk_loss"].detach())

    return {"version": __version__, **timer(step), "auxk": float(auxk[-1])}


def _worker_saelens(torch, x, args, dead_ids, timer) -> dict:
    import itertools
    from importlib.metadata import version

    from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    batch, d_in = x.shape
    device = str(x.device)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=args.d_latent, k=K, device=device))
    cfg = SAETrainerConfig(
        total_training_samples=batch * 10**6,
        train_batch_size_samples=batch,
        lr=2e-4,
        lr_end=2e-4,  # required; the default "constant" schedule ignores it
        device=device,
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

    return {"version": version("sae-lens"), **timer(step), "auxk": float(auxk[-1])}


def _worker_dictionary_learning(torch, x, args, dead_ids, timer) -> dict:
    from importlib.metadata import version

    from dictionary_learning.trainers.top_k import TopKTrainer

    trainer = TopKTrainer(
        steps=10**6,
        activation_dim=x.shape[1],
        dict_size=args.d_latent,
        k=K,
        layer=0,  # metadata only (required)
        lm_name="none",  # metadata only (required)
        lr=2e-4,
        device=str(x.device),
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

    return {"version": version("dictionary-learning"), **timer(step), "auxk": auxk[-1]}


def _worker_sparsify(torch, x, args, dead_ids, timer) -> dict:
    from importlib.metadata import version

    from sparsify import SparseCoder, SparseCoderConfig

    d_latent = args.d_latent
    sae = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=d_latent, k=K), device=x.device)
    with torch.no_grad():
        sae.encoder.bias[dead_ids] = DEAD_BIAS
    # sparsify's Trainer: Adam at 2e-4 scaled by (num_latents / 2**14) ** -0.5 unless lr is
    # given; we give 2e-4 like the other rows. Its AuxK is off by default (auxk_alpha=0);
    # 1/32 as in the other libraries, so that the dead rows run it.
    optimizer = torch.optim.Adam(sae.parameters(), lr=2e-4)
    dead_mask = torch.zeros(d_latent, dtype=torch.bool, device=x.device)
    dead_mask[dead_ids] = True
    did_fire = torch.zeros(d_latent, dtype=torch.bool, device=x.device)
    auxk = []

    def step(_: int) -> None:
        # What sparsify's Trainer does per batch for one SAE (its forward hook, then the
        # optimizer block of Trainer.fit), minus the language model: renormalise W_dec,
        # forward (bf16 autocast on CUDA, sparsify's own default), fvu + auxk_alpha * auxk,
        # backward, firing mask, gradient projection, Adam step, zero_grad.
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=dead_mask if len(dead_ids) else None)
        (out.fvu + out.auxk_loss / 32).backward()
        did_fire[out.latent_indices.flatten()] = True
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        auxk.append(out.auxk_loss.detach())

    return {"version": version("eai-sparsify"), **timer(step), "auxk": float(auxk[-1])}


def _worker_matmul(torch, x, args, dead_ids, timer) -> dict:
    d_in = x.shape[1]
    w = torch.randn(d_in, args.d_latent, device=x.device) / d_in**0.5
    b = torch.zeros(args.d_latent, device=x.device)

    def step(_: int) -> None:
        torch.addmm(b, x, w)

    with torch.no_grad():
        timed = timer(step)
    return {"version": None, **timed, "auxk": 0.0}


def _prepare_ours(torch) -> None:
    from lightning_interp import create_dictionary

    # One tiny step with AuxK compiles (or loads from numba's cache) every CPU kernel of the
    # step: a one-off JIT whose LLVM working memory is set-up, not the step's memory.
    sae = create_dictionary("topk", d_in=8, d_latent=64, k=2, aux_k=4)
    out = sae.forward_train(torch.randn(16, 8))
    dead = torch.arange(64) % 2 == 0
    sae.loss(torch.randn(16, 8), out, dead_mask=dead)["loss"].backward()


def _prepare_saelens(torch) -> None:
    import sae_lens  # noqa: F401


def _prepare_dictionary_learning(torch) -> None:
    import dictionary_learning.trainers.top_k  # noqa: F401


def _prepare_sparsify(torch) -> None:
    import sparsify  # noqa: F401


#: Run before the memory baseline: each library's imports (and our kernels' compilation).
PREPARE = {
    "ours": _prepare_ours,
    "saelens": _prepare_saelens,
    "dictionary_learning": _prepare_dictionary_learning,
    "sparsify": _prepare_sparsify,
    "matmul": lambda torch: None,
}

WORKERS = {
    "ours": _worker_ours,
    "saelens": _worker_saelens,
    "dictionary_learning": _worker_dictionary_learning,
    "sparsify": _worker_sparsify,
    "matmul": _worker_matmul,
}


def run_worker(args: argparse.Namespace) -> dict:
    """Time one library's step and print a JSON line (runs inside that library's venv)."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    (d_in,) = args.d_in
    args.d_latent = args.d_latent or EXPANSION * d_in
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    # Drawn on the CPU generator so every library and device sees the same numbers.
    x = torch.randn(args.batch, d_in)
    x = x.pin_memory().to(device, non_blocking=True) if cuda else x
    dead_ids = _dead_ids(torch, args.d_latent, args.dead_fraction, args.seed).to(device)
    PREPARE[args.worker](torch)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base_mb = torch.cuda.memory_allocated(device) / 2**20
    else:
        base_mb = _rss_mb()

    def timer(step) -> dict:
        sync = (lambda: torch.cuda.synchronize(device)) if cuda else None
        ms, times = _median_ms(step, args.steps, args.warmup, sync)
        if cuda:
            peak = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            peak = _rss_mb()
        return {"ms": ms, "times": times, "peak_mb": peak - base_mb}

    result = WORKERS[args.worker](torch, x, args, dead_ids, timer)
    result.update(
        library=args.worker,
        d_in=d_in,
        d_latent=args.d_latent,
        k=K,
        batch=args.batch,
        dead_fraction=args.dead_fraction,
        n_dead=len(dead_ids),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        device=str(device),
        memory_measure="cuda max_memory_allocated" if cuda else "peak RSS growth",
    )
    print(json.dumps(result), flush=True)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags set by compare.py for one measurement."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", required=True, choices=sorted(WORKERS))
    parser.add_argument("--d-in", type=int, action="append", required=True)
    parser.add_argument("--d-latent", type=int, default=None, help=f"default {EXPANSION}·d_in")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dead-fraction", type=float, default=0.0)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_worker(parse_args())
