"""Throughput of ``Backbone.capture`` against plain forwards of the same model.

Compares, on SmolLM2-135M-Instruct (packaged GGUF weights, 30 Llama blocks) over real
Wikipedia text:

- ``capture``: ``backbone.capture(inputs, "layers.{L}.resid_post")`` (stops after block L);
- ``truncated``: the model's own forward with its block list cut to blocks 0..L (the best
  any early exit can do);
- ``full``: the whole causal LM forward.

The ratio capture/truncated is the cost of the hooks and the early exit (aim: >= 0.9).

Run from the repository root::

    .venv/bin/python benchmarks/capture.py [--layer 5] [--batch 8] [--context 128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_interp.backbones import Backbone
from lightning_interp.data.offline import SMOLLM2_GGUF, smollm2_folder, wikipedia_articles


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    backbone = Backbone.from_pretrained(str(smollm2_folder()), gguf_file=SMOLLM2_GGUF)
    text = " ".join(wikipedia_articles())
    ids = backbone.encode(text[: 40 * args.batch * args.context])["input_ids"]
    ids = ids[0, : args.batch * args.context].view(args.batch, args.context)
    inputs = {"input_ids": ids}
    site = f"layers.{args.layer}.resid_post"
    tokens = ids.numel()

    capture_s = median_seconds(lambda: backbone.capture(inputs, site), args.repeats)

    base = backbone.model.model
    all_layers = base.layers
    base.layers = all_layers[: args.layer + 1]
    try:
        with torch.no_grad():
            truncated_s = median_seconds(lambda: base(**inputs), args.repeats)
    finally:
        base.layers = all_layers
    with torch.no_grad():
        full_s = median_seconds(lambda: backbone.model(**inputs), args.repeats)

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(
        f"SmolLM2-135M (30 blocks), site {site}, {args.batch} x {args.context} tokens, "
        f"median of {args.repeats}"
    )
    print("| forward | tokens/s | ms | capture speed relative |")
    print("|---|---|---|---|")
    for name, seconds in (("capture", capture_s), ("truncated", truncated_s), ("full", full_s)):
        print(
            f"| {name} | {tokens / seconds:,.0f} | {1000 * seconds:.1f} | "
            f"{seconds / capture_s:.2f} |"
        )
    print(f"capture / truncated throughput: {truncated_s / capture_s:.3f}")


if __name__ == "__main__":
    main()
