"""Per-layer transcoders for the offline SmolLM2 and one attribution graph (issue 17 demo).

Runs the library's own path end to end, on CPU, in three timed phases:

1. **capture**: one ``Backbone.capture`` pass per batch of contexts over the offline
   Wikipedia text stores the 60 sites ``layers.{l}.mlp_in`` / ``layers.{l}.mlp_out``
   (l = 0..29) of SmolLM2-135M-Instruct in an on-disk ``ActivationCacheWriter`` cache
   (float32, normalisation scales recorded). Position 0 of every context is dropped: it is
   the attention sink, whose activations are orders of magnitude larger than the rest.
2. **train**: for each layer, a TopK transcoder (``mlp_in -> mlp_out``) trained by a
   Lightning ``Trainer`` on a ``DictionaryModule`` fed by ``ActivationDataModule`` reading
   only that layer's two sites from the cache (normalised rows), exported by
   ``ExportDictionary`` to ``<transcoders>/layer{l}/`` (scales folded back, so the saved
   transcoder takes raw activations). Each layer's final validation FVU is printed.
3. **attribute**: ``ReplacementModel`` + ``attribute`` on one prompt, then the replacement
   and completeness scores, pruning, and ``graph.json`` + ``index.html`` in ``--out``.

Seeded (``--seed``): the same arguments give the same cache, transcoders and graph up to
float rounding. Timings depend on machine load (the reference run shared 2 CPU cores with
other jobs, load ~10); the attribute time includes loading the backbone and transcoders.

Run from the repository root::

    nice -n 5 .venv/bin/python benchmarks/circuits_smollm2.py \\
        [--tokens 16384] [--steps 150] [--d-latent 1152] [--k 16] \\
        [--work scratch/smollm2_plt2] [--out runs/circuits_smollm2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import warnings
from functools import partial
from pathlib import Path

import lightning as L
import torch

from lightning_interp.backbones import load_backbone
from lightning_interp.callbacks import ExportDictionary
from lightning_interp.circuits.attribution import attribute
from lightning_interp.circuits.commands import load_transcoders
from lightning_interp.circuits.graph_html import write_graph_html
from lightning_interp.circuits.graph_json import graph_to_json, write_graph_json
from lightning_interp.circuits.pruning import graph_scores, prune_graph
from lightning_interp.circuits.replacement import ReplacementModel
from lightning_interp.data import ActivationDataModule
from lightning_interp.data.cache import ActivationCache, ActivationCacheWriter
from lightning_interp.data.cache_format import expected_norm_scale
from lightning_interp.data.offline import wikipedia_articles
from lightning_interp.modules import DictionaryModule

BACKBONE = "offline:smollm2"
LAYERS, WIDTH = 30, 576


def sites_of(layer: int) -> tuple[str, str]:
    """The transcoder input and output sites of ``layer``."""
    return f"layers.{layer}.mlp_in", f"layers.{layer}.mlp_out"


def capture(args: argparse.Namespace, cache_dir: Path) -> float:
    """Write the 60-site cache; returns the seconds taken (0 when an existing cache is reused)."""
    if (cache_dir / "manifest.json").is_file() and not args.recapture:
        cache = ActivationCache(cache_dir)
        if cache.total_tokens >= args.tokens:
            print(f"capture: reusing {cache_dir} ({cache.total_tokens} tokens)")
            return 0.0
    start = time.perf_counter()
    backbone = load_backbone(BACKBONE)
    sites = [site for layer in range(LAYERS) for site in sites_of(layer)]
    per_context = args.context - 1  # position 0 dropped
    contexts = -(-args.tokens // per_context)
    ids: list[int] = []
    for article in wikipedia_articles():  # a fixed order: the capture is deterministic
        ids.extend(backbone.tokenizer(article)["input_ids"])
        if len(ids) >= contexts * args.context:
            break
    ids_t = torch.tensor(ids[: contexts * args.context]).view(-1, args.context)
    metadata = {
        "provenance": {"backbone": BACKBONE, "dataset": "offline:wikipedia"},
        "context_size": args.context,
        "dropped_positions": [0],
    }
    widths = dict.fromkeys(sites, WIDTH)
    with ActivationCacheWriter(
        cache_dir,
        sites=sites,
        widths=widths,
        shard_tokens=4096,
        metadata=metadata,
        overwrite=True,
    ) as writer:
        for n, chunk in enumerate(ids_t.split(args.capture_batch)):
            got = backbone.capture({"input_ids": chunk}, sites)  # stops after layer 29's MLP
            rows = {site: got[site][:, 1:].reshape(-1, WIDTH) for site in sites}
            if n == 0:
                writer.normalization = {s: expected_norm_scale(r) for s, r in rows.items()}
            writer.add(rows)
            done = writer.total_tokens
            print(
                f"capture: {done} tokens, {done / (time.perf_counter() - start):.0f} tok/s",
                flush=True,
            )
    return time.perf_counter() - start


def train_layer(args: argparse.Namespace, cache_dir: Path, layer: int, folder: Path) -> dict:
    """Train and export one layer's transcoder; returns its exported metrics."""
    site_in, site_out = sites_of(layer)
    spec = {
        "architecture": "topk",
        "d_latent": args.d_latent,
        "k": args.k,
        "apply_b_dec_to_input": False,
        "provenance": {"backbone": BACKBONE, "site": site_in, "site_out": site_out},
    }
    module = DictionaryModule(
        spec,
        optimizer=partial(torch.optim.Adam, lr=args.lr),
        warmup_steps=min(50, args.steps // 10),
        decay_fraction=0.2,
    )
    data = ActivationDataModule(
        cache_dir=str(cache_dir),
        sites=[site_in, site_out],
        batch_size=args.batch,
        val_tokens=args.val_tokens,
        seed=args.seed + layer,
        apply_normalization=True,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        max_epochs=-1,
        check_val_every_n_epoch=10_000,  # ExportDictionary validates once at the end
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ExportDictionary(dirpath=str(folder), overwrite=True)],
    )
    trainer.fit(module, datamodule=data)
    return json.loads((folder / "metrics.json").read_text())


