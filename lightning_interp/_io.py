"""Neutral file-system helpers: safe paths, crash-safe writes and typed JSON reads.

**Paths.** Every path built from a config value, a command-line argument or a Hub listing
goes through :func:`safe_join`, and every name used as one folder level (a site, a head
name) through :func:`check_folder_name`, so a hostile ``"../../x"`` or ``"/etc"`` is refused
before any byte is written.

**Writes.** :func:`atomic_write` writes a temporary beside the target, flushes it, then
renames it in one step. Temporaries are named ``.<target>.<pid>.<random>.tmp``: a writer
killed mid-write leaves one behind, and :func:`remove_stale_temporaries` later removes those
whose process no longer runs (a live writer's are kept). Files get the permissions an
ordinary write gives.

Dictionaries, concept heads, caches and the zoo all use these, so this module imports
nothing else of the library but :mod:`errors` (weights files are in :mod:`._weights`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

from lightning_interp.errors import CorruptFileError, DictionaryNotFoundError, UnsafePathError

# What sits between ".<target>." and ".tmp": "<pid>.<random>" (the pid tells a live writer's
# temporary from a dead one's), or mkstemp's 8 characters from versions before the pid.
_PID_MIDDLE = re.compile(r"(?P<pid>\d+)\.[0-9a-f]+")
_LEGACY_MIDDLE = re.compile(r"[a-z0-9_]{8}")

# One folder level: letters, digits and . _ - (sites look like "layers.8.resid_post" or
# "blocks.8.hook_resid_pre"); no separators, no "." / "..", no leading dot.
_FOLDER_NAME = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*")


def check_folder_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is safe as a single folder level, else raise.

    Args:
        name: The candidate (e.g. a site such as ``"layers.6.resid_post"``).
        what: What the name is, for the error message (``"site"``, ``"head name"``).

    Raises:
        UnsafePathError: empty, ``.``/``..``, a separator, an absolute path, or a character
            outside ``[A-Za-z0-9_.-]``.

    Example:
        >>> check_folder_name("layers.6.resid_post", "site")
        'layers.6.resid_post'
    """
    if not isinstance(name, str) or not _FOLDER_NAME.fullmatch(name) or name in {".", ".."}:
        raise UnsafePathError(
            f"{what} {name!r} cannot be used as a folder name; use letters, digits and . _ - "
            "only (no slashes, no '..', not starting with a dot)"
        )
    return name


def safe_join(root: str | os.PathLike[str], *parts: str) -> Path:
    """Join relative ``parts`` under ``root`` and refuse any result outside ``root``.

    ``parts`` may contain ``/`` (a Hub listing's ``"layer_3/width_16k/params.npz"``), but
    never an absolute path, a drive, a backslash or a ``..`` level, and the resolved result
    (symlinks followed) must stay inside the resolved ``root``.

    Args:
        root: The folder everything must stay in.
        *parts: Relative path pieces from a config, an argument or a download.

    Returns:
        The joined path (not resolved, so callers keep the names they gave).

    Raises:
        UnsafePathError: a part is absolute or climbs out of ``root``.

    Example:
        >>> str(safe_join("runs", "a/b.json"))
        'runs/a/b.json'
    """
    base = Path(root)
    joined = base
    for part in parts:
        text = os.fspath(part)
        pure = PurePosixPath(text)
        if (
            not text
            or "\\" in text
            or "\x00" in text
            or pure.is_absolute()
            or Path(text).is_absolute()
            or any(level == ".." for level in pure.parts)
        ):
            raise UnsafePathError(
                f"path {text!r} would leave {str(base)!r}; give a relative path without '..'"
            )
        joined = joined / pure
    resolved_root = base.resolve()
    resolved = joined.resolve()
    if resolved != resolved_root and resolved_root not in resolved.parents:
        raise UnsafePathError(
            f"path {str(joined)!r} resolves to {str(resolved)!r}, outside {str(resolved_root)!r}"
        )
    return joined


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (unknown counts as alive: never clean up).

    Used to tell a dead writer's leftovers (lock files, temporaries named with a pid) from
    those of a writer that still runs.
    """
    if pid == os.getpid():
        return True
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it runs, as another user
        return True
    return True


def _new_temporary(path: Path) -> Path:
    """Create an empty ``.<name>.<pid>.<random>.tmp`` beside ``path`` and return its path.

    Created with mode ``0o666`` filtered by the umask (what ``open(path, "w")`` gives),
    not ``mkstemp``'s ``0o600``, so exported files are readable as any other file is.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, flags, 0o666))
        except FileExistsError:
            continue
        return tmp


