"""Find the dictionary folders in a list of repo files and pick the one a caller asked for.

A repo (or local tree) may hold one dictionary at its root or one folder per site, in any
format the adapters of :mod:`lightning_interp.zoo.formats` recognise. Only file *names* are
looked at here, so the Hub loader can decide what to download before downloading anything.
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from lightning_interp.errors import (
    DictionaryNotFoundError,
    LightningInterpError,
    SiteSelectionError,
)


@dataclass(frozen=True)
class DictionaryFolder:
    """One dictionary inside a repo or tree.

    Attributes:
        path: Folder inside the repo, ``""`` for the root.
        format: Name of the format adapter that reads it.
        files: Repo paths the adapter needs (only these are downloaded).
    """

    path: str
    format: str
    files: tuple[str, ...]

    @property
    def label(self) -> str:
        """How the folder is shown in messages and cards (``"."`` for the root)."""
        return self.path or "."


def _detect(names: set[str], format: str) -> str | None:  # noqa: A002 - public keyword
    """The format of a folder holding ``names``, or ``None`` if it is no dictionary folder."""
    from lightning_interp.zoo.formats import detect_format, get_format

    if format != "auto":
        return format if get_format(format).detect(names) else None

    try:
        return detect_format(names)
    except LightningInterpError:
        return None


def find_dictionary_folders(
    paths: Iterable[str],
    format: str = "auto",  # noqa: A002 - public keyword
) -> list[DictionaryFolder]:
    """Group ``paths`` (repo-relative, ``/``-separated) by folder; keep dictionary folders.

    Args:
        paths: Every file in the repo or tree.
        format: A format name to accept only folders of that format, or ``"auto"``.

    Returns:
        The dictionary folders, sorted by path, each with the files its adapter needs.
    """
    from lightning_interp.zoo.formats import get_format

    by_folder: dict[str, set[str]] = defaultdict(set)
    for path in paths:
        folder, _, name = path.rpartition("/")
        by_folder[folder].add(name)
    found = []
    for folder, names in sorted(by_folder.items()):
        fmt = _detect(names, format)
        if fmt is None:
            continue
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
    """
    if not folders:
        raise DictionaryNotFoundError(
            f"{source} holds no dictionary folder in a known format (a folder needs e.g. "
            f"config.json + model.safetensors, or cfg.json + sae_weights.safetensors)"
        )
    available = ", ".join(f.label for f in folders)
    if subfolder is not None:
        chosen = [f for f in folders if f.path == subfolder.strip("/")]
        wanted = f"subfolder={subfolder!r}"
    elif site is not None:
        chosen = [f for f in folders if f.path == site] or [f for f in folders if _matches(f, site)]
        wanted = f"site={site!r}"
    elif len(folders) == 1:
        return folders[0]
    else:
        raise SiteSelectionError(
            f"{source} holds {len(folders)} dictionaries; choose one with site=... "
            f"(--site on the command line). Available sites: {available}"
        )
    if len(chosen) != 1:
        problem = "matches several folders" if chosen else "matches no dictionary folder"
        raise SiteSelectionError(f"{wanted} {problem} in {source}. Available sites: {available}")
    return chosen[0]
