"""The Markdown a head contributes to its model card (rendered by :mod:`lightning_interp.zoo`).

Each head describes its own "Classes and their concepts" section
(:meth:`ConceptHead.card_class_table <lightning_interp.concepts.ConceptHead.card_class_table>`),
so the card builder never asks which class a head is. The default is the table of each
class's strongest final-layer weights, below.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from lightning_interp.concepts.explain import top_concepts_per_class

if TYPE_CHECKING:
    from lightning_interp.concepts.base import ConceptHead


def markdown_cell(text: str) -> str:
    """``text`` made safe inside a Markdown table cell (a ``|`` would split the cell)."""
    return text.replace("|", "\\|")


def class_weight_table(head: ConceptHead, k: int) -> str:
    """One row per class: its ``k`` concepts with the largest positive final-layer weights.

    A head without a single linear concept-to-class layer gets a sentence saying so.
    """
    if head.final is None:
        return (
            f"This {type(head).__name__} has no single linear concept-to-class layer (a "
            "non-linear label predictor, or attention over concepts), so there is no "
            "class-concept weight table.\n"
        )
    k = min(k, head.num_concepts)
    top = top_concepts_per_class(head, k=k)
    lines = ["| class | " + " | ".join(f"#{i}" for i in range(1, k + 1)) + " |"]
    lines.append("|---|" + "---|" * k)
    for class_name, concepts in top.items():
        cells = [f"{markdown_cell(name)} ({weight:+.3g})" for name, weight in concepts]
        cells += ["–"] * (k - len(cells))
        lines.append(f"| {markdown_cell(class_name)} | " + " | ".join(cells) + " |")
    weight = head.final.weight.detach()
    nonzero = int((weight != 0).sum())
    intro = (
        f"Each class's {k} concepts with the largest positive weights in the final linear "
        f"layer (concept -> class); {nonzero} of {weight.numel()} weights are non-zero.\n\n"
    )
    return intro + "\n".join(lines) + "\n"


def descriptor_table(descriptors: Mapping[str, Sequence[str]]) -> str:
    """One row per class: the descriptors whose mean similarity scores it."""
    lines = ["| class | descriptors |", "|---|---|"]
    for class_name, items in descriptors.items():
        lines.append(f"| {markdown_cell(class_name)} | {markdown_cell('; '.join(items))} |")
    intro = (
        "A class's score is the mean similarity of an embedding to its descriptors "
        "(there is no learned weight):\n\n"
    )
    return intro + "\n".join(lines) + "\n"
