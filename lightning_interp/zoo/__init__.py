"""The zoo: load dictionaries from anywhere, publish them to the Hub, browse known releases.

:func:`load_dictionary` reads a local folder, a Hub repo or a ``zoo:`` catalogue id in any
known format (:mod:`lightning_interp.zoo.formats`); :func:`publish_run` and
:meth:`Dictionary.push_to_hub <lightning_interp.Dictionary.push_to_hub>` publish with a
model card (:mod:`lightning_interp.zoo.card`); :mod:`lightning_interp.zoo.catalogue` lists
well-known public releases. Concept-bottleneck heads travel the same way:
:func:`load_head` and :meth:`ConceptHead.push_to_hub
<lightning_interp.concepts.ConceptHead.push_to_hub>` (cards in
:mod:`lightning_interp.zoo.head_card`).
"""

from __future__ import annotations

from typing import Any

from lightning_interp.zoo.catalogue import get_release, list_releases
from lightning_interp.zoo.load import load_dictionary
from lightning_interp.zoo.publish import PublishResult, publish_run, push_to_hub, render_card

# Head support imports every concept module: it is loaded on first use, so loading a
# dictionary never pays for (or depends on) lightning_interp.concepts.
_LAZY = {"load_head": "lightning_interp.zoo.heads", "push_head": "lightning_interp.zoo.heads"}

__all__ = [
    "PublishResult",
    "get_release",
    "list_releases",
    "load_dictionary",
    "load_head",
    "publish_run",
    "push_head",
    "push_to_hub",
    "render_card",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
