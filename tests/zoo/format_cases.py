"""The one table the registry-driven format tests read: a small folder of each read-only format.

Every format in ``list_formats()`` is exercised by tests/zoo/test_format_registry.py. A
format that writes (``can_write``) needs nothing here: its folder is written by its own
``write``. A read-only format adds one writer below, laying a folder out as its library does
(the builders of tests/zoo/foreign_layouts.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from tests.zoo import foreign_layouts as fl


def _sparsify(folder: Path) -> None:
    fl.write_sparsify(folder, k=3)


def _dictionary_learning(folder: Path) -> None:
    state = fl.dictionary_learning_state("AutoEncoderTopK")
    fl.write_dictionary_learning(folder, "AutoEncoderTopK", state)


def _gemma_scope(folder: Path) -> None:
    fl.write_gemma_scope_v1(folder)


def _openai(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(fl.openai_state("ReLU"), folder / "5.pt")


#: Read-only format name -> a function writing a small folder of it (width ``fl.D``).
READ_ONLY_EXAMPLES: dict[str, Callable[[Path], None]] = {
    "sparsify": _sparsify,
    "dictionary_learning": _dictionary_learning,
    "gemma_scope": _gemma_scope,
    "openai": _openai,
}
