"""Find the dictionary folders in a list of repo files and pick the one a caller asked for.

A repo (or local tree) may hold one dictionary at its root or one folder per site, in any
format the adapters of :mod:`lightning_interp.zoo.formats` recognise. Only file *names* are
looked at here, so the Hub loader can decide what to download before downloading anything.
"""

from __future__ import annotations

import fnmatch
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lightning_interp._io import safe_join
from lightning_interp.errors import (
    DictionaryNotFoundError,
    SiteSelectionError,
    UnknownFormatError,
)


@dataclass(frozen=True)
class DictionaryFolder:
    """One dictionary inside a repo or tree.

    Attributes:
        path: Folder inside the repo, ``""`` for the root.
        format: Name of the format adapter that reads it (``""`` when ambiguous).
        files: Repo paths the adapter needs (only these are downloaded).
        candidates: For an ambiguous folder, the formats its files match (else empty).
    """

    path: str
    format: str
    files: tuple[str, ...]
    candidates: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """How the folder is shown in messages and cards (``"."`` for the root)."""
        return self.path or "."

    @property
    def ambiguous(self) -> bool:
        """Whether the folder's files match several formats (so none can be chosen alone)."""
        return bool(self.candidates)

    def under(self, root: str | os.PathLike[str]) -> Path:
        """The path of the folder under ``root`` (a tree or a download), checked to stay inside.

        Raises:
            UnsafePathError: the path is absolute or climbs out of ``root``.
        """
        return safe_join(root, self.path) if self.path else Path(root)

    def describe(self) -> str:
        """The label, and for an ambiguous folder the formats it matches."""
        if not self.ambiguous:
            return self.label
        return f"{self.label} (ambiguous: matches {', '.join(self.candidates)})"


def _formats(names: set[str], format: str) -> list[str]:  # noqa: A002 - public keyword
    """The most specific formats a folder holding ``names`` matches (one is the normal case)."""
    from lightning_interp.zoo.formats.registry import get_format, matching_formats

    if format != "auto":
        return [format] if get_format(format).detect(names) else []
    return matching_formats(names)


def find_dictionary_folders(
    paths: Iterable[str],
    format: str = "auto",  # noqa: A002 - public keyword
) -> list[DictionaryFolder]:
    """Group ``paths`` (repo-relative, ``/``-separated) by folder; keep dictionary folders.

    Args:
        paths: Every file in the repo or tree.
        format: A format name to accept only folders of that format, or ``"auto"``.

    Returns:
        The dictionary folders, sorted by path, each with the files its adapter needs. A
        folder matching several formats is kept, marked :attr:`~DictionaryFolder.ambiguous`,
        so that choosing it fails loudly instead of another folder being loaded.
    """
    from lightning_interp.zoo.formats import get_format

    by_folder: dict[str, set[str]] = defaultdict(set)
    for path in paths:
        folder, _, name = path.rpartition("/")
        by_folder[folder].add(name)
    found = []
    for folder, names in sorted(by_folder.items()):
        matches = _formats(names, format)
        if len(matches) > 1:
            found.append(DictionaryFolder(folder, "", (), tuple(matches)))
            continue
        if not matches:
            continue
        fmt = matches[0]
        patterns = get_format(fmt).allow_patterns
        wanted = sorted(n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns))
        files = tuple(f"{folder}/{n}" if folder else n for n in wanted)
        found.append(DictionaryFolder(folder, fmt, files))
    return found


def _matches(folder: DictionaryFolder, site: str) -> bool:
    # A site names a folder by its full path, or by its last component (the usual
    # "<repo>/<site>/" layout), with "/" and "." interchangeable for nested layouts.
    path = folder.path
    return site in (path, path.rsplit("/", 1)[-1], path.replace("/", "."))


def select_folder(
    folders: list[DictionaryFolder],
    *,
    source: str,
    site: str | None = None,
    subfolder: str | None = None,
) -> DictionaryFolder:
    """Pick one folder: the only one, the one at ``subfolder``, or the one named by ``site``.

    Args:
        folders: Candidates from :func:`find_dictionary_folders`.
        source: The repo or path, for messages.
        site: A site (folder) name.
        subfolder: An exact folder path inside the repo (``""`` for the root).

    Raises:
        DictionaryNotFoundError: there is no dictionary folder at all.
        SiteSelectionError: several folders and no choice, or no folder matches the choice.
        UnknownFormatError: the chosen (or only) folder matches several formats.
    """
    if not folders:
        raise DictionaryNotFoundError(
            f"{source} holds no dictionary folder in a known format (a folder needs e.g. "
            f"config.json + model.safetensors, or cfg.json + sae_weights.safetensors)"
        )
    available = ", ".join(f.describe() for f in folders)
    if any(f.ambiguous for f in folders):
        available += " (an ambiguous folder also needs format=...)"
    if subfolder is not None:
        chosen = [f for f in folders if f.path == subfolder.strip("/")]
        wanted = f"subfolder={subfolder!r}"
    elif site is not None:
        chosen = [f for f in folders if f.path == site] or [f for f in folders if _matches(f, site)]
        wanted = f"site={site!r}"
    elif len(folders) == 1:
        return _unambiguous(folders[0], source)
    else:
        raise SiteSelectionError(
            f"{source} holds {len(folders)} dictionaries; choose one with site=... "
            f"(--site on the command line). Available sites: {available}"
        )
    if len(chosen) != 1:
        problem = "matches several folders" if chosen else "matches no dictionary folder"
        raise SiteSelectionError(f"{wanted} {problem} in {source}. Available sites: {available}")
    return _unambiguous(chosen[0], source)


def _unambiguous(folder: DictionaryFolder, source: str) -> DictionaryFolder:
    if folder.ambiguous:
        raise UnknownFormatError(
            f"folder {folder.label} of {source} matches several formats "
            f"({', '.join(folder.candidates)}); choose one with format=... (--format on the "
            f"command line), or remove the stray files"
        )
    return folder
