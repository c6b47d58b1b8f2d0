"""Readers and writers for dictionary folders in other libraries' formats.

Each format is one small adapter (:class:`FormatAdapter`): ``name``, ``allow_patterns``
(the files a Hub download needs), ``detect(filenames)``, ``read(folder)`` and, for
``native`` and ``saelens``, ``write(dictionary, folder)``. Everything is read into, and
written from, a native :class:`~lightning_interp.dictionaries.Dictionary`.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from lightning_interp import create_dictionary
    >>> from lightning_interp.zoo.formats import read_folder, write_folder
    >>> sae = create_dictionary("topk", d_in=8, d_latent=32, k=4)
    >>> folder = write_folder(sae, Path(tempfile.mkdtemp()), format="saelens")
    >>> sorted(p.name for p in folder.iterdir())
    ['cfg.json', 'sae_weights.safetensors']
    >>> read_folder(folder).config.k
    4
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import torch

from lightning_interp.dictionaries.base import Dictionary
from lightning_interp.errors import (
    DictionaryNotFoundError,
    OutputExistsError,
    UnknownFormatError,
    UnsupportedFormatError,
)
from lightning_interp.zoo.formats._common import FormatAdapter
from lightning_interp.zoo.formats.dictionary_learning import DICTIONARY_LEARNING
from lightning_interp.zoo.formats.gemma_scope import GEMMA_SCOPE
from lightning_interp.zoo.formats.native import NATIVE
from lightning_interp.zoo.formats.openai import OPENAI
from lightning_interp.zoo.formats.saelens import SAELENS
from lightning_interp.zoo.formats.sparsify import SPARSIFY

#: Every known format by name.
FORMATS: dict[str, FormatAdapter] = {
    adapter.name: adapter
    for adapter in (NATIVE, SAELENS, SPARSIFY, DICTIONARY_LEARNING, GEMMA_SCOPE, OPENAI)
}

__all__ = [
    "FORMATS",
    "FormatAdapter",
    "convert",
    "detect_format",
    "get_format",
    "read_folder",
    "write_folder",
]


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


def _matching(names: set[str]) -> list[str]:
    """The names of the formats whose :meth:`~FormatAdapter.detect` accepts ``names``."""
    return [name for name, adapter in FORMATS.items() if adapter.detect(names)]


def detect_format(filenames: Iterable[str]) -> str:
    """Name the format of a dictionary folder from the names of its files.

    Args:
        filenames: File names (or paths; only the last component counts) in one folder.

    Raises:
        UnknownFormatError: no format, or more than one, matches; the message lists the
            files found and what each format looks for.
    """
    names = {PurePosixPath(str(f)).name for f in filenames}
    matches = _matching(names)
    if len(matches) == 1:
        return matches[0]
    problem = "matches no known format" if not matches else f"matches several formats {matches}"
    raise UnknownFormatError(
        f"a folder holding {sorted(names) or 'no files'} {problem}. Known formats and their "
        f"files: {_expected()}. Pass format=... to choose one, or point at a single "
        f"dictionary's folder"
    )


def _expected() -> str:
    return "; ".join(f"{n}: {a.allow_patterns}" for n, a in FORMATS.items())


def _folder(path: str | os.PathLike[str]) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise DictionaryNotFoundError(
            f"dictionary folder {folder} does not exist or is not a folder"
        )
    return folder


def read_folder(
    folder: str | os.PathLike[str],
    *,
    format: str = "auto",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> Dictionary:
    """Read a dictionary folder of any known format into a native dictionary.

    Args:
        folder: The folder of one dictionary (for sparsify, one hookpoint's folder).
        format: A name from :data:`FORMATS`, or ``"auto"`` to detect it from the files.
        device: Where to put the parameters (default CPU).
        dtype: Convert the parameters to this dtype (default: as stored).

    Returns:
        The dictionary in eval mode; ``config.provenance`` records where it came from.

    Raises:
        DictionaryNotFoundError: the folder, or a file the format needs, is missing.
        UnknownFormatError: the format is unknown, or cannot be told from the files.
        CorruptFileError: a file is unreadable or contradicts another.
        UnsafeFileError: a ``.pt`` file would need arbitrary unpickling.
        UnsupportedFormatError: the folder uses a feature with no faithful equivalent.
    """
    path = _folder(folder)
    if format != "auto":
        return get_format(format).read(path, device=device, dtype=dtype)
    names = {p.name for p in path.iterdir()}
    matches = _matching(names)
    if len(matches) == 1:
        return get_format(matches[0]).read(path, device=device, dtype=dtype)
    if matches:
        detect_format(names)  # several formats match: raises, naming them
    # No complete folder of any format. Most often it is our own folder, half-copied: the
    # native reader's error names the missing file; the other formats are listed after it.
    try:
        return NATIVE.read(path, device=device, dtype=dtype)
    except DictionaryNotFoundError as err:
        raise DictionaryNotFoundError(
            f"{err}. Other known formats and their files: {_expected()}"
        ) from err


def write_folder(
    dictionary: Dictionary, folder: str | os.PathLike[str], *, format: str = "native"
) -> Path:
    """Write ``dictionary`` (its inference form) to ``folder`` in ``format``.

    Args:
        dictionary: The dictionary to write.
        folder: Target folder, created if needed; other files in it are left alone.
        format: ``"native"`` or ``"saelens"``.

    Returns:
        The folder.

    Raises:
        UnknownFormatError: the format name is unknown.
        UnsupportedFormatError: the format is read-only, or cannot represent this
            dictionary; nothing is written.
    """
    return _writer(format).write(dictionary, Path(folder))


def _writer(format: str) -> FormatAdapter:
    adapter = get_format(format)
    if not adapter.can_write:
        writable = sorted(n for n, a in FORMATS.items() if a.can_write)
        raise UnsupportedFormatError(
            f"the {format!r} format is read-only here; write one of {writable} instead"
        )
    return adapter


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    from_format: str = "auto",
    to_format: str = "native",
    overwrite: bool = False,
) -> Path:
    """Read the dictionary in ``src`` and write it to ``dst`` in another format.

    Nothing is written unless the read succeeds and the target format can hold the
    dictionary.

    Args:
        src: The source dictionary folder.
        dst: The output folder.
        from_format: The source format, or ``"auto"``.
        to_format: The format to write.
        overwrite: Replace a dictionary already in ``dst`` (refused otherwise).

    Returns:
        The folder written.

    Raises:
        OutputExistsError: ``dst`` already holds a dictionary and ``overwrite`` is false.
    """
    target = _writer(to_format)  # fail on a bad or read-only target before reading
    out = Path(dst)
    present = {p.name for p in out.iterdir()} if out.is_dir() else set()
    if not overwrite and _matching(present):
        raise OutputExistsError(
            f"{out} already holds a dictionary ({', '.join(sorted(present))}); pass "
            f"overwrite=True (--overwrite on the command line) to replace it, or another folder"
        )
    dictionary = read_folder(src, format=from_format)
    return target.write(dictionary, Path(dst))
