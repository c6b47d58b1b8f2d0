"""Registry of dictionary architectures by name, in the style of timm's ``register_model``."""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from lightning_interp.errors import ConfigTypeError, UnknownArchitectureError

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
    if not isinstance(name, str):
        raise ConfigTypeError(
            f"architecture must be a string naming a registered architecture, got "
            f"{name!r:.60} (a {type(name).__name__}); use one of {list_architectures()}"
        )
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), _REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownArchitectureError(
            f"unknown dictionary architecture {name!r}; registered: {list_architectures()}.{hint}"
        ) from None


def class_paths(cls: type) -> list[str]:
    """The dotted paths under which a registered class may be named in a ``class_path``.

    Its defining module's path, and each already-imported parent package that exposes the
    very same class (``lightning_interp.dictionaries.TopKSAE``, as recipes write it). No
    module is imported to find them.
    """
    parts = cls.__module__.split(".")
    paths = [f"{cls.__module__}.{cls.__qualname__}"]
    for end in range(len(parts) - 1, 0, -1):
        package = ".".join(parts[:end])
        if getattr(sys.modules.get(package), cls.__qualname__, None) is cls:
            paths.append(f"{package}.{cls.__qualname__}")
    return paths


def dictionary_class_from_path(class_path: str) -> type[Dictionary]:
    """The registered class a checkpoint's or a config's ``class_path`` names.

    Only registered classes are candidates, and nothing is imported: a ``class_path`` read
    from a checkpoint cannot make this process import (and so run) an arbitrary module.
    A user's own architecture is found once the module that registers it has been imported.

    Raises:
        ConfigTypeError: ``class_path`` is not a string.
        UnknownArchitectureError: no registered class has that path, listing those that do.
    """
    if not isinstance(class_path, str):
        raise ConfigTypeError(
            f"class_path must be a dotted class name such as "
            f"'lightning_interp.dictionaries.TopKSAE', got {class_path!r:.60} "
            f"(a {type(class_path).__name__})"
        )
    for cls in _REGISTRY.values():
        if class_path in class_paths(cls):
            return cls
    known = sorted(min(class_paths(cls), key=len) for cls in _REGISTRY.values())
    raise UnknownArchitectureError(
        f"class_path {class_path!r:.120} is not a registered dictionary class; registered: "
        f"{known}. Classes are looked up in the registry, never imported from a config: "
        f"import the module that registers yours (@register_dictionary) first"
    )


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
