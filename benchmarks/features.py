"""Tokens/s of the feature pass against the plain capture it is built on, and peak memory.

On SmolLM2-135M (``offline:smollm2``, packaged weights) at ``layers.6.resid_post`` over
offline Wikipedia text, with a random TopK dictionary (default 9,216 latents, k=32):

- ``capture``: the same capture batches (contexts in text order, special tokens masked)
  through ``backbone.capture`` only;
- ``features``: :func:`~lightning_interp.features.build.build_feature_store` over the same
  tokens (capture + ``encode_sparse`` + accumulators + the final store), no checkpoints.

Goal: features/capture <= 1.5. Peak memory is the process's maximum resident set size
after each phase (the capture runs first), plus the accumulators' own size.

Run from the repository root::

    .venv/bin/python benchmarks/features.py [--tokens 8192] [--latents 9216] [--k 32]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

from lightning_interp import create_dictionary
from lightning_interp.backbones import load_backbone
from lightning_interp.backbones.special_tokens import special_token_ids
from lightning_interp.data.lm_datamodule import load_texts
from lightning_interp.data.tokens import batch_contexts, iter_contexts
from lightning_interp.features.build import Corpus, TokenProgress, build_feature_store
from lightning_interp.features.store import FeatureAccumulator, FeatureSettings

SITE = "layers.6.resid_post"


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def capture_only(backbone, corpus: Corpus) -> tuple[int, float]:
    """Kept tokens and seconds of the capture alone over the pass's batches."""
    special = torch.tensor(special_token_ids(backbone.tokenizer))
    contexts = iter_contexts(corpus.documents(), backbone.tokenizer, corpus.context_size)
    tokens, start = 0, time.perf_counter()
    for _, ids, mask in batch_contexts(contexts, corpus.contexts_per_capture):
        keep = mask.bool() & ~torch.isin(ids, special)
        keep &= keep.reshape(-1).cumsum(0).view_as(keep) <= corpus.max_tokens - tokens
        acts = backbone.capture({"input_ids": ids, "attention_mask": mask}, SITE)[SITE]
        acts.reshape(-1, acts.shape[-1])[keep.reshape(-1)]
        tokens += int(keep.sum())
        if tokens >= corpus.max_tokens:
            break
    return tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--latents", type=int, default=9216)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--contexts-per-capture", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    backbone = load_backbone("offline:smollm2")
    width = backbone.site_width(SITE)
    sae = create_dictionary("topk", d_in=width, d_latent=args.latents, k=args.k)
    corpus = Corpus(
        load_texts("offline:wikipedia"),
        name="offline:wikipedia",
        context_size=128,
        contexts_per_capture=args.contexts_per_capture,
        max_tokens=args.tokens,
    )
    settings = FeatureSettings()
    capture_only(backbone, Corpus(corpus.texts, max_tokens=1024))  # warm-up
    tokens, capture_s = capture_only(backbone, corpus)
    capture_peak = peak_mb()
    out = Path(tempfile.mkdtemp()) / "store"
    start = time.perf_counter()
    meter = TokenProgress(args.tokens, enabled=False)
    build_feature_store(
        sae,
        backbone,
        corpus,
        out,
        site=SITE,
        settings=settings,
        checkpoint_every=0,
        progress=meter,
    )
    features_s = time.perf_counter() - start
    pass_s = meter.seconds
    features_peak = peak_mb()
    acc_mb = FeatureAccumulator(args.latents, settings).nbytes() / 2**20
    store_mb = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    shutil.rmtree(out.parent)
    print(
        f"SmolLM2-135M {SITE}, topk {args.latents} latents k={args.k}, {tokens} tokens, "
        f"{args.threads} threads"
    )
    print(
        f"capture : {tokens / capture_s:8.0f} tokens/s ({capture_s:.1f} s), peak RSS "
        f"{capture_peak:.0f} MB"
    )
    print(
        f"features: {tokens / features_s:8.0f} tokens/s ({features_s:.1f} s), peak RSS "
        f"{features_peak:.0f} MB"
    )
    print(
        f"  of which the streaming pass {pass_s:.1f} s ({tokens / pass_s:.0f} tokens/s), the "
        f"finish (logit lens, co-firing, writing; independent of the corpus length) "
        f"{features_s - pass_s:.1f} s"
    )
    print(
        f"ratio pass/capture time: {pass_s / capture_s:.2f} (goal <= 1.5); "
        f"with the finish: {features_s / capture_s:.2f}"
    )
    print(
        f"accumulators {acc_mb:.0f} MB (before the token sample), store on disk {store_mb:.0f} MB"
    )


if __name__ == "__main__":
    main()
