"""Registry of dictionary architectures by name, in the style of timm's ``register_model``."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from lightning_interp.errors import UnknownArchitectureError

if TYPE_CHECKING:
    from lightning_interp.dictionaries.base import Dictionary

_REGISTRY: dict[str, type[Dictionary]] = {}

D = TypeVar("D", bound="type[Dictionary]")


def register_dictionary(name: str) -> Callable[[D], D]:
    """Class decorator registering a :class:`Dictionary` subclass under ``name``.

    The name is what ``config.json`` stores as ``architecture`` and what
    :func:`create_dictionary` accepts.

    Example:
        >>> from lightning_interp.dictionaries import Dictionary, register_dictionary
        >>> @register_dictionary("my_sae")  # doctest: +SKIP
        ... class MySAE(Dictionary): ...
    """

    def decorate(cls: D) -> D:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"architecture {name!r} is already registered by {_REGISTRY[name]}")
        cls.architecture = name
        cls.config_class.architecture = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def list_architectures() -> list[str]:
    """Return the registered architecture names, sorted."""
    return sorted(_REGISTRY)


def get_dictionary_class(name: str) -> type[Dictionary]:
    """Return the class registered under ``name``.

    Raises:
        UnknownArchitectureError: naming the registered architectures and the closest match.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), _REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownArchitectureError(
            f"unknown dictionary architecture {name!r}; registered: {list_architectures()}.{hint}"
        ) from None


def create_dictionary(architecture: str, **config: Any) -> Dictionary:
    """Build a freshly initialised dictionary of a registered architecture.

    Args:
        architecture: A registered name such as ``"topk"``.
        **config: Fields of that architecture's config dataclass (``d_in``, ``d_latent``, ...).

    Returns:
        The new dictionary.

    Example:
        >>> from lightning_interp import create_dictionary
        >>> sae = create_dictionary("topk", d_in=16, d_latent=64, k=4)
        >>> sae.config.k
        4
    """
    cls = get_dictionary_class(architecture)
    return cls(cls.config_class.from_dict(config))
