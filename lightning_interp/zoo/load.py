"""One function to load a dictionary from wherever it lives: a folder, the Hub, the catalogue."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from lightning_interp.dictionaries.base import Dictionary
from lightning_interp.errors import (
    DictionaryNotFoundError,
    HubError,
    SiteSelectionError,
)
from lightning_interp.zoo.layout import DictionaryFolder, find_dictionary_folders, select_folder

ZOO_PREFIX = "zoo:"
HF_PREFIX = "hf://"


def load_dictionary(
    source: str | os.PathLike[str],
    *,
    site: str | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    format: str = "auto",  # noqa: A002 - mirrors read_folder's keyword
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    token: str | bool | None = None,
) -> Dictionary:
    """Load a dictionary from a local folder, a Hub repo or a catalogue entry.

    Args:
        source: A local folder; a Hub repo id (``"org/name"``, or ``"hf://org/name"``); or
            a catalogue id (``"zoo:<release>/<id>"``, see ``lightning-interp zoo list``).
        site: Which dictionary of a multi-dictionary source to load (a folder name such as
            ``"layers.8.resid_post"``). Needed when the source holds several.
        subfolder: The exact folder inside the repo or tree, instead of ``site``.
        revision: Hub branch, tag or commit sha (default: the default branch, or the
            revision pinned by a catalogue entry).
        format: ``"auto"`` (detected from file names) or a format name
            (``"native"``, ``"saelens"``, ``"sparsify"``, ...).
        device: Device for the parameters (default CPU).
        dtype: Convert the parameters to this dtype (default: as saved).
        token: Hub token (default: the logged-in token, as huggingface_hub does).

    Returns:
        The dictionary in eval mode. Loaded from the Hub, its
        ``config.provenance.revision`` holds the commit sha it came from.

    Raises:
        DictionaryNotFoundError: the folder, repo, revision or file does not exist (or is
            not cached while ``HF_HUB_OFFLINE=1``).
        SiteSelectionError: several dictionaries and no (or an unknown) ``site``.
        HubError: the Hub failed or the connection dropped.
        CorruptFileError: a file is unreadable or contradicts its config.

    Example:
        >>> import tempfile
        >>> from lightning_interp import create_dictionary, load_dictionary
        >>> sae = create_dictionary("topk", d_in=8, d_latent=32, k=2)
        >>> folder = tempfile.mkdtemp()
        >>> sae.save_pretrained(folder)
        >>> load_dictionary(folder).config.k
        2
    """
    text = check_source(source)
    if text.startswith(ZOO_PREFIX):
        from lightning_interp.zoo.catalogue import resolve_catalogue_id

        target = resolve_catalogue_id(text, site=site)
        return load_dictionary(
            target.repo,
            subfolder=target.path,
            revision=revision or target.revision,
            format=target.format if format == "auto" else format,
            device=device,
            dtype=dtype,
            token=token,
        )
    path = Path(text)
    if path.is_dir():
        return load_local(
            path, site=site, subfolder=subfolder, format=format, device=device, dtype=dtype
        )
    if is_local_path(source):
        raise DictionaryNotFoundError(
            f"{text!r} is not a local folder (nothing exists there); pass the folder written "
            f"by Dictionary.save_pretrained, a Hub repo id ('org/name') or a catalogue id "
            f"('zoo:<release>/<id>')"
        )
    repo_id = hub_repo_id(source)
    if repo_id is None:
        raise DictionaryNotFoundError(
            f"{text!r} is neither a local folder nor a Hub repo id ('org/name') nor a "
            f"catalogue id ('zoo:<release>/<id>'); check the path"
        )
    try:
        return load_from_hub(
            repo_id,
            site=site,
            subfolder=subfolder,
            revision=revision,
            format=format,
            device=device,
            dtype=dtype,
            token=token,
        )
    except (DictionaryNotFoundError, HubError) as err:
        from huggingface_hub.errors import RepositoryNotFoundError

        from lightning_interp.zoo.hub import transport_errors

        unreachable = isinstance(err.__cause__, (RepositoryNotFoundError, *transport_errors()))
        if text.startswith(HF_PREFIX) or not unreachable:
            raise
        # "runs/sae" is a valid repo id too: say that reading it locally failed as well.
        raise type(err)(f"{err}; no local folder {text!r} exists either") from err


def check_source(source: str | os.PathLike[str]) -> str:
    """``source`` as text, refusing an empty one (``Path("")`` would mean the working folder).

    Raises:
        DictionaryNotFoundError: ``source`` is empty or blank.
    """
    text = os.fspath(source)
    if not text.strip():
        raise DictionaryNotFoundError(
            f"source {text!r} is empty; pass a dictionary folder, a Hub repo id ('org/name') "
            f"or a catalogue id ('zoo:<release>/<id>')"
        )
    return text


def is_local_path(source: str | os.PathLike[str]) -> bool:
    """Whether ``source`` can only mean a local path (a Path, absolute, or ``./``, ``~``).

    Such a source is never looked up on the Hub, even when nothing exists there.
    """
    text = os.fspath(source)
    return not isinstance(source, str) or os.path.isabs(text) or text.startswith((".", "~"))


def hub_repo_id(source: str | os.PathLike[str]) -> str | None:
    """The Hub repo id ``source`` names (``org/name`` or ``hf://org/name``), else ``None``."""
    if is_local_path(source):
        return None
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id = os.fspath(source).removeprefix(HF_PREFIX).strip("/")
    parts = repo_id.split("/")
    valid = len(parts) == 2 and all(parts) and not repo_id.startswith((".", "~"))
    try:
        validate_repo_id(repo_id)  # the Hub's own rule: no "..", "--", spaces, ...
    except HFValidationError:
        valid = False
    return repo_id if valid else None


def _read(
    folder: Path,
    fmt: str,
    device: str | torch.device | None,
    dtype: str | torch.dtype | None,
) -> Dictionary:
    from lightning_interp.zoo.formats import read_folder

    return read_folder(folder, format=fmt, device=device, dtype=dtype)


def load_local(
    root: Path,
    *,
    site: str | None = None,
    subfolder: str | None = None,
    format: str = "auto",  # noqa: A002
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> Dictionary:
    """Load from a local folder: a dictionary folder, or a tree with one folder per site.

    A concept-bottleneck head's folder (same file names as a native dictionary) is
    reported as such by the native reader.
    """
    files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    folders = find_dictionary_folders(files, format)
    if not folders and site is None and subfolder is None:
        # Not a recognised layout: let the reader name the missing files.
        return _read(root, format, device, dtype)
    chosen = select_folder(folders, source=str(root), site=site, subfolder=subfolder)
    return _read(chosen.under(root), chosen.format, device, dtype)


def load_from_hub(
    repo_id: str,
    *,
    site: str | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    format: str = "auto",  # noqa: A002
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    token: str | bool | None = None,
) -> Dictionary:
    """Load one dictionary from a Hub repo, downloading only the files it needs.

    Lists the revision's files, finds the folder for ``site``, detects its format from
    the file names and downloads only that adapter's files. See :func:`load_dictionary`.
    """
    from lightning_interp.zoo.hub import download_files, list_revision, snapshot_sha

    listing = list_revision(repo_id, revision, token)
    folders = find_dictionary_folders(listing.files, format)
    where = f"Hub repo {repo_id}@{listing.revision}" + (" (local cache)" if listing.offline else "")
    try:
        chosen: DictionaryFolder = select_folder(
            folders, source=where, site=site, subfolder=subfolder
        )
    except (SiteSelectionError, DictionaryNotFoundError) as err:
        if not listing.offline:
            raise
        # Offline, only cached files are known: the site may well exist on the Hub.
        raise DictionaryNotFoundError(
            f"{err}. With HF_HUB_OFFLINE=1 only dictionaries already in the local cache can "
            f"be loaded; load this one once online, or unset HF_HUB_OFFLINE"
        ) from err
    snapshot = download_files(listing, list(chosen.files), token)
    dictionary = _read(chosen.under(snapshot), chosen.format, device, dtype)
    provenance = dataclasses.replace(
        dictionary.config.provenance,
        revision=snapshot_sha(snapshot),
        extra={
            **dictionary.config.provenance.extra,
            "hub_repo_id": repo_id,
            "hub_subfolder": chosen.path,
        },
    )
    dictionary.config = dictionary.config.replace(provenance=provenance)
    return dictionary
