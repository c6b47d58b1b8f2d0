"""ConceptBank: named concept directions in a backbone's embedding space."""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_interp._weights import write_weights_and_config
from lightning_interp.concepts._storage import read_saved_folder
from lightning_interp.errors import (
    CorruptFileError,
    EmptyConceptBankError,
    ShapeMismatchError,
    UnknownConceptError,
)

BANK_CONFIG = "concepts.json"
BANK_WEIGHTS = "concepts.safetensors"
BANK_FORMAT = "lightning-interp-concept-bank"

TextEncoder = Callable[[Sequence[str]], Tensor]


def unknown_concept(
    name: str, names: Sequence[str], where: str, listing: str
) -> UnknownConceptError:
    """The error for a concept ``name`` absent from ``names``, with close matches if any.

    Args:
        name: The concept asked for.
        names: The concepts there are.
        where: What was searched (``"this bank of 12"``, ``"SupervisedCBM"``).
        listing: Where the user can list the names (``"bank.names"``).
    """
    close = difflib.get_close_matches(name, list(names), n=5, cutoff=0.6)
    return UnknownConceptError(
        f"no concept named {name!r} in {where}"
        + (f"; similar names: {close}" if close else f"; list them with {listing}")
    )


class ConceptBank:
    """Named concepts, each a direction ``[d]`` in an embedding space.

    Directions come from text phrases embedded by an encoder (:meth:`from_phrases`), from
    concept activation vectors learned on example sets (:meth:`from_examples`), or are
    given directly (learned predictors' weights). Names are unique; order is kept.

    A concept learned from examples is a boundary ``w . x + b = 0``: ``vectors`` holds ``w``
    and ``intercepts`` holds ``b``, and :meth:`margins` is the signed distance
    ``(w . x + b) / |w|`` that post-hoc CBMs read (as ``mertyg/post-hoc-cbm`` does). Text
    concepts have intercept 0.

    Args:
        names: Concept names (for text concepts, the phrase itself).
        vectors: Directions ``[len(names), d]``.
        sources: How each direction was made (``"text"``, ``"cav"``, ``"learned"``).
        metadata: Free JSON-serialisable facts (encoder, pooling, filters applied).
        intercepts: Boundary offsets ``[len(names)]`` on the scale of ``vectors``
            (default 0).

    Example:
        >>> bank = ConceptBank(["striped", "furry"], torch.eye(2, 4))
        >>> bank.index("furry"), bank.width
        (1, 4)
    """

    def __init__(
        self,
        names: Sequence[str],
        vectors: Tensor,
        sources: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        intercepts: Tensor | None = None,
    ) -> None:
        names = [str(n) for n in names]
        if not names:
            raise EmptyConceptBankError(
                "a concept bank needs at least one concept; give more phrases or loosen the "
                "filters (max_words, class_similarity, mutual_similarity, min_activation)"
            )
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise ShapeMismatchError(f"concept names must be unique; repeated: {dupes}")
        if vectors.ndim != 2 or vectors.shape[0] != len(names):
            raise ShapeMismatchError(
                f"vectors must be [n_concepts={len(names)}, d], got {tuple(vectors.shape)}"
            )
        if intercepts is None:
            intercepts = torch.zeros(len(names))
        if intercepts.shape != (len(names),):
            raise ShapeMismatchError(
                f"intercepts must be [n_concepts={len(names)}], got {tuple(intercepts.shape)}"
            )
        self.names = names
        self.vectors = vectors.detach().float().cpu().contiguous()
        self.intercepts = intercepts.detach().float().cpu().contiguous()
        self.sources = list(sources) if sources is not None else ["given"] * len(names)
        if len(self.sources) != len(names):
            raise ShapeMismatchError("sources must have one entry per concept")
        self.metadata = dict(metadata or {})
        self._index = {name: i for i, name in enumerate(names)}

    # ------------------------------------------------------------------ building
    @classmethod
    def from_phrases(
        cls, phrases: Iterable[str], encoder: TextEncoder, **metadata: Any
    ) -> ConceptBank:
        """Embed concept phrases with ``encoder`` (texts -> ``[n, d]``), one concept each.

        Args:
            phrases: Concept phrases; duplicates (after stripping) are dropped.
            encoder: E.g. :func:`lightning_interp.data.embed.text_encoder` of a CLIP text
                tower or a mean-pooled sentence encoder.
            **metadata: Stored with the bank.
        """
        unique = list(dict.fromkeys(p.strip() for p in phrases if p.strip()))
        if not unique:
            raise EmptyConceptBankError("no concept phrases given; pass a non-empty list")
        with torch.no_grad():
            vectors = encoder(unique)
        return cls(unique, vectors, ["text"] * len(unique), metadata)

    @classmethod
    def from_examples(
        cls,
        examples: Mapping[str, tuple[Tensor, Tensor]],
        method: str = "logistic",
        **kwargs: Any,
    ) -> ConceptBank:
        """Concept activation vectors (CAVs) from positive / negative embedding sets.

        Args:
            examples: ``{name: (positives [n+, d], negatives [n-, d])}``.
            method: ``"logistic"`` (torch) or ``"svm"`` (scikit-learn's LinearSVC).
            **kwargs: Passed to :func:`~lightning_interp.concepts.cav.learn_cav`.
        """
        from lightning_interp.concepts.cav import fit_cav

        names = list(examples)
        cavs = [fit_cav(pos, neg, method=method, **kwargs) for pos, neg in examples.values()]
        if not cavs:
            raise EmptyConceptBankError("no example sets given; pass {name: (pos, neg)}")
        vectors = torch.stack([cav.direction for cav in cavs])
        intercepts = torch.tensor([cav.intercept for cav in cavs])
        sources = ["cav"] * len(names)
        return cls(names, vectors, sources, {"cav_method": method}, intercepts)

    @classmethod
    def from_labels(
        cls,
        embeddings: Tensor,
        labels: Tensor,
        names: Sequence[str],
        method: str = "logistic",
        **kwargs: Any,
    ) -> ConceptBank:
        """Directions of learned predictors of annotated binary concepts.

        Args:
            embeddings: ``[n, d]``.
            labels: Concept annotations ``[n, len(names)]`` in {0, 1}.
            names: Concept names, one per label column.
            method: ``"logistic"`` or ``"svm"`` (see :meth:`from_examples`).
            **kwargs: Passed to the CAV learner.
        """
        if labels.shape != (embeddings.shape[0], len(names)):
            raise ShapeMismatchError(
                f"labels must be [n={embeddings.shape[0]}, concepts={len(names)}], got "
                f"{tuple(labels.shape)}"
            )
        on = labels.bool()
        examples = {
            name: (embeddings[on[:, j]], embeddings[~on[:, j]]) for j, name in enumerate(names)
        }
        bank = cls.from_examples(examples, method=method, **kwargs)
        bank.sources = ["learned"] * len(bank)
        return bank

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __repr__(self) -> str:
        return f"ConceptBank({len(self)} concepts, width {self.width})"

    @property
    def width(self) -> int:
        """Embedding width ``d`` of the directions."""
        return int(self.vectors.shape[1])

    def index(self, name: str) -> int:
        """Position of concept ``name``; raises :class:`UnknownConceptError` if absent."""
        try:
            return self._index[name]
        except KeyError:
            where = f"this bank of {len(self)}"
            raise unknown_concept(name, self.names, where, "bank.names") from None

    def select(self, names: Sequence[str]) -> ConceptBank:
        """A bank holding only ``names``, in that order."""
        rows = [self.index(n) for n in names]
        sources = [self.sources[i] for i in rows]
        return ConceptBank(
            list(names), self.vectors[rows], sources, self.metadata, self.intercepts[rows]
        )

    def keep(self, mask: Tensor | Sequence[bool]) -> ConceptBank:
        """A bank holding the concepts where ``mask`` is true."""
        keep = [i for i, flag in enumerate(torch.as_tensor(mask).tolist()) if flag]
        return self.select([self.names[i] for i in keep])

    def normalized(self) -> Tensor:
        """Unit-norm directions ``[n, d]`` (float32)."""
        return torch.nn.functional.normalize(self.vectors, dim=-1)

    def normalized_intercepts(self) -> Tensor:
        """Intercepts on the scale of :meth:`normalized`, ``b / |w|`` ``[n]``."""
        return self.intercepts / self.vectors.norm(dim=-1).clamp_min(1e-12)

    def margins(self, embeddings: Tensor) -> Tensor:
        """Signed distance of each embedding to each concept boundary, ``[..., n]``.

        ``(w . x + b) / |w|``: the PCBM concept margin (intercept included).
        """
        self.check_width(embeddings)
        x = embeddings.float()
        normal = self.normalized().to(x.device)
        return x @ normal.T + self.normalized_intercepts().to(x.device)

    def check_width(self, embeddings: Tensor) -> None:
        """Raise :class:`ShapeMismatchError` unless ``embeddings[..., d]`` match the bank."""
        if embeddings.shape[-1] != self.width:
            raise ShapeMismatchError(
                f"embeddings have width {embeddings.shape[-1]} but the concept bank was built "
                f"in a space of width {self.width}; embed inputs with the same backbone and "
                f"pooling as the concept phrases"
            )

    def similarity(self, embeddings: Tensor) -> Tensor:
        """Cosine similarity of each embedding to each concept, ``[..., n]``."""
        self.check_width(embeddings)
        x = torch.nn.functional.normalize(embeddings.float(), dim=-1)
        return x @ self.normalized().to(x.device).T

    # ------------------------------------------------------------------ storage
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``concepts.safetensors`` + ``concepts.json`` (names, sources) atomically."""
        config = {
            "format": BANK_FORMAT,
            "names": self.names,
            "sources": self.sources,
            "width": self.width,
            "metadata": self.metadata,
        }
        vectors = {"vectors": self.vectors, "intercepts": self.intercepts}
        text = json.dumps(config, indent=2) + "\n"
        return write_weights_and_config(
            Path(directory), vectors, text, weights_name=BANK_WEIGHTS, config_name=BANK_CONFIG
        )

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> ConceptBank:
        """Read a bank written by :meth:`save`."""
        folder = Path(directory)
        config_path, config, tensors = read_saved_folder(
            folder,
            BANK_CONFIG,
            BANK_WEIGHTS,
            what="concept bank",
            hint="save a bank there with ConceptBank.save",
        )
        try:
            vectors = tensors["vectors"]
        except KeyError as error:
            raise CorruptFileError(f"cannot read the concept bank in {folder}: {error}") from None
        if config.get("format") != BANK_FORMAT:
            raise CorruptFileError(f"{config_path} is not a {BANK_FORMAT} file")
        # Banks saved before intercepts were kept hold text or unit directions: intercept 0.
        intercepts = tensors.get("intercepts")
        try:
            return cls(
                config["names"], vectors, config.get("sources"), config.get("metadata"), intercepts
            )
        except (KeyError, ShapeMismatchError) as error:
            raise CorruptFileError(f"cannot read the concept bank in {folder}: {error}") from None
