"""Talking to the Hugging Face Hub: list a revision's files, download some, map errors.

Everything goes through the real ``huggingface_hub`` client, so its cache, ``HF_ENDPOINT``,
``HF_HUB_OFFLINE``, tokens and revisions all behave as users expect. An ``HfApi`` is built
per call (not at import) so a changed endpoint or offline flag is honoured.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lightning_interp._io import safe_join
from lightning_interp.errors import DictionaryNotFoundError, HubError

_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class RepoListing:
    """The files of one repo revision.

    Attributes:
        repo_id: ``org/name``.
        revision: What the caller asked for (branch, tag or sha).
        files: Repo-relative paths (offline: only the files present in the cache).
        offline: Whether the listing came from the local cache.
    """

    repo_id: str
    revision: str
    files: tuple[str, ...]
    offline: bool


def is_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set (read at call time, as huggingface_hub does)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def transport_errors() -> tuple[type[BaseException], ...]:
    """Network-level exception types (huggingface_hub 1.x uses httpx, 2.x its fork httpx2)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            errors.append(__import__(name).TransportError)
    return tuple(errors)


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None) -> Iterator[None]:
    """Translate huggingface_hub and network exceptions into this library's typed errors."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        HFValidationError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"{repo_id}@{revision or 'main'}"
    try:
        yield
    except RepositoryNotFoundError as err:
        raise DictionaryNotFoundError(
            f"Hub repo {repo_id!r} was not found (or is private or gated: log in with "
            f"`hf auth login` or pass token=...); check the repo id"
        ) from err
    except HFValidationError as err:
        raise DictionaryNotFoundError(
            f"{at} is not a valid Hub repo id or revision ({err}); check the spelling"
        ) from err
    except RevisionNotFoundError as err:
        raise DictionaryNotFoundError(
            f"revision {revision!r} does not exist in Hub repo {repo_id!r}; pass a branch, "
            f"tag or commit sha from its history"
        ) from err
    except (OfflineModeIsEnabled, EntryNotFoundError) as err:
        cause = err.__cause__ or err.__context__
        if isinstance(cause, (HfHubHTTPError, *transport_errors())) and not is_offline():
            raise HubError(
                f"could not download {at}: the Hub failed ({_describe(cause)}) and the files "
                f"are not in the local cache; retry later"
            ) from err
        if is_offline() or isinstance(err, OfflineModeIsEnabled):
            raise DictionaryNotFoundError(
                f"{at} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids "
                f"downloading it; load it once online, or unset HF_HUB_OFFLINE"
            ) from err
        raise DictionaryNotFoundError(f"a file of {at} is missing on the Hub: {err}") from err
    except HfHubHTTPError as err:
        if _status(err) in (401, 403):
            raise HubError(
                f"the Hub refused access to {at} ({_describe(err)}); log in with "
                f"`hf auth login` or pass token=... with write access for publishing"
            ) from err
        raise HubError(f"the Hub failed for {at}: {_describe(err)}; retry later") from err
    except transport_errors() as err:
        raise HubError(
            f"could not reach the Hub, or lost the connection, while working on {at} "
            f"({_describe(err)}); the cache holds no partial file, so retrying is safe"
        ) from err
    except OSError as err:
        # huggingface_hub raises a bare OSError when a download ends short of its size.
        if "Consistency check failed" in str(err):
            raise HubError(f"download of {at} was cut short ({err}); retry") from err
        raise


def _describe(err: BaseException) -> str:
    response = getattr(err, "response", None)
    status = getattr(response, "status_code", None)
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return f"HTTP {status}: {text}" if status else f"{type(err).__name__}: {text}"


def _storage_folder(repo_id: str) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")


def cached_listing(repo_id: str, revision: str | None) -> RepoListing | None:
    """The files of ``repo_id@revision`` present in the local cache, or ``None``."""
    storage = _storage_folder(repo_id)
    revision = revision or "main"
    sha = revision if _COMMIT_SHA.fullmatch(revision) else None
    ref = safe_join(storage, "refs", revision)  # a branch may hold "/", never ".."
    if sha is None and ref.is_file():
        sha = ref.read_text(encoding="utf-8").strip()
    if sha is None or not _COMMIT_SHA.fullmatch(sha):
        return None
    snapshot = safe_join(storage, "snapshots", sha)
    if not snapshot.is_dir():
        return None
    files = tuple(
        sorted(
            p.relative_to(snapshot).as_posix()
            for p in snapshot.rglob("*")
            if p.is_file()  # follows the cache's symlinks, so dangling blobs are skipped
        )
    )
    return RepoListing(repo_id, revision, files, offline=True)


def list_revision(repo_id: str, revision: str | None, token: str | bool | None) -> RepoListing:
    """List the files of ``repo_id@revision``; from the cache when offline or unreachable.

    Raises:
        DictionaryNotFoundError: repo or revision missing (or offline and not cached).
        HubError: the Hub failed and nothing is cached.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    if is_offline():
        listing = cached_listing(repo_id, revision)
        if listing is None:
            raise DictionaryNotFoundError(
                f"{repo_id}@{revision or 'main'} is not in the local Hugging Face cache and "
                f"HF_HUB_OFFLINE=1 forbids downloading it; load it once online first"
            )
        return listing
    try:
        with hub_errors(repo_id, revision):
            info = HfApi(token=token).model_info(repo_id, revision=revision)
    except HubError as err:
        # As huggingface_hub does for downloads: if the Hub is down, fall back on the cache.
        cause = err.__cause__
        down = not isinstance(cause, RepositoryNotFoundError) and (
            isinstance(cause, transport_errors())
            or (isinstance(cause, HfHubHTTPError) and _status(cause) >= 500)
        )
        listing = cached_listing(repo_id, revision) if down else None
        if listing is None:
            raise
        return listing
    files = checked_listing(repo_id, info.sha, [s.rfilename for s in info.siblings or []])
    return RepoListing(repo_id, revision or "main", files, offline=False)


