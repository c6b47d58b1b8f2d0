"""Explanations and edits of heads with a linear concept-to-class layer."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_interp.concepts.base import ConceptHead
from lightning_interp.errors import ConfigError


def _final_weight(head: ConceptHead) -> Tensor:
    if head.final is None:
        raise ConfigError(
            f"{type(head).__name__} has no linear concept-to-class layer to explain; use a "
            f"linear label predictor (label_hidden=0) or a PCBM / label-free head"
        )
    return head.final.weight.detach().float()


def top_concepts_per_class(
    head: ConceptHead, k: int = 5, positive_only: bool = True
) -> dict[str, list[tuple[str, float]]]:
    """The ``k`` concepts with the largest final-layer weights for each class.

    Args:
        head: A head with a ``final`` layer.
        k: Concepts per class.
        positive_only: Only concepts voting for the class (weight > 0); else by |weight|.

    Returns:
        ``{class: [(concept, weight), ...]}``, largest first, zero weights left out.
    """
    weight = _final_weight(head)
    out = {}
    for c, class_name in enumerate(head.class_names):
        row = weight[c]
        key = row if positive_only else row.abs()
        order = key.argsort(descending=True)[:k].tolist()
        keep = [(head.concept_names[j], float(row[j])) for j in order if float(key[j]) > 0]
        out[class_name] = keep
    return out


@torch.no_grad()
def top_concepts_per_example(
    head: ConceptHead, x: Tensor, k: int = 3, mask: Tensor | None = None
) -> list[list[tuple[str, float, float]]]:
    """Per example, the concepts contributing most to its predicted class.

    A concept's contribution is its bottleneck value times its weight for that class; a
    negative value with a negative weight (the concept is absent, and absence counts for
    the class) contributes positively too, so the value is returned beside it.

    Returns:
        Per example, ``[(concept, contribution, value), ...]``, largest contribution first.
    """
    weight = _final_weight(head).to(x.device)
    out = head(x, mask=mask)
    pred = out.logits.argmax(-1)
    values = out.concepts.float()
    contributions = values * weight[pred]
    top = contributions.topk(min(k, head.num_concepts), dim=-1)
    return [
        [
            (head.concept_names[j], float(c), float(values[row, j]))
            for c, j in zip(vals.tolist(), idx.tolist(), strict=True)
        ]
        for row, (vals, idx) in enumerate(zip(top.values, top.indices, strict=True))
    ]


def remove_concept(head: ConceptHead, name: str) -> ConceptHead:
    """A copy of ``head`` whose final layer ignores concept ``name`` (its column zeroed)."""
    index = head.concept_index(name)
    _final_weight(head)
    edited = copy.deepcopy(head)
    with torch.no_grad():
        edited.final.weight[:, index] = 0.0
    return edited


@dataclass
class EditReport:
    """Accuracy before and after a global edit."""

    concept: str
    accuracy_before: float
    accuracy_after: float

    @property
    def change(self) -> float:
        """``accuracy_after - accuracy_before``."""
        return self.accuracy_after - self.accuracy_before


@torch.no_grad()
def _accuracy(head: ConceptHead, x: Tensor, y: Tensor, mask: Tensor | None) -> float:
    return float((head(x, mask=mask).logits.argmax(-1) == y).float().mean())


def evaluate_removal(
    head: ConceptHead, name: str, x: Tensor, y: Tensor, mask: Tensor | None = None
) -> tuple[ConceptHead, EditReport]:
    """Remove concept ``name`` from the final layer and report the accuracy change on ``(x, y)``."""
    edited = remove_concept(head, name)
    report = EditReport(name, _accuracy(head, x, y, mask), _accuracy(edited, x, y, mask))
    return edited, report
