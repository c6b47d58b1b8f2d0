"""Concept filters of Label-free CBM (Oikarinen et al., ICLR 2023, section 3.1).

A concept set written by hand or by a language model holds phrases that are too long to
be a concept, near-synonyms of a class name (they would leak the label), near-duplicates
of each other, or concepts the backbone never sees in the data. Each filter drops one kind.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_interp.concepts.bank import ConceptBank
from lightning_interp.errors import EmptyConceptBankError


@dataclass
class FilterReport:
    """Which concepts a filter pass dropped and why (``{name: reason}``), and what stayed."""

    kept: list[str]
    dropped: dict[str, str] = field(default_factory=dict)


def filter_concepts(
    bank: ConceptBank,
    *,
    max_length: int | None = 30,
    class_names: Sequence[str] | None = None,
    encoder: Callable[[Sequence[str]], Tensor] | None = None,
    class_similarity: float | None = 0.85,
    mutual_similarity: float | None = 0.9,
    embeddings: Tensor | None = None,
    min_activation: float | None = None,
    top_k: int = 5,
) -> tuple[ConceptBank, FilterReport]:
    """Apply the Label-free CBM filters in the paper's order.

    Args:
        bank: Concepts to filter (names are the phrases).
        max_length: Drop phrases longer than this many characters (paper: 30).
        class_names: Class names; with ``encoder``, concepts whose cosine similarity to
            any class name exceeds ``class_similarity`` are dropped.
        encoder: Text encoder for the class names (the one that built the bank).
        class_similarity: Threshold of the class-name filter (``None``: off).
        mutual_similarity: Of two concepts more similar than this, the later one goes.
        embeddings: Data embeddings ``[n, d]``; with ``min_activation``, concepts whose
            mean of the ``top_k`` largest cosine similarities to the data is below it go.
        min_activation: Threshold of the activation filter (``None``: off).
        top_k: Examples averaged by the activation filter.

    Returns:
        The filtered bank and a :class:`FilterReport`.

    Raises:
        EmptyConceptBankError: Every concept was dropped; names the thresholds to loosen.

    Example:
        >>> bank = ConceptBank(["red", "crimson", "a very long descriptive phrase indeed"],
        ...                    torch.tensor([[1.0, 0.0], [0.99, 0.05], [0.0, 1.0]]))
        >>> kept, report = filter_concepts(bank)
        >>> kept.names, sorted(report.dropped)
        (['red'], ['a very long descriptive phrase indeed', 'crimson'])
    """
    keep = torch.ones(len(bank), dtype=torch.bool)
    dropped: dict[str, str] = {}

    def drop(index: int, reason: str) -> None:
        if keep[index]:
            keep[index] = False
            dropped[bank.names[index]] = reason

    if max_length is not None:
        for i, name in enumerate(bank.names):
            if len(name) > max_length:
                drop(i, f"longer than {max_length} characters")
    if class_names and encoder is not None and class_similarity is not None:
        with torch.no_grad():
            sims = bank.similarity(encoder(list(class_names))).T
        best, which = sims.max(dim=1)
        for i in torch.nonzero(best > class_similarity).flatten().tolist():
            drop(i, f"similarity {best[i]:.2f} to class {class_names[which[i]]!r}")
    if embeddings is not None and min_activation is not None:
        sims = bank.similarity(embeddings)
        top = sims.topk(min(top_k, sims.shape[0]), dim=0).values.mean(0)
        for i in torch.nonzero(top < min_activation).flatten().tolist():
            drop(i, f"top-{top_k} activation {top[i]:.3f} < {min_activation}")
    if mutual_similarity is not None:
        sims = bank.similarity(bank.vectors)
        for i in range(len(bank)):
            if not keep[i]:
                continue
            for j in torch.nonzero(sims[i, i + 1 :] > mutual_similarity).flatten().tolist():
                drop(i + 1 + j, f"similarity {sims[i, i + 1 + j]:.2f} to {bank.names[i]!r}")
    if not keep.any():
        raise EmptyConceptBankError(
            f"all {len(bank)} concepts were filtered out ({_summary(dropped)}); loosen "
            f"max_length, class_similarity, mutual_similarity or min_activation"
        )
    kept = bank.keep(keep)
    kept.metadata["filtered_out"] = len(dropped)
    return kept, FilterReport(kept.names, dropped)


def _summary(dropped: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for reason in dropped.values():
        kind = reason.split(" ")[0]
        counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{n} by {kind}" for kind, n in counts.items())
