"""Crash-safe file writes: a temporary beside the target, flushed, then one atomic rename.

Temporaries are named ``.<target>.<pid>.<random>.tmp``: a writer killed mid-write leaves
one behind, and :func:`remove_stale_temporaries` later removes those whose process no
longer runs (a live writer's are kept). Files get the permissions an ordinary write gives.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

from lightning_interp._io import process_alive

# What sits between ".<target>." and ".tmp": "<pid>.<random>" (the pid tells a live writer's
# temporary from a dead one's), or mkstemp's 8 characters from versions before the pid.
_PID_MIDDLE = re.compile(r"(?P<pid>\d+)\.[0-9a-f]+")
_LEGACY_MIDDLE = re.compile(r"[a-z0-9_]{8}")


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
