"""Concept filters of Label-free CBM (Oikarinen et al., ICLR 2023, section 3.1).

A concept set written by hand or by a language model holds phrases that are too long to
be a concept, near-synonyms of a class name (they would leak the label), near-duplicates
of each other, or concepts the backbone never sees in the data. Each filter drops one kind,
in the reference's order and with its rules (``Trustworthy-ML-Lab/Label-free-CBM``:
``conceptset_utils.py`` for the first three, run by ``GPT_conceptset_processor.ipynb``;
``train_cbm.py`` for the activation filter):

1. length: phrases longer than 30 characters go;
2. class names: a phrase equal to a class name (also with "a ", "an ", "the " before it,
   capitalised or in upper case) goes, then any phrase whose text similarity to a class
   name is at least 0.85;
3. near-duplicates: of two phrases with text similarity at least 0.9, the one with the
   smaller summed similarity to all phrases goes (the more general one stays);
4. activation: phrases whose mean cosine similarity to their 5 most similar training
   inputs is at most 0.25 go.

The reference's text similarity is ``(mpnet + 3 * CLIP) / 4`` (cosines from
all-mpnet-base-v2 and the CLIP text tower): pass ``encoder=[(mpnet, 1), (clip, 3)]`` to
weigh encoders the same way, or one encoder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_interp.concepts.bank import ConceptBank
from lightning_interp.errors import ConfigError, EmptyConceptBankError

TextEncoder = Callable[[Sequence[str]], Tensor]
# Prefixes under which a class name counts as the same phrase (conceptset_utils.py).
CLASS_PREFIXES = ("", "a ", "A ", "an ", "An ", "the ", "The ")


@dataclass
class FilterReport:
    """Which concepts a filter pass dropped and why (``{name: reason}``), and what stayed."""

    kept: list[str]
    dropped: dict[str, str] = field(default_factory=dict)


def _weighted(
    encoder: TextEncoder | Sequence[tuple[TextEncoder, float]],
) -> list[tuple[TextEncoder, float]]:
    if callable(encoder):
        return [(encoder, 1.0)]
    pairs = [(e, float(w)) for e, w in encoder]
    if not pairs or not all(callable(e) and w > 0 for e, w in pairs):
        raise ConfigError(
            "encoder must be a text encoder or a list of (encoder, positive weight) pairs, "
            "e.g. [(mpnet, 1), (clip, 3)] as in Label-free CBM"
        )
    return pairs


def text_similarity(
    encoder: TextEncoder | Sequence[tuple[TextEncoder, float]],
    left: Sequence[str],
    right: Sequence[str],
) -> Tensor:
    """Weighted mean over encoders of the cosine similarities of two phrase lists.

    Returns:
        ``[len(left), len(right)]``.
    """
    pairs = _weighted(encoder)
    total = torch.zeros(len(left), len(right), dtype=torch.float64)
    with torch.no_grad():
        for encode, weight in pairs:
            a = torch.nn.functional.normalize(encode(list(left)).double(), dim=-1)
            b = torch.nn.functional.normalize(encode(list(right)).double(), dim=-1)
            total += weight * (a @ b.T).cpu()
    return total / sum(w for _, w in pairs)


def _class_spellings(class_names: Sequence[str]) -> dict[str, str]:
    """Every spelling of a class name the reference removes as text, mapped to the class."""
    spellings = {}
    for name in class_names:
        for prefix in CLASS_PREFIXES:
            spellings[prefix + name] = name
        spellings[name.upper()] = name
        spellings[name[:1].upper() + name[1:]] = name
    return spellings


def filter_concepts(
    bank: ConceptBank,
    *,
    max_length: int | None = 30,
    class_names: Sequence[str] | None = None,
    encoder: TextEncoder | Sequence[tuple[TextEncoder, float]] | None = None,
    class_similarity: float | None = 0.85,
    mutual_similarity: float | None = 0.9,
    embeddings: Tensor | None = None,
    min_activation: float | None = None,
    top_k: int = 5,
) -> tuple[ConceptBank, FilterReport]:
    """Apply the Label-free CBM filters in the reference's order.

    Args:
        bank: Concepts to filter (names are the phrases).
        max_length: Drop phrases longer than this many characters (paper: 30).
        class_names: Class names: phrases spelling a class name go; with ``encoder``, so
            do phrases whose text similarity to a class name is at least
            ``class_similarity``.
        encoder: Text encoder (texts -> ``[n, d]``), or ``[(encoder, weight), ...]`` whose
            cosines are averaged with those weights (the reference: mpnet 1, CLIP 3).
        class_similarity: Threshold of the class-name filter (``None``: off).
        mutual_similarity: Of two phrases at least this similar, the one with the smaller
            summed similarity to all phrases goes. The similarity is the ``encoder``'s on
            the names when given, else the cosine of the bank's vectors.
        embeddings: Data embeddings ``[n, d]``; with ``min_activation``, concepts whose
            mean of the ``top_k`` largest cosine similarities to the data is at most it go.
        min_activation: Threshold of the activation filter (``None``: off; reference 0.25).
        top_k: Examples averaged by the activation filter.

    Returns:
        The filtered bank and a :class:`FilterReport`.

    Raises:
        EmptyConceptBankError: Every concept was dropped; names the thresholds to loosen.

    Example:
        >>> names = ["red", "crimson", "purple", "a very long descriptive phrase indeed"]
        >>> vectors = torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.6, 0.8], [0.0, 1.0]])
        >>> kept, report = filter_concepts(ConceptBank(names, vectors))
        >>> kept.names, report.dropped["red"]
        (['crimson', 'purple'], "similarity 0.99 to 'crimson'")
    """
    keep = torch.ones(len(bank), dtype=torch.bool)
    dropped: dict[str, str] = {}

    def drop(index: int, reason: str) -> None:
        if keep[index]:
            keep[index] = False
            dropped[bank.names[index]] = reason

    def alive() -> list[int]:
        return torch.nonzero(keep).flatten().tolist()

    if max_length is not None:
        for i, name in enumerate(bank.names):
            if len(name) > max_length:
                drop(i, f"longer than {max_length} characters")
    if class_names:
        spellings = _class_spellings(class_names)
        for i, name in enumerate(bank.names):
            if name in spellings:
                drop(i, f"spells class {spellings[name]!r}")
        if encoder is not None and class_similarity is not None and alive():
            rows = alive()
            sims = text_similarity(encoder, [bank.names[i] for i in rows], list(class_names))
            best, which = sims.max(dim=1)
            for r, i in enumerate(rows):
                if best[r] >= class_similarity:
                    drop(i, f"similarity {best[r]:.2f} to class {class_names[which[r]]!r}")
    if mutual_similarity is not None and len(alive()) > 1:
        _drop_near_duplicates(bank, alive(), encoder, mutual_similarity, drop)
    if embeddings is not None and min_activation is not None:
        sims = bank.similarity(embeddings)
        top = sims.topk(min(top_k, sims.shape[0]), dim=0).values.mean(0)
        for i in alive():
            if top[i] <= min_activation:
                drop(i, f"top-{top_k} activation {top[i]:.3f} <= {min_activation}")
    if not keep.any():
        raise EmptyConceptBankError(
            f"all {len(bank)} concepts were filtered out ({_summary(dropped)}); loosen "
            f"max_length, class_similarity, mutual_similarity or min_activation"
        )
    kept = bank.keep(keep)
    kept.metadata["filtered_out"] = len(dropped)
    return kept, FilterReport(kept.names, dropped)


def _drop_near_duplicates(
    bank: ConceptBank,
    rows: list[int],
    encoder: TextEncoder | Sequence[tuple[TextEncoder, float]] | None,
    cutoff: float,
    drop: Callable[[int, str], None],
) -> None:
    """The reference's ``filter_too_similar``: per similar pair, the less general phrase goes."""
    names = [bank.names[i] for i in rows]
    if encoder is not None:
        sims = text_similarity(encoder, names, names)
    else:
        unit = bank.normalized()[rows].double()
        sims = unit @ unit.T
    generality = sims.sum(dim=1)
    gone: set[int] = set()
    for a, b in torch.nonzero(sims >= cutoff).tolist():
        if a == b or a in gone or b in gone:
            continue
        loser, winner = (a, b) if generality[a] < generality[b] else (b, a)
        gone.add(loser)
        drop(rows[loser], f"similarity {sims[a, b]:.2f} to {names[winner]!r}")


def _summary(dropped: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for reason in dropped.values():
        kind = reason.split(" ")[0]
        counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{n} by {kind}" for kind, n in counts.items())
