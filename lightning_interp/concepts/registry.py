"""Registry of concept-head types by name, shaped like the dictionary registry.

``@register_head("pcbm")`` makes a head class loadable from a saved ``config.json`` and
buildable by name (:func:`create_head`, ``ConceptBottleneckModule(head_name=...)``), as
``@register_dictionary`` does for dictionaries (and timm's ``register_model`` for models).
Each head carries a typed config dataclass (``config_class``, a
:class:`~lightning_interp.concepts.config.HeadConfig`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from lightning_interp.errors import ConfigError, UnknownArchitectureError

if TYPE_CHECKING:
    from lightning_interp.concepts.bank import ConceptBank
    from lightning_interp.concepts.base import ConceptHead

_HEADS: dict[str, type[ConceptHead]] = {}

H = TypeVar("H", bound="type[ConceptHead]")


def register_head(name: str) -> Callable[[H], H]:
    """Class decorator: register a :class:`ConceptHead` subclass as ``name``.

    The name is what ``config.json`` stores as ``head_type`` and what :func:`create_head`
    accepts.

    Example:
        >>> from lightning_interp.concepts import ConceptHead, register_head
        >>> @register_head("my_head")  # doctest: +SKIP
        ... class MyHead(ConceptHead): ...
    """

    def decorate(cls: H) -> H:
        if name in _HEADS and _qualified(_HEADS[name]) != _qualified(cls):
            raise ValueError(f"concept head {name!r} is already registered by {_HEADS[name]}")
        cls.head_type = name
        _HEADS[name] = cls
        return cls

    return decorate


def _qualified(cls: type) -> str:
    # Reloading a module re-registers the same class: only another class is a clash.
    return f"{cls.__module__}.{cls.__qualname__}"


def list_heads() -> list[str]:
    """Return the registered head types, sorted."""
    return sorted(_HEADS)


def head_class(name: str) -> type[ConceptHead]:
    """The head class registered as ``name``.

    Raises:
        UnknownArchitectureError: naming the registered heads and the closest match.
    """
    if name not in _HEADS:
        close = difflib.get_close_matches(str(name), _HEADS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownArchitectureError(
            f"no concept head named {name!r}; known: {list_heads()} (import the module "
            f"that registers a custom head before loading it).{hint}"
        )
    return _HEADS[name]


def builds_from_bank(cls: type[ConceptHead]) -> bool:
    """Whether the head reads a concept bank's directions (it has a ``from_bank`` builder).

    PCBM and the label-free CBM do; heads that learn their concepts take names and a width.
    """
    return getattr(cls, "from_bank", None) is not None


def create_head(
    name: str,
    *,
    class_names: Sequence[str],
    bank: ConceptBank | None = None,
    d_in: int | None = None,
    concept_names: Sequence[str] | None = None,
    **options: Any,
) -> ConceptHead:
    """A freshly initialised head of registered type ``name``.

    Heads with a ``from_bank`` builder (PCBM, label-free CBM) take ``bank``'s vectors; the
    others (supervised CBM, concept transformer, concept slots) take a width and concept
    names: ``d_in`` and ``concept_names``, or the bank's.

    Args:
        name: A registered head type (:func:`list_heads`).
        class_names: Class names, in order.
        bank: The concept bank (required by heads built from one).
        d_in: Embedding width (default: the bank's).
        concept_names: Concept names (default: the bank's).
        **options: Fields of the head's config dataclass (``head_class(name).config_class``).

    Raises:
        UnknownArchitectureError: no head is registered as ``name``.
        ConfigError: unknown or invalid options, or neither a bank nor a width and names.

    Example:
        >>> from lightning_interp.concepts import create_head
        >>> head = create_head("supervised_cbm", class_names=["a", "b"], d_in=8,
        ...                    concept_names=["x", "y"], bottleneck="hard")
        >>> head.config.bottleneck
        'hard'
    """
    cls = head_class(name)
    config = cls.config_class.from_dict(options, where=f"the {name} options")
    if builds_from_bank(cls):
        if bank is None:
            raise ConfigError(
                f"a {name} head is built over a concept bank's directions: pass bank="
            )
        return cls.from_bank(bank, list(class_names), config=config)
    width = d_in if d_in is not None else (bank.width if bank is not None else None)
    names = concept_names if concept_names is not None else (bank.names if bank else None)
    if width is None or names is None:
        raise ConfigError(
            f"a {name} head needs its input width and concept names: pass d_in= and "
            f"concept_names=, or bank="
        )
    return cls(width, list(names), list(class_names), config=config)
