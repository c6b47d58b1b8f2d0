"""Base class of concept-bottleneck heads: outputs, a typed config, save/load by name."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_interp._weights import check_tensors, write_weights_and_config
from lightning_interp.concepts._storage import HEAD_FORMAT, read_saved_folder
from lightning_interp.concepts.bank import unknown_concept
from lightning_interp.concepts.config import HeadConfig
from lightning_interp.concepts.registry import head_class
from lightning_interp.concepts.registry import register_head as register_head  # old home
from lightning_interp.errors import ConfigError, CorruptFileError, ShapeMismatchError

HEAD_CONFIG = "config.json"
HEAD_WEIGHTS = "model.safetensors"


@dataclass
class HeadOutput:
    """What a head returns.

    Attributes:
        logits: Class scores ``[b, classes]``.
        concepts: The bottleneck ``[b, concepts]`` the final layer reads (probabilities,
            margins or standardised activations, by head).
        concept_logits: Pre-sigmoid concept predictions where concepts are predicted.
        attention: The head's attention explanation: concept attention ``[b, concepts]``
            (softmax over concepts) of the concept transformer, concept-to-token
            attention ``[b, concepts, tokens]`` of the concept-slot head.
        token_attention: Where in the input a head looked, ``[b, tokens]`` (the concept
            transformer's token pooling weights).
    """

    logits: Tensor
    concepts: Tensor
    concept_logits: Tensor | None = None
    attention: Tensor | None = None
    token_attention: Tensor | None = None


class ConceptHead(nn.Module):
    """A head over frozen embeddings whose decision goes through named concepts.

    Subclasses declare their options as a :class:`~lightning_interp.concepts.config.HeadConfig`
    dataclass (``config_class``; ``self.config`` holds the instance), create their layers in
    :meth:`build_layers` and implement :meth:`forward` and :meth:`training_loss`. Heads
    with a final linear layer over the concepts expose it as :attr:`final` so explanations
    and edits work on every head alike. What a head shows on its model card comes from the
    head too (:attr:`reads_tokens`, :attr:`learns_concepts`, :meth:`card_class_table`).

    Args:
        d_in: Width of the embeddings the head reads.
        concept_names: Names of the bottleneck units, in order.
        class_names: Names of the classes, in order.
        config: The head's options as its ``config_class`` (or a mapping of them).
        **options: The options as keywords instead (not together with ``config``).
    """

    head_type: ClassVar[str] = ""
    config_class: ClassVar[type[HeadConfig]] = HeadConfig
    #: Whether the head reads token embeddings ``[b, tokens, d_in]`` (with a padding mask)
    #: rather than one pooled embedding ``[b, d_in]`` per input.
    reads_tokens: ClassVar[bool] = False
    #: Whether its concepts are predicted (learned from concept labels) rather than read
    #: off fixed directions such as a concept bank's.
    learns_concepts: ClassVar[bool] = False
    # A closed-form part fitted on all training rows (fit_full_data): "before" the optimizer
    # trains the rest (PCBM's elastic-net layer) or "after" (label-free CBM's sparse layer).
    full_data_fit: ClassVar[str | None] = None
    # Whether that fit selects on the validation rows (fit_full_data's ``val``).
    full_data_fit_reads_val: ClassVar[bool] = False

    def __init__(
        self,
        d_in: int,
        concept_names: Sequence[str],
        class_names: Sequence[str],
        config: HeadConfig | Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        if d_in <= 0:
            raise ConfigError(f"d_in must be positive, got {d_in}")
        if len(class_names) < 2:
            raise ConfigError(f"a classifier needs at least two class names, got {class_names}")
        self.d_in = int(d_in)
        self.concept_names = [str(n) for n in concept_names]
        self.class_names = [str(n) for n in class_names]
        self.config = self._make_config(config, options)
        # Where the head came from (backbone, dataset; Hub repo and commit once loaded).
        self.provenance: dict[str, Any] = {}
        self.build_layers()

    def _make_config(
        self, config: HeadConfig | Mapping[str, Any] | None, options: dict[str, Any]
    ) -> HeadConfig:
        if config is not None and options:
            raise ConfigError(
                f"{type(self).__name__} takes its options as config= or as keywords, not "
                f"both; got config and {sorted(options)}"
            )
        if isinstance(config, self.config_class):
            return config
        # The dataclass constructor refuses an unknown option with a TypeError, as any
        # Python constructor does (a saved config naming one is reported as corrupt).
        return self.config_class(**dict(config or options))

    def build_layers(self) -> None:
        """Create the head's layers and buffers from ``d_in``, the names and ``self.config``.

        Called once by the constructor (the template every head fills in, so none repeats
        the constructor's signature); raise ``ConfigError`` for options that do not fit
        the width or the names.
        """

    # ------------------------------------------------------------------ interface
    @property
    def num_concepts(self) -> int:
        """Number of bottleneck units."""
        return len(self.concept_names)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    @property
    def final(self) -> nn.Linear | None:
        """The linear layer from concepts to classes (``None`` if the head has none)."""
        return None

    def check_input(self, x: Tensor) -> None:
        """Raise :class:`ShapeMismatchError` if ``x``'s last dimension is not ``d_in``."""
        if x.shape[-1] != self.d_in:
            raise ShapeMismatchError(
                f"{type(self).__name__} reads embeddings of width {self.d_in}, got "
                f"{x.shape[-1]} (shape {tuple(x.shape)}); embed with the backbone and pooling "
                f"the head was built for"
            )

    def concept_index(self, name: str) -> int:
        """Position of concept ``name``; :class:`UnknownConceptError` names the options."""
        if name not in self.concept_names:
            raise unknown_concept(
                name, self.concept_names, type(self).__name__, "head.concept_names"
            )
        return self.concept_names.index(name)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> HeadOutput:
        """Class logits and concept activations for embeddings ``x``."""
        raise NotImplementedError

    def training_loss(
        self, x: Tensor, y: Tensor, concepts: Tensor | None, *, epoch: int, mask: Tensor | None
    ) -> dict[str, Tensor | None]:
        """Loss terms for one batch; ``"loss"`` is minimised (``None``: nothing to train).

        The other terms are logged under ``train/``.
        """
        raise NotImplementedError

    def card_class_table(self, k: int = 5) -> str:
        """Markdown of the model card's "Classes and their concepts" section.

        By default each class's ``k`` concepts with the largest final-layer weights, or a
        sentence saying why there is no such table; heads whose classes are read otherwise
        (classification by description) override it.
        """
        from lightning_interp.concepts.card import class_weight_table

        return class_weight_table(self, k)

    def fit_full_data(
        self, x: Tensor, y: Tensor, val: tuple[Tensor, Tensor] | None = None
    ) -> dict[str, Any]:
        """Closed-form fit on all training rows (heads with ``full_data_fit``).

        Args:
            x: All training embeddings.
            y: Their labels.
            val: All validation embeddings and labels, for heads that select on held-out
                rows (``None``: there are none).

        Returns:
            A report (floats and strings) of what was fitted.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ old saves
    @classmethod
    def upgrade_spec(cls, spec: dict[str, Any]) -> dict[str, Any]:
        """A saved spec (``config.json``) as this version reads it (default: unchanged).

        Heads whose constructor changed map old configs here, so heads saved by earlier
        versions (folders, Hub repos, checkpoints) keep loading. Returning another
        ``head_type`` hands the spec to that head.
        """
        return spec

    @classmethod
    def upgrade_state(cls, tensors: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
        """Saved tensors (keys under ``prefix``) as this version reads them (default: same)."""
        return tensors

    # ------------------------------------------------------------------ storage
    def head_spec(self) -> dict[str, Any]:
        """What rebuilds this head's shell: type, width, names and constructor config.

        This is the content of ``config.json`` (plain JSON types only), also stored in
        Lightning checkpoints so a head built at fit time can be rebuilt when loading.
        """
        spec: dict[str, Any] = {
            "format": HEAD_FORMAT,
            "head_type": self.head_type,
            "d_in": self.d_in,
            "concept_names": list(self.concept_names),
            "class_names": list(self.class_names),
            "config": dict(self.config),
        }
        if self.provenance:
            spec["provenance"] = dict(self.provenance)
        return spec

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``config.json`` (type, config, concept and class names) + ``model.safetensors``."""
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        metadata = {"format": "pt", "head_type": self.head_type}
        text = json.dumps(self.head_spec(), indent=2) + "\n"
        return write_weights_and_config(
            Path(directory),
            tensors,
            text,
            weights_name=HEAD_WEIGHTS,
            config_name=HEAD_CONFIG,
            metadata=metadata,
        )

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike[str],
        *,
        revision: str | None = None,
        subfolder: str | None = None,
        device: str | torch.device | None = None,
        token: str | bool | None = None,
    ) -> ConceptHead:
        """Load a head from a folder written by :meth:`save_pretrained`, or from the Hub.

        Args:
            source: A local folder, or a Hub repo id (``"org/name"``) the head was pushed to
                with :meth:`push_to_hub`.
            revision: Hub branch, tag or commit sha.
            subfolder: Folder inside the source that holds the head.
            device: Device for the weights (default CPU).
            token: Hub token (default: the logged-in one).

        Returns:
            The head in eval mode (any registered head type, if called on
            :class:`ConceptHead`; otherwise it must be an instance of ``cls``).
        """
        from lightning_interp.zoo.heads import load_head

        head = load_head(source, revision=revision, subfolder=subfolder, device=device, token=token)
        if not isinstance(head, cls):
            raise ConfigError(
                f"{source} holds a {type(head).__name__}, not a {cls.__name__}; load it with "
                f"ConceptHead.from_pretrained"
            )
        return head

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool = False,
        revision: str | None = None,
        token: str | bool | None = None,
        card_data: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        commit_message: str | None = None,
    ) -> Any:
        """Publish this head to a Hub repo as one commit, with a model card.

        Args:
            repo_id: Target repo ``org/name`` (created if missing).
            private: Create the repo private.
            revision: Branch to commit to (created if missing).
            token: Hub token (default: the logged-in one).
            card_data: Card metadata overriding the generated fields (``license``,
                ``base_model``, ``datasets``, ...).
            metrics: Evaluation results (``accuracy``, ``concept_accuracy``,
                ``concept_auroc``, ``final_layer_sparsity``), written as ``metrics.json``
                and shown in the card's ``model-index``.
            commit_message: Commit message.

        Returns:
            A :class:`~lightning_interp.zoo.PublishResult` (repo id, commit sha, URL).
        """
        # The zoo is reached lazily: heads stay usable without huggingface_hub.
        from lightning_interp.zoo.heads import push_head

        return push_head(
            self,
            repo_id,
            private=private,
            revision=revision,
            token=token,
            card_data=card_data,
            metrics=metrics,
            commit_message=commit_message,
        )