def _fsync(path: Path) -> None:
    # The data reaches the disk before the rename publishes it, so a power cut cannot leave
    # a renamed but empty file (the classic delayed-allocation hazard).
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_folder(folder: Path) -> None:
    """Make the renames done so far in ``folder`` durable before any later one.

    A writer of two files calls it between them, so that after a power cut the second
    rename can never be on disk without the first. (Windows cannot open a folder.)
    """
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    The temporary file is removed if ``write`` fails, so no half-written file remains. The
    result has the mode an ordinary write gives: an existing file's mode is kept, a new file
    gets ``0o666`` minus the umask.
    """
    tmp = _new_temporary(path)
    try:
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            mode = stat.S_IMODE(tmp.stat().st_mode)  # 0o666 minus the umask, from creation
        write(tmp)
        # Some writers (safetensors' save_file) recreate the file as 0o600: set it back.
        os.chmod(tmp, mode)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_temporaries(folder: Path, names: Iterable[str]) -> list[Path]:
    """Delete temporaries of ``names`` in ``folder`` left by writers that no longer run.

    Args:
        folder: The folder written to.
        names: Target file names (``config.json``, ...) whose temporaries to look for. Other
            files, and temporaries of live writers, are kept.

    Returns:
        The files removed.
    """
    removed = []
    for path in sorted(folder.glob(".*.tmp")) if folder.is_dir() else ():
        if _is_stale(path.name, names):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _is_stale(file_name: str, targets: Iterable[str]) -> bool:
    for target in targets:
        prefix = f".{target}."
        if not (file_name.startswith(prefix) and file_name.endswith(".tmp")):
            continue
        middle = file_name[len(prefix) : -len(".tmp")]
        if match := _PID_MIDDLE.fullmatch(middle):
            return not process_alive(int(match["pid"]))
        # Versions before pid-named temporaries: their writer has long stopped.
        return bool(_LEGACY_MIDDLE.fullmatch(middle))
    return False


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON object from ``path`` with typed errors.

    Raises:
        DictionaryNotFoundError: the file is missing.
        CorruptFileError: the file is not UTF-8 JSON, or holds something other than an object.
    """
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise DictionaryNotFoundError(f"{path} is missing") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{path} is not valid JSON ({err}); re-download it") from err
    if not isinstance(values, dict):
        raise CorruptFileError(f"{path} holds a JSON {type(values).__name__}, not an object")
    return values


@contextmanager
def folder_replaced_atomically(out: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it becomes ``out`` in one rename.

    A whole folder (a feature store, a dashboard, an export) then exists complete or not at
    all: an error or a kill inside the block leaves the old state (the temporary is removed on
    an error, and named ``.<out>.<pid>.<random>.tmp`` for cleaning after a kill).

    Args:
        out: The folder to create.
        replace: Replace an existing ``out`` (two renames: the old folder leaves, the new
            arrives; never a mix). Without it the caller must have refused an existing one.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}.{secrets.token_hex(4)}"
    building = out.with_name(f".{out.name}.{tag}.tmp")
    building.mkdir()
    try:
        yield building
        if replace and out.exists():
            old = out.with_name(f".{out.name}.{tag}.old.tmp")
            os.replace(out, old)
            os.replace(building, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(building, out)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