def checked_listing(repo_id: str, sha: str | None, files: list[str]) -> tuple[str, ...]:
    """``files`` (a Hub listing) sorted, each checked to land inside the repo's cache folder.

    Raises:
        UnsafePathError: a listed path is absolute or climbs out (``"../x"``): the server
            is not a Hub to trust.
    """
    storage = _storage_folder(repo_id)
    for name in files:
        safe_join(storage, "snapshots", sha or "listing", name)
    return tuple(sorted(files))


def _status(err: BaseException) -> int:
    return int(getattr(getattr(err, "response", None), "status_code", 0) or 0)


def download_files(listing: RepoListing, files: list[str], token: str | bool | None) -> Path:
    """Download ``files`` of the listed revision (or find them in the cache); return the snapshot.

    Only these files are fetched (``snapshot_download`` with ``allow_patterns``); files
    already cached are not fetched again. Files are committed to the cache only once
    complete, so an interrupted download leaves nothing half-written in the snapshot.
    """
    from huggingface_hub import snapshot_download

    # Passing the requested revision (not the sha) lets huggingface_hub record the
    # branch -> commit mapping in the cache, which offline loading needs later.
    revision = listing.revision
    with hub_errors(listing.repo_id, revision):
        folder = snapshot_download(
            listing.repo_id,
            revision=revision,
            allow_patterns=[_escape(f) for f in files],
            token=token,
        )
    snapshot = Path(folder)
    missing = [f for f in files if not (snapshot / f).is_file()]
    if missing:
        raise DictionaryNotFoundError(
            f"{listing.repo_id}@{revision} changed while loading (missing {missing}); retry"
        )
    return snapshot


def _escape(path: str) -> str:
    # allow_patterns are fnmatch patterns: escape the characters fnmatch treats specially.
    return re.sub(r"([\[\]*?])", r"[\1]", path)


def snapshot_sha(snapshot: Path) -> str:
    """The commit sha of a cache snapshot folder (its name)."""
    return os.path.basename(os.path.normpath(snapshot))