def build_head(spec: Mapping[str, Any], where: str = "the head config") -> ConceptHead:
    """An untrained head of the shape ``spec`` (a :meth:`ConceptHead.head_spec`) describes."""
    if spec.get("format") != HEAD_FORMAT:
        raise CorruptFileError(
            f"{where} is not a {HEAD_FORMAT} config (a dictionary's config.json has the same "
            f"name: load dictionaries with load_dictionary)"
        )
    try:
        head_cls = head_class(spec["head_type"])
        spec = head_cls.upgrade_spec(dict(spec))
        head_cls = head_class(spec["head_type"])  # an old spec may name another head now
        head = head_cls(
            spec["d_in"], spec["concept_names"], spec["class_names"], **spec.get("config", {})
        )
    except (KeyError, TypeError) as error:
        raise CorruptFileError(f"{where} does not describe a concept head: {error!r}") from None
    head.provenance = dict(spec.get("provenance") or {})
    return head


def is_head_folder(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` holds a head written by :meth:`ConceptHead.save_pretrained`.

    Heads and native dictionaries share file names, so the ``format`` field decides.
    """
    config_path = Path(directory) / HEAD_CONFIG
    if not (config_path.is_file() and (Path(directory) / HEAD_WEIGHTS).is_file()):
        return False
    try:
        saved = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(saved, dict) and saved.get("format") == HEAD_FORMAT


def load_head_folder(directory: str | os.PathLike[str]) -> ConceptHead:
    """Load the head in a local folder written by :meth:`ConceptHead.save_pretrained`."""
    folder = Path(directory)
    config_path, saved, tensors = read_saved_folder(
        folder,
        HEAD_CONFIG,
        HEAD_WEIGHTS,
        what="concept head",
        hint="write a head there with head.save_pretrained",
    )
    if not isinstance(saved, dict):
        raise CorruptFileError(f"{config_path} is not a {HEAD_FORMAT} config")
    head = build_head(saved, str(config_path))
    _load_exact(head, tensors, folder)
    return head.eval()


def _load_exact(head: ConceptHead, tensors: Mapping[str, Tensor], folder: Path) -> None:
    tensors = head.upgrade_state(dict(tensors))
    expected = head.state_dict()
    shapes = {name: tuple(value.shape) for name, value in expected.items()}
    check_tensors(shapes, tensors, folder / HEAD_WEIGHTS)
    head.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()})
