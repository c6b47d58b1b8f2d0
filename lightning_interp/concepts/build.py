"""Building heads by name, and reading concept phrase lists."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_interp.concepts.bank import ConceptBank
from lightning_interp.concepts.base import ConceptHead, head_class
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


def create_head(
    name: str, *, bank: ConceptBank, class_names: Sequence[str], **kwargs: Any
) -> ConceptHead:
    """A head of registered type ``name`` over ``bank``'s concepts.

    Heads with a ``from_bank`` constructor (PCBM, label-free CBM) take the bank's vectors;
    the others (supervised CBM, concept transformer, concept slots) take its names and width
    only.
    """
    cls = head_class(name)
    from_bank = getattr(cls, "from_bank", None)
    if from_bank is not None:
        return from_bank(bank, list(class_names), **kwargs)
    return cls(bank.width, bank.names, list(class_names), **kwargs)
