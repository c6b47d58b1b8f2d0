"""The one table the registry-driven head tests read: small options per head, odd builders.

Every head in ``list_heads()`` is built by :func:`example_head` and exercised by the generic
tests (tests/concepts/test_head_registry.py, the shared tests of test_heads.py). A new head
built by ``create_head`` with its defaults needs no entry here; add one only for options that
make the test smaller or cover more (``SMALL``), or for a head ``create_head`` cannot build
from a concept bank (``BUILDERS``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lightning_interp.concepts import ConceptHead, DescriptionClassifier, create_head
from tests.concepts.planted import CLASSES, planted

D = 32  # the width of planted() embeddings

#: Options per head type: small sizes, and the variant with the most parts to test.
SMALL: dict[str, dict] = {
    "supervised_cbm": {"concept_hidden": 8},  # a non-linear concept predictor
    "pcbm": {"hybrid": True},  # PCBM-h: the residual layer too
    "label_free_cbm": {"cutoff": 0.0},
    "concept_transformer": {"heads": 2},
    "concept_slots": {"d_attn": 8, "heads": 2},
}

#: Descriptor lists of the planted problem's classes (concept_0 and concept_1 decide).
DESCRIPTORS = {
    "neither": ["lacks concept_0", "lacks concept_1"],
    "only_b": ["lacks concept_0", "has concept_1"],
    "only_a": ["has concept_0", "lacks concept_1"],
    "both": ["has concept_0", "has concept_1"],
}


def descriptor_encoder(directions: torch.Tensor) -> Callable[[list[str]], torch.Tensor]:
    """A text encoder mapping "has/lacks concept_j" phrases onto +/- planted direction j."""

    def encode(texts):
        rows = []
        for text in texts:
            v = torch.zeros(directions.shape[1])
            for j in range(len(directions)):
                if f"has concept_{j}" in text:
                    v += directions[j]
                if f"lacks concept_{j}" in text:
                    v -= directions[j]
            rows.append(v)
        return torch.stack(rows)

    return encode


#: Heads that are not built over a concept bank's names or directions.
BUILDERS: dict[str, Callable[..., ConceptHead]] = {
    "description": lambda **options: DescriptionClassifier.from_descriptors(
        DESCRIPTORS, descriptor_encoder(torch.randn(6, D)), **options
    ),
}


def example_head(name: str) -> ConceptHead:
    """A small head of registered type ``name`` over the planted problem's concepts."""
    options = SMALL.get(name, {})
    if name in BUILDERS:
        return BUILDERS[name](**options)
    bank = planted().bank(distractors=2)
    return create_head(name, class_names=CLASSES, bank=bank, **options)


def example_inputs(
    head: ConceptHead, n: int = 16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings (tokens if the head reads them), labels and concept labels for ``head``."""
    x = torch.randn(n, 5, head.d_in) if head.reads_tokens else torch.randn(n, head.d_in)
    concepts = (torch.rand(n, head.num_concepts) > 0.5).float()
    return x, torch.randint(0, head.num_classes, (n,)), concepts


def zero_shot(head: ConceptHead) -> bool:
    """Whether the head has nothing to train or fit (classification by description)."""
    trainable = any(p.requires_grad for p in head.parameters())
    return not trainable and head.full_data_fit is None
