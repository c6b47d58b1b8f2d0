"""Neutral file-system helpers: paths that cannot leave their folder.

Every path built from a config value, a command-line argument or a Hub listing goes through
:func:`safe_join`, and every name used as one folder level (a site, a head name) through
:func:`check_folder_name`, so a hostile ``"../../x"`` or ``"/etc"`` is refused before any
byte is written. This module imports nothing else of the library but :mod:`errors`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

from lightning_interp.errors import UnsafePathError

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