def train(args: argparse.Namespace, cache_dir: Path, out: Path) -> tuple[float, list[float]]:
    """Train all layers in order; returns the seconds taken and each layer's val FVU."""
    start, fvus = time.perf_counter(), []
    for layer in range(LAYERS):
        L.seed_everything(args.seed + layer, verbose=False)
        metrics = train_layer(args, cache_dir, layer, out / f"layer{layer}")
        fvus.append(float(metrics["fvu"]))
        print(
            f"train: layer {layer} val fvu {metrics['fvu']:.3f} l0 {metrics['l0']:.1f} "
            f"dead {metrics.get('dead_fraction', float('nan')):.3f} "
            f"({time.perf_counter() - start:.0f}s)",
            flush=True,
        )
    return time.perf_counter() - start, fvus


def attribute_prompt(args: argparse.Namespace, transcoders_dir: Path) -> dict:
    """Attribute ``args.prompt``, write graph.json + index.html; the numbers to report."""
    start = time.perf_counter()
    transcoders, _ = load_transcoders(transcoders_dir)
    backbone = load_backbone(BACKBONE)
    model = ReplacementModel(backbone, transcoders, transcoder_source=str(transcoders_dir))
    run = model.run(args.prompt)
    # FVU of each transcoder on the prompt's own MLP outputs (position 0 included).
    prompt_fvu = [
        float(e.pow(2).sum() / (o - o.mean(0)).pow(2).sum())
        for e, o in zip(run.errors, run.mlp_out, strict=True)
    ]
    graph = attribute(model, args.prompt, max_feature_nodes=None, batch_size=32)
    seconds = time.perf_counter() - start
    tokenizer = getattr(backbone.tokenizer, "tokenizer", backbone.tokenizer)
    logit_ids = [graph.nodes[i].index for i in graph.indices("logit")]
    graph.meta["logit_tokens"] = [tokenizer.decode([t]) for t in logit_ids]
    replacement, completeness = graph_scores(graph)
    graph.meta["scores"] = {"replacement": replacement, "completeness": completeness}
    pruned = prune_graph(graph, args.node_threshold, args.edge_threshold)
    payload = graph_to_json(pruned, slug="graph")
    out = Path(args.out)
    write_graph_json(payload, out / "graph.json")
    write_graph_html(
        payload,
        out / "index.html",
        scores={"replacement": replacement, "completeness": completeness},
    )
    kinds = [node.kind for node in graph.nodes]
    top = graph.indices("logit")[0]
    return {
        "prompt": args.prompt,
        "top_logit": graph.meta["logit_tokens"][0],
        "top_logit_probability": graph.nodes[top].activation,
        "replacement_score": replacement,
        "completeness_score": completeness,
        "nodes_before": len(graph.nodes),
        "features_before": kinds.count("feature"),
        "nodes_after": len(payload["nodes"]),
        "edges_after": len(payload["links"]),
        "prompt_fvu_per_layer": prompt_fvu,
        "attribute_seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16_384, help="cached rows (tokens)")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--capture-batch", type=int, default=8, help="contexts per forward")
    parser.add_argument("--d-latent", type=int, default=1152)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--steps", type=int, default=150, help="Adam steps per layer")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--val-tokens", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--node-threshold", type=float, default=0.8)
    parser.add_argument("--edge-threshold", type=float, default=0.98)
    parser.add_argument("--work", default="scratch/smollm2_plt2", help="cache + transcoders")
    parser.add_argument("--out", default="runs/circuits_smollm2", help="graph.json, index.html")
    parser.add_argument("--recapture", action="store_true", help="rebuild the cache")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    work = Path(args.work)
    cache_dir, transcoders_dir = work / "cache", work / "transcoders"

    capture_s = capture(args, cache_dir)
    if transcoders_dir.exists():
        shutil.rmtree(transcoders_dir)  # a stale layer from another run must not be loaded
    train_s, fvus = train(args, cache_dir, transcoders_dir)
    result = attribute_prompt(args, transcoders_dir)
    result.update(
        val_fvu_per_layer=fvus,
        capture_seconds=capture_s,
        train_seconds=train_s,
        config={k: v for k, v in vars(args).items() if k not in ("out", "work")},
    )
    (Path(args.out) / "result.json").write_text(json.dumps(result, indent=1))
    print("val FVU per layer:", " ".join(f"{f:.3f}" for f in fvus))
    print(f"mean val FVU {sum(fvus) / len(fvus):.3f}")
    print("prompt FVU per layer:", " ".join(f"{f:.3f}" for f in result["prompt_fvu_per_layer"]))
    print(f"top logit {result['top_logit']!r} p={result['top_logit_probability']:.3f}")
    print(f"replacement score {result['replacement_score']:.4f}")
    print(f"completeness score {result['completeness_score']:.4f}")
    print(
        f"nodes {result['nodes_before']} ({result['features_before']} features) -> "
        f"{result['nodes_after']} after pruning, {result['edges_after']} edges"
    )
    print(
        f"time: capture {capture_s:.0f}s, train {train_s:.0f}s, "
        f"attribute {result['attribute_seconds']:.0f}s"
    )
    print(f"graph: {Path(args.out) / 'graph.json'}, view: {Path(args.out) / 'index.html'}")


if __name__ == "__main__":
    main()
