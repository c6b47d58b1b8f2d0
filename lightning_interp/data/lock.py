"""An exclusive lock on a folder: a lock file created with ``O_EXCL`` that names its owner.

Two writers on one folder would interleave their files; the second one must be refused
with a message that says who holds the folder. The lock file holds the owner's pid, host
and a random token. A lock left by a process that died (a kill, a crash) is *stale*: the
next writer on the same host sees that the pid no longer runs and takes the lock over. A
lock of a live process, of another host, or one this process holds is never taken over.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from pathlib import Path

from lightning_interp._io import process_alive
from lightning_interp.errors import FolderInUseError

LOCK_NAME = ".writer.lock"
# A lock file is created empty and its owner written right after: a lock younger than this
# with no owner in it belongs to a writer that is starting, not to a dead one.
_UNWRITTEN_GRACE_SECONDS = 10.0
_ATTEMPTS = 5


class FolderLock:
    """Holds ``<folder>/.writer.lock`` while one writer fills the folder.

    Args:
        folder: The folder to lock (must exist).
        what: Who locks it, for messages (e.g. ``"an ActivationCacheWriter"``).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     with FolderLock(folder):
        ...         try:
        ...             FolderLock(folder).acquire()
        ...         except FolderInUseError:
        ...             print("refused")
        refused
    """

    def __init__(self, folder: str | os.PathLike[str], what: str = "a writer") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self.token = secrets.token_hex(8)
        self.held = False

    def _owner_text(self) -> str:
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "token": self.token}
        return json.dumps(owner)

    def acquire(self) -> FolderLock:
        """Take the lock, taking over a stale one.

        Raises:
            FolderInUseError: A live writer (or one whose liveness cannot be checked from
                here) holds the folder.
        """
        for _ in range(_ATTEMPTS):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            try:
                os.write(fd, self._owner_text().encode())
            finally:
                os.close(fd)
            self.held = True
            return self
        raise self._in_use(self._read(), "")

    def release(self) -> None:
        """Remove the lock file if it is still this lock's (idempotent)."""
        if not self.held:
            return
        self.held = False
        owner = self._read()
        if owner is not None and owner.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _read(self) -> dict | None:
        try:
            owner = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return owner if isinstance(owner, dict) else None

    def _take_over_if_stale(self) -> None:
        try:
            text = self.path.read_text(encoding="utf-8")
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return  # released meanwhile: try again
        try:
            owner = json.loads(text)
            pid, host = int(owner["pid"]), str(owner["host"])
        except (ValueError, TypeError, KeyError):
            if age < _UNWRITTEN_GRACE_SECONDS:
                raise self._in_use(None, " (it is being created)") from None
            pid, host = None, socket.gethostname()  # never finished: its writer died
        if host != socket.gethostname():
            raise self._in_use(owner, f" (on host {host}; its pid cannot be checked from here)")
        if pid is not None and process_alive(pid):
            raise self._in_use(owner, "")
        # Move the stale lock aside under a name of our own, then check that what we moved
        # is the stale lock we read: another writer may have taken it over in between.
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}-{self.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            if aside.read_text(encoding="utf-8") != text:
                try:
                    os.link(aside, self.path)  # a live writer's lock: put it back
                except FileExistsError:
                    pass
        finally:
            aside.unlink(missing_ok=True)

    def _in_use(self, owner: dict | None, detail: str) -> FolderInUseError:
        who = "another writer"
        if owner and "pid" in owner:
            who = f"process {owner['pid']} on {owner.get('host', '?')}"
        return FolderInUseError(
            f"{self.folder} is being written by {who}{detail} (lock file {self.path}); wait for "
            f"it to finish, use another folder, or delete {self.path} if no such writer runs"
        )
