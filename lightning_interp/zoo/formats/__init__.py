"""Readers and writers for dictionary folders in other libraries' formats.

Each format is one small adapter (:class:`FormatAdapter`) in its own module, registered by
name with :func:`register_format`: it declares its ``required_files`` (and optional and
companion files, and a ``specificity``), ``read(folder)`` and, for ``native`` and
``saelens``, ``write(dictionary, folder)``. Everything is read into, and written from, a
native :class:`~lightning_interp.dictionaries.Dictionary`. A new built-in format is one
module plus its name in :data:`BUILTIN_FORMATS`; a format of your own is registered when
the module that calls :func:`register_format` is imported.

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

import importlib
import os
from pathlib import Path

import torch

from lightning_interp.dictionaries.base import Dictionary
from lightning_interp.errors import (
    DictionaryNotFoundError,
    OutputExistsError,
    UnsupportedFormatError,
)
from lightning_interp.zoo.formats.base import FormatAdapter
from lightning_interp.zoo.formats.registry import (
    FORMATS,
    detect_format,
    expected_files,
    get_format,
    list_formats,
    matching_formats,
    register_format,
)

#: The formats shipped here: modules of this package, each registering its adapter. Their
#: order is the registration order, in which messages list the formats.
BUILTIN_FORMATS = ("native", "saelens", "sparsify", "dictionary_learning", "gemma_scope", "openai")
for _module in BUILTIN_FORMATS:
    importlib.import_module(f"{__name__}.{_module}")

__all__ = [
    "BUILTIN_FORMATS",
    "FORMATS",
    "FormatAdapter",
    "convert",
    "detect_format",
    "get_format",
    "list_formats",
    "read_folder",
    "register_format",
    "write_folder",
]


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
        format: A name from :func:`list_formats`, or ``"auto"`` to detect it from the files.
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
    matches = matching_formats(names)
    if len(matches) == 1:
        return get_format(matches[0]).read(path, device=device, dtype=dtype)
    if matches:
        detect_format(names)  # several formats match: raises, naming them
    # No complete folder of any format. Most often it is our own folder, half-copied: the
    # native reader's error names the missing file; the other formats are listed after it.
    try:
        return get_format("native").read(path, device=device, dtype=dtype)
    except DictionaryNotFoundError as err:
        raise DictionaryNotFoundError(
            f"{err}. Other known formats and their files: {expected_files()}"
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
    if not overwrite and matching_formats(present):
        raise OutputExistsError(
            f"{out} already holds a dictionary ({', '.join(sorted(present))}); pass "
            f"overwrite=True (--overwrite on the command line) to replace it, or another folder"
        )
    dictionary = read_folder(src, format=from_format)
    return target.write(dictionary, Path(dst))
