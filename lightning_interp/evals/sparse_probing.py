"""Sparse probing: whether a few latents carry a labelled property as well as the model does.

Follows SAEBench's sparse-probing eval (adamkarvonen/SAEBench,
``sae_bench/evals/sparse_probing/main.py`` and ``probe_training.py``; Gurnee et al. 2023,
"Finding Neurons in a Haystack", for k-sparse probing): each text's activations and codes
are mean-pooled over its non-special tokens; each class is a balanced one-vs-rest task
(negatives drawn evenly from the other classes); the k latents with the largest absolute
difference of class means on the training split are kept
(``get_top_k_mean_diff_mask``) and an L2 logistic regression (scikit-learn, ``C=1``,
``max_iter=1000``) is fitted on them; the test accuracy is averaged over classes. The same
is done on the raw activations (``llm_top_k``) and with every dimension (the dense probe,
``llm_test_accuracy``; SAEBench fits that one with a torch probe, we use the same
scikit-learn regression).

Tasks are labelled texts that install offline (a fixed seeded split into train and test):

- ``polarity``: 200 Rotten Tomatoes sentences, positive vs negative (Pang & Lee, gensim's
  test data), the analogue of SAEBench's Amazon sentiment task;
- ``chat_topics``: ChatterBot conversations (chatterbot-corpus) on five topics, the
  analogue of SAEBench's AG News topic task.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_interp.errors import ConfigError
from lightning_interp.evals.registry import EvalContext, register_eval

K_VALUES = (1, 2, 5, 20)
CHAT_TOPICS = ("ai", "coding", "emotion", "psychology", "trivia")
TASKS = ("polarity", "chat_topics")


def load_task(name: str, per_class: int = 60) -> tuple[list[str], list[int], list[str]]:
    """``(texts, labels, class_names)`` of an offline task, at most ``per_class`` per class.

    Raises:
        ConfigError: an unknown task name.
    """
    if name == "polarity":
        from lightning_interp.data.offline import labelled_sentences

        rows = labelled_sentences()
        by_class: dict[int, list[str]] = {0: [], 1: []}
        for text, label in rows:
            by_class[label].append(text)
        texts = [t for c in (0, 1) for t in by_class[c][:per_class]]
        labels = [c for c in (0, 1) for _ in by_class[c][:per_class]]
        return texts, labels, ["negative", "positive"]
    if name == "chat_topics":
        return (*_chat_topics(per_class), list(CHAT_TOPICS))
    raise ConfigError(f"unknown sparse-probing task {name!r}; choose from {', '.join(TASKS)}")


def _chat_topics(per_class: int) -> tuple[list[str], list[int]]:
    import yaml

    from lightning_interp.data.offline import package_folder

    folder = package_folder("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"
    texts: list[str] = []
    labels: list[int] = []
    for label, topic in enumerate(CHAT_TOPICS):
        data = yaml.safe_load((folder / f"{topic}.yml").read_text(encoding="utf-8"))
        distinct = dict.fromkeys(
            "\n".join(str(turn) for turn in entry)
            for entry in data.get("conversations", [])
            if isinstance(entry, list) and entry
        )
        chosen = list(distinct)[:per_class]
        texts += chosen
        labels += [label] * len(chosen)
    return texts, labels


@torch.no_grad()
def pooled_features(
    context: EvalContext, texts: Sequence[str], batch_size: int = 8
) -> tuple[Tensor, Tensor]:
    """Mean-pooled activations ``[n, d]`` and codes ``[n, d_latent]`` of each text.

    Each text is truncated to ``context.context_size`` tokens; special tokens (BOS, padding,
    chat markers) are left out of the means, as SAEBench leaves out BOS and padding.
    """
    from lightning_interp.backbones.special_tokens import special_token_ids
    from lightning_interp.evals.core import reconstruct

    backbone, dictionary = context.backbone, context.dictionary
    tokenizer = getattr(backbone.tokenizer, "tokenizer", backbone.tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    special = torch.tensor(special_token_ids(tokenizer), dtype=torch.long)
    acts_out, codes_out = [], []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            list(texts[start : start + batch_size]),
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=context.context_size,
        )
        keep = batch["attention_mask"].bool() & ~torch.isin(batch["input_ids"], special)
        acts = backbone.capture(dict(batch), context.site)[context.site]
        codes, _ = reconstruct(dictionary, acts.reshape(-1, acts.shape[-1]))
        codes = codes.reshape(*acts.shape[:2], -1)
        weights = keep.to(acts.dtype)[..., None]
        count = weights.sum(1).clamp_min(1)
        acts_out.append((acts * weights).sum(1) / count)
        codes_out.append((codes.float() * weights.to(codes.device)).sum(1).cpu() / count)
    return torch.cat(acts_out).float(), torch.cat(codes_out).float()


def top_k_mean_difference(x: Tensor, y: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` columns with the largest ``|mean(x | y=1) - mean(x | y=0)|``."""
    diff = (x[y == 1].mean(0) - x[y == 0].mean(0)).abs()
    return diff.argsort(descending=True)[:k]


