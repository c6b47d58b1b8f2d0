"""Names that moved in this release: old imports and checkpoints keep working, with a warning.

Data modules were renamed to end in ``DataModule`` (``LanguageModelActivations`` ->
:class:`~lightning_interp.data.LanguageModelDataModule`, ``VisionModelActivations`` ->
:class:`~lightning_interp.data.VisionModelDataModule`), ``CachedActivations`` moved beside
the cache, ``data.embeddings`` became ``data.embedding_datamodule`` and ``load_backbone``
moved to :mod:`lightning_interp.backbones`. The old names resolve for one release, with a
:class:`~lightning_interp.errors.LightningInterpDeprecationWarning` (a ``DeprecationWarning``).
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

from lightning_interp.errors import LightningInterpDeprecationWarning

#: Current class name -> former names. Lightning keys a data module's checkpoint state by its
#: class name, so a checkpoint written before the rename holds it under the former one.
FORMER_NAMES: dict[str, tuple[str, ...]] = {
    "LanguageModelDataModule": ("LanguageModelActivations",),
    "VisionModelDataModule": ("VisionModelActivations",),
}


def warn_moved(old: str, new: str) -> None:
    """Warn that ``old`` is deprecated in favour of ``new`` (both dotted paths)."""
    warnings.warn(
        f"{old} is deprecated and will be removed in the next release; use {new}",
        LightningInterpDeprecationWarning,
        stacklevel=3,
    )


def warn_ignored(what: str, why: str) -> None:
    """Warn that the setting ``what`` is deprecated and has no effect any more."""
    warnings.warn(
        f"{what} is deprecated and ignored ({why}); remove it",
        LightningInterpDeprecationWarning,
        stacklevel=3,
    )


def moved_names(module: str, moved: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that resolves old names to their new homes, with a warning.

    Args:
        module: The name of the module the old names were imported from.
        moved: Old name -> ``"package.module:NewName"``.
    """

    def __getattr__(name: str) -> Any:
        if name not in moved:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        target, _, attribute = moved[name].partition(":")
        warn_moved(f"{module}.{name}", f"{target}.{attribute}")
        return getattr(importlib.import_module(target), attribute)

    return __getattr__


def adopt_former_state(checkpoint: MutableMapping[str, Any], datamodule: Any) -> None:
    """Re-key a data module's state saved under its former class name (before the rename).

    Called by the training modules' ``on_load_checkpoint``, which Lightning runs before it
    hands the data module its state, so a run resumed from an older checkpoint continues
    its stream where it stopped.
    """
    if datamodule is None:
        return
    name = type(datamodule).__qualname__
    if name in checkpoint:
        return
    for former in FORMER_NAMES.get(name, ()):
        if former in checkpoint:
            checkpoint[name] = checkpoint.pop(former)
            return
