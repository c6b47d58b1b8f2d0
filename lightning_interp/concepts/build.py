"""Reading concept phrase lists (heads are built by name in :mod:`.registry`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lightning_interp.errors import ConfigError


def load_phrases(source: str | Sequence[str]) -> list[str]:
    """Concept phrases from a list, or from a ``.txt`` file with one phrase a line.

    Blank lines and lines starting with ``#`` are skipped.
    """
    if isinstance(source, str):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(
                f"concepts={source!r} is not a file; give a list of phrases or a .txt file "
                f"with one phrase a line"
            )
        lines = path.read_text(encoding="utf-8").splitlines()
        return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    return [str(p) for p in source]
