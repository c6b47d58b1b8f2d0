"""The open registry of dictionary file formats, and detection by specificity.

Formats register themselves (:func:`register_format`), as dictionary architectures do with
``register_dictionary``; nothing here lists them. Detection asks every registered format
whether a folder's file names match it and keeps the most specific matches
(:attr:`~lightning_interp.zoo.formats.base.FormatAdapter.specificity`): a format known by
file names of its own beats a bare pattern such as OpenAI's ``*.pt``, and two formats of
equal specificity that both match leave the folder ambiguous (an error naming both).

Example:
    >>> from lightning_interp.zoo.formats import detect_format, list_formats
    >>> "saelens" in list_formats()
    True
    >>> detect_format(["cfg.json", "sae_weights.safetensors"])
    'saelens'
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import PurePosixPath
from typing import TypeVar

from lightning_interp.errors import UnknownFormatError
from lightning_interp.zoo.formats.base import FormatAdapter

#: Every registered format by name, in registration order (the order messages list them).
FORMATS: dict[str, FormatAdapter] = {}

A = TypeVar("A", bound="FormatAdapter | type[FormatAdapter]")


def register_format(adapter: A) -> A:
    """Register a format adapter (an instance, or a class to instantiate) under its name.

    Usable as a class decorator or called on an instance; returns its argument.

    Raises:
        ValueError: the adapter has no name, or another adapter holds the name already.

    Example:
        >>> from lightning_interp.zoo.formats import FormatAdapter, register_format
        >>> @register_format  # doctest: +SKIP
        ... class MyFormat(FormatAdapter):
        ...     name = "mine"
        ...     required_files = ("mine.json", "mine.safetensors")
    """
    instance = adapter() if isinstance(adapter, type) else adapter
    name = instance.name
    if not name:
        raise ValueError(f"{type(instance).__name__} has no name; set its `name` attribute")
    held = FORMATS.get(name)
    if held is not None and type(held) is not type(instance):
        raise ValueError(f"format {name!r} is already registered by {held!r}")
    FORMATS[name] = instance
    return adapter


def list_formats() -> list[str]:
    """The registered format names, sorted."""
    return sorted(FORMATS)


def get_format(name: str) -> FormatAdapter:
    """Return the adapter registered as ``name``.

    Raises:
        UnknownFormatError: listing the known format names.
    """
    try:
        return FORMATS[name]
    except KeyError:
        raise UnknownFormatError(
            f"unknown dictionary format {name!r}; known formats: {sorted(FORMATS)}"
        ) from None


def names_owned_elsewhere(adapter: FormatAdapter) -> set[str]:
    """The exact file names every *other* registered format declares as its own."""
    return {n for other in FORMATS.values() if other is not adapter for n in other.named_files()}


def matching_formats(filenames: Iterable[str]) -> list[str]:
    """The most specific formats whose files a folder holding ``filenames`` has.

    Args:
        filenames: Base names of the files in one folder.

    Returns:
        Format names in registration order: one for a recognised folder, none for an
        unknown one, several for an ambiguous one (equal specificity).
    """
    names = set(filenames)
    matches = [adapter for adapter in FORMATS.values() if adapter.detect(names)]
    if not matches:
        return []
    best = max(adapter.specificity for adapter in matches)
    return [adapter.name for adapter in matches if adapter.specificity == best]


def expected_files() -> str:
    """Each known format and its files, for error messages."""
    return "; ".join(f"{n}: {a.allow_patterns}" for n, a in FORMATS.items())


def detect_format(filenames: Iterable[str]) -> str:
    """Name the format of a dictionary folder from the names of its files.

    Args:
        filenames: File names (or paths; only the last component counts) in one folder.

    Raises:
        UnknownFormatError: no format, or more than one, matches; the message lists the
            files found and what each format looks for.
    """
    names = {PurePosixPath(str(f)).name for f in filenames}
    matches = matching_formats(names)
    if len(matches) == 1:
        return matches[0]
    problem = "matches no known format" if not matches else f"matches several formats {matches}"
    raise UnknownFormatError(
        f"a folder holding {sorted(names) or 'no files'} {problem}. Known formats and their "
        f"files: {expected_files()}. Pass format=... to choose one, or point at a single "
        f"dictionary's folder"
    )
