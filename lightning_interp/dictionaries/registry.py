"""Registry of dictionary architectures by name, in the style of timm's ``register_model``."""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

from lightning_interp.errors import ConfigError, ConfigTypeError, UnknownArchitectureError

if TYPE_CHECKING:
    from lightning_interp.dictionaries.base import Dictionary

_REGISTRY: dict[str, type[Dictionary]] = {}


@dataclass(frozen=True)
class ArchitectureExample:
    """Small settings under which an architecture is known to train well.

    timm keeps each model's test settings (``test_input_size``...) in its pretrained config
    beside the model and drives its tests from ``list_models()``; this is the same idea.
    The test suite builds every registered architecture with ``kwargs``, so a new one is
    exercised by the generic save/load, bf16, skip-connection, scale-folding and training
    tests without a test edit, and must recover a planted dictionary within
    ``recovery_fvu`` (``tests/dictionaries/test_recovery.py``: 64 unit atoms in 32
    dimensions, about 3 active per row, learned with ``d_latent=128``).

    Attributes:
        kwargs: Config fields besides ``d_in`` and ``d_latent``, e.g. ``{"k": 4}``; they
            must also build with ``d_latent`` as small as 8.
        recovery_fvu: Fraction of variance unexplained the architecture, built with
            ``kwargs``, reaches on that problem's held-out rows; ``None`` claims nothing
            (the recovery test then fails, asking for one).
    """

    kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    recovery_fvu: float | None = None


_EXAMPLES: dict[str, ArchitectureExample] = {}

D = TypeVar("D", bound="type[Dictionary]")


def _check_example(
    name: str, example_kwargs: Mapping[str, Any] | None, recovery_fvu: float | None
) -> ArchitectureExample:
    if example_kwargs is not None and not isinstance(example_kwargs, Mapping):
        raise ConfigTypeError(
            f"example_kwargs of architecture {name!r} must be a mapping of config fields "
            f"such as {{'k': 4}}, got a {type(example_kwargs).__name__}"
        )
    if recovery_fvu is not None and (
        isinstance(recovery_fvu, bool)
        or not isinstance(recovery_fvu, int | float)
        or not 0 < recovery_fvu <= 1  # also refuses NaN
    ):
        raise ConfigError(
            f"recovery_fvu of architecture {name!r} must be a number in (0, 1], got "
            f"{recovery_fvu!r:.60}; give the FVU it reaches on the planted-dictionary test"
        )
    kwargs = MappingProxyType(dict(example_kwargs or {}))
    return ArchitectureExample(kwargs, None if recovery_fvu is None else float(recovery_fvu))


def register_dictionary(
    name: str,
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    recovery_fvu: float | None = None,
) -> Callable[[D], D]:
    """Class decorator registering a :class:`Dictionary` subclass under ``name``.

    The name is what ``config.json`` stores as ``architecture`` and what
    :func:`create_dictionary` accepts.

    Args:
        name: The architecture's registered name.
        example_kwargs: Config fields (besides ``d_in``/``d_latent``) of a small working
            example; see :class:`ArchitectureExample`.
        recovery_fvu: FVU the example reaches on the planted-dictionary test.

    Raises:
        ValueError: ``name`` is already taken by another class.
        ConfigError: the class shares its config class with another architecture, or
            ``recovery_fvu`` is not a number in (0, 1].

    Example:
        >>> from lightning_interp.dictionaries import Dictionary, register_dictionary
        >>> @register_dictionary("my_sae", example_kwargs={"k": 4})  # doctest: +SKIP
        ... class MySAE(Dictionary): ...
    """
    example = _check_example(name, example_kwargs, recovery_fvu)

    def decorate(cls: D) -> D:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"architecture {name!r} is already registered by {_REGISTRY[name]}")
        # The config class carries the name into config.json: two architectures sharing
        # one (a subclass reusing its parent's) would rename the parent's saved configs.
        owner = vars(cls.config_class).get("architecture")
        if owner and owner != name:
            config = cls.config_class.__name__
            raise ConfigError(
                f"architecture {name!r} reuses {config}, the config class of {owner!r}; "
                f"give it its own (class MyConfig({config}): pass; config_class = MyConfig)"
            )
        cls.architecture = name
        cls.config_class.architecture = name
        _REGISTRY[name] = cls
        _EXAMPLES[name] = example
        return cls

    return decorate


def list_architectures() -> list[str]:
    """Return the registered architecture names, sorted."""
    return sorted(_REGISTRY)


def get_architecture_example(name: str) -> ArchitectureExample:
    """The small working settings ``name`` was registered with (empty if none were given).

    Example:
        >>> from lightning_interp.dictionaries.registry import get_architecture_example
        >>> dict(get_architecture_example("topk").kwargs)
        {'k': 4}

    Raises:
        UnknownArchitectureError: ``name`` is not registered.
    """
    get_dictionary_class(name)
    return _EXAMPLES[name]


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