def probe_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor) -> float:
    """Test accuracy of an L2 logistic regression (scikit-learn, ``C=1``, as SAEBench)."""
    from sklearn.linear_model import LogisticRegression

    probe = LogisticRegression(C=1.0, max_iter=1000)
    probe.fit(train_x.double().numpy(), train_y.numpy())
    return float((probe.predict(test_x.double().numpy()) == test_y.numpy()).mean())


def sparse_probe_accuracies(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, ks: Sequence[int]
) -> dict[str, float]:
    """``{"top_<k>": accuracy}`` of probes on the k mean-difference-selected columns."""
    out = {}
    for k in ks:
        cols = top_k_mean_difference(train_x, train_y, min(k, train_x.shape[1]))
        out[f"top_{k}"] = probe_accuracy(train_x[:, cols], train_y, test_x[:, cols], test_y)
    return out


def one_vs_rest(labels: Tensor, positive: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Row indices and 0/1 labels of a balanced one-vs-rest task.

    As SAEBench's ``prepare_probe_data``: every positive, and as many negatives drawn evenly
    from the other classes.
    """
    pos = (labels == positive).nonzero().squeeze(1)
    others = [c for c in labels.unique().tolist() if c != positive]
    per_class = -(-len(pos) // len(others))
    negatives = []
    for c in others:
        rows = (labels == c).nonzero().squeeze(1)
        negatives.append(rows[torch.randperm(len(rows), generator=generator)[:per_class]])
    neg = torch.cat(negatives)
    neg = neg[torch.randperm(len(neg), generator=generator)[: len(pos)]]
    rows = torch.cat([pos, neg])
    return rows, torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).long()


def split(labels: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """A seeded stratified split: ``(train_rows, test_rows)``."""
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero().squeeze(1)
        rows = rows[torch.randperm(len(rows), generator=generator)]
        cut = max(1, round(len(rows) * test_fraction))
        test.append(rows[:cut])
        train.append(rows[cut:])
    return torch.cat(train), torch.cat(test)


def evaluate_task(
    acts: Tensor,
    codes: Tensor,
    labels: Tensor,
    *,
    ks: Sequence[int] = K_VALUES,
    test_fraction: float = 0.3,
    seed: int = 0,
) -> dict[str, Any]:
    """SAEBench's per-dataset numbers from pooled activations, codes and class labels.

    Returns:
        ``llm_test_accuracy`` (dense probe on the activations), ``llm_top_<k>_test_accuracy``
        and ``sae_top_<k>_test_accuracy``, each averaged over the one-vs-rest classes
        (a two-class task is one binary task), plus ``per_class``.
    """
    train_rows, test_rows = split(labels, test_fraction, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    classes = labels.unique().tolist()
    positives = classes[1:] if len(classes) == 2 else classes
    per_class: dict[str, dict[str, float]] = {}
    for positive in positives:
        result: dict[str, float] = {}
        rows = {}
        for part, subset in (("train", train_rows), ("test", test_rows)):
            picked, y = one_vs_rest(labels[subset], positive, generator)
            rows[part] = (subset[picked], y)
        (tr, ytr), (te, yte) = rows["train"], rows["test"]
        result["llm_test_accuracy"] = probe_accuracy(acts[tr], ytr, acts[te], yte)
        for name, x in (("llm", acts), ("sae", codes)):
            for key, value in sparse_probe_accuracies(x[tr], ytr, x[te], yte, ks).items():
                result[f"{name}_{key}_test_accuracy"] = value
        per_class[str(positive)] = result
    keys = next(iter(per_class.values())).keys()
    means = {key: float(np.mean([r[key] for r in per_class.values()])) for key in keys}
    return {**means, "per_class": per_class}


@register_eval("sparse_probing")
def run(context: EvalContext, *, tasks: Sequence[str] = TASKS, per_class: int = 60) -> dict:
    """Sparse probing on every offline task; results per task and their mean."""
    results: dict[str, Any] = {}
    for task in tasks:
        texts, labels, names = load_task(task, per_class)
        acts, codes = pooled_features(context, texts)
        outcome = evaluate_task(acts, codes, torch.tensor(labels), seed=context.seed)
        outcome["per_class"] = {names[int(c)]: v for c, v in outcome["per_class"].items()}
        results[task] = {**outcome, "classes": names, "texts": len(texts)}
    keys = [k for k in next(iter(results.values())) if k.endswith("_accuracy")]
    mean = {k: float(np.mean([results[t][k] for t in results])) for k in keys}
    return {
        "metrics": {**mean, "tasks": results},
        "settings": {
            "tasks": {t: _TASK_SOURCES[t] for t in tasks},
            "k_values": list(K_VALUES),
            "per_class": per_class,
            "test_fraction": 0.3,
            "pooling": "mean over non-special tokens",
            "latent_selection": "top-k |mean(class) - mean(rest)| on the training split",
            "probe": "sklearn LogisticRegression(C=1, max_iter=1000), L2",
            "context_size": context.context_size,
        },
    }


_TASK_SOURCES = {
    "polarity": "offline:polarity (Pang & Lee sentence polarity sample, gensim test data)",
    "chat_topics": "chatterbot-corpus 1.3.3 English conversations, topics "
    + ", ".join(CHAT_TOPICS),
}
