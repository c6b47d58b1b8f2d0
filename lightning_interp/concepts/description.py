"""Classification by description (Menon & Vondrick, ICLR 2023): zero-shot, no training.

Each class has descriptor phrases ("a long neck", "has spots", "four legs"); each is
embedded as a sentence built by the reference's rule (``sachit-menon/classify_by_descriptions``,
``descriptor_strings.py``: ``make_descriptor_sentence``, with the class name prepended and
``", "`` between; see :func:`descriptor_sentence`), and a class's score is the mean cosine
similarity of an embedding to its descriptors. The descriptors are the explanation, and
editing them (adding, removing, rewording) changes the classifier at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_interp.concepts.base import ConceptHead, HeadOutput
from lightning_interp.concepts.card import descriptor_table
from lightning_interp.concepts.config import HeadConfig
from lightning_interp.concepts.registry import register_head
from lightning_interp.errors import ConfigError

SEPARATOR = ": "
# Descriptor openings the reference keeps after "which" (descriptor_strings.py).
_VERB_OPENINGS = ("has", "often", "typically", "may", "can")


def descriptor_sentence(class_name: str, descriptor: str) -> str:
    """The text the reference embeds for one descriptor of a class.

    ``"{class}, which is {d}"`` for a descriptor starting with "a" (the reference tests
    the first letter, so "antlers" too) or "used"; ``"{class}, which {d}"`` for one
    starting with has / often / typically / may / can; ``"{class}, which has {d}"``
    otherwise. Underscores in the class name become spaces (the reference's ``wordify``).

    Example:
        >>> descriptor_sentence("tree_frog", "bright green skin")
        'tree frog, which has bright green skin'
        >>> descriptor_sentence("zebra", "a striped coat"), descriptor_sentence("owl", "can fly")
        ('zebra, which is a striped coat', 'owl, which can fly')
    """
    if descriptor.startswith("a") or descriptor.startswith("used"):
        clause = f"which is {descriptor}"
    elif descriptor.startswith(_VERB_OPENINGS):
        clause = f"which {descriptor}"
    else:
        clause = f"which has {descriptor}"
    return f"{class_name.replace('_', ' ')}, {clause}"


def descriptor_name(class_name: str, descriptor: str) -> str:
    """The concept name of one class's descriptor, ``"class: descriptor"``."""
    return f"{class_name}{SEPARATOR}{descriptor}"


@dataclass
class DescriptionClassifierConfig(HeadConfig):
    """Options of :class:`DescriptionClassifier` (described there)."""

    template: str | None = None
    scale: float = 100.0


@register_head("description")
class DescriptionClassifier(ConceptHead):
    """Zero-shot classifier scoring classes by their descriptors.

    Build it with :meth:`from_descriptors`; the constructor makes an empty shell of the
    right shapes (used when loading).

    Args:
        d_in: Embedding width.
        concept_names: ``"class: descriptor"`` names, grouped by class.
        class_names: Class names.
        config: The options below as a :class:`DescriptionClassifierConfig` (or give them
            as keywords).
        template: ``None`` (default): descriptors are phrased by the reference's rule,
            :func:`descriptor_sentence`; else a format string with ``{class_name}`` and
            ``{descriptor}``.
        scale: Multiplier of the mean similarities (a softmax temperature; CLIP uses 100).

    Example:
        >>> encode = lambda texts: torch.stack([torch.tensor([float("zebra" in t),
        ...     float("stripe" in t), float("horse" in t)]) for t in texts])
        >>> head = DescriptionClassifier.from_descriptors(
        ...     {"zebra": ["has stripes"], "horse": ["has a mane"]}, encode)
        >>> head(torch.tensor([[1.0, 1.0, 0.0]])).logits.argmax(-1).item()
        0
    """

    config_class = DescriptionClassifierConfig
    config: DescriptionClassifierConfig

    def build_layers(self) -> None:
        """Which class owns each descriptor, and the descriptor vectors (filled by a builder)."""
        d_in = self.d_in
        owners = []
        for name in self.concept_names:
            owner = name.split(SEPARATOR, 1)[0]
            if owner not in self.class_names:
                raise ConfigError(
                    f"descriptor {name!r} names no class; name descriptors 'class: phrase'"
                )
            owners.append(self.class_names.index(owner))
        missing = set(range(self.num_classes)) - set(owners)
        if missing:
            names = [self.class_names[i] for i in sorted(missing)]
            raise ConfigError(f"classes {names} have no descriptors; give each class at least one")
        self.register_buffer("descriptor_class", torch.tensor(owners, dtype=torch.long))
        self.register_buffer("descriptor_vectors", torch.zeros(len(owners), d_in))

    @classmethod
    def from_descriptors(
        cls,
        descriptors: Mapping[str, Sequence[str]],
        encoder: Callable[[Sequence[str]], Tensor],
        **kwargs,
    ) -> DescriptionClassifier:
        """Embed every class's descriptors with ``encoder`` (texts -> ``[n, d]``)."""
        class_names = list(descriptors)
        config = kwargs.get("config")
        template = (config if config is not None else kwargs).get("template")
        names, phrases = [], []
        for class_name, items in descriptors.items():
            for descriptor in items:
                names.append(descriptor_name(class_name, descriptor))
                if template is None:
                    phrases.append(descriptor_sentence(class_name, descriptor))
                else:
                    phrases.append(template.format(class_name=class_name, descriptor=descriptor))
        with torch.no_grad():
            vectors = encoder(phrases)
        head = cls(vectors.shape[1], names, class_names, **kwargs)
        head.descriptor_vectors.copy_(torch.nn.functional.normalize(vectors.float(), dim=-1))
        head._encoder = encoder
        return head

    def descriptors(self) -> dict[str, list[str]]:
        """``{class: [descriptor, ...]}`` as currently used."""
        out: dict[str, list[str]] = {c: [] for c in self.class_names}
        for name in self.concept_names:
            owner, descriptor = name.split(SEPARATOR, 1)
            out[owner].append(descriptor)
        return out

    def edit(
        self,
        descriptors: Mapping[str, Sequence[str]],
        encoder: Callable[[Sequence[str]], Tensor] | None = None,
    ) -> DescriptionClassifier:
        """A classifier with some classes' descriptor lists replaced (others kept)."""
        encoder = encoder or getattr(self, "_encoder", None)
        if encoder is None:
            raise ConfigError("editing descriptors needs the text encoder: pass encoder=")
        unknown = sorted(set(descriptors) - set(self.class_names))
        if unknown:
            raise ConfigError(f"unknown classes {unknown}; classes: {self.class_names}")
        merged = {**self.descriptors(), **{k: list(v) for k, v in descriptors.items()}}
        return type(self).from_descriptors(merged, encoder, **self.config)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> HeadOutput:
        """Class scores: scaled mean similarity to each class's descriptors."""
        self.check_input(x)
        unit = torch.nn.functional.normalize(x.float(), dim=-1)
        sims = (unit @ self.descriptor_vectors.float().T).float()  # autocast may give bf16
        sums = torch.zeros(x.shape[0], self.num_classes, device=x.device)
        sums.index_add_(1, self.descriptor_class, sims)
        counts = torch.bincount(self.descriptor_class, minlength=self.num_classes)
        return HeadOutput(self.config.scale * sums / counts.to(sums.dtype), sims)

    def card_class_table(self, k: int = 5) -> str:
        """The descriptors of each class (they score it; there is no weight to rank)."""
        return descriptor_table(self.descriptors())

    def training_loss(self, *args, **kwargs) -> dict[str, Tensor]:
        """Not trainable: classification by description is zero-shot."""
        raise ConfigError(
            "DescriptionClassifier has nothing to train; use trainer.validate/test, or edit "
            "its descriptors"
        )
