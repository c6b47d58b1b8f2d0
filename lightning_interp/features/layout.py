"""The feature-store folder (layout v1) and the progress folder of an unfinished build.

A store is ``store.json``, ``stats.safetensors``, ``contexts.safetensors`` and
``vocab.json`` (see docs/features.md). It is written in a sibling temporary folder and
renamed into place, so a store either exists whole or not at all. An unfinished build keeps
its accumulators in ``DIR.partial/``: ``state-<batch>.safetensors`` then ``progress.json``
naming it (each file renamed into place), so a kill at any moment leaves a consistent
checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from lightning_interp._io import atomic_write, folder_replaced_atomically, read_json
from lightning_interp.errors import (
    ConfigError,
    FeatureStoreNotFoundError,
    InvalidFeatureStoreError,
    OutputExistsError,
)

FORMAT = "lightning-interp-feature-store"
VERSION = 1
FILES = ("store.json", "stats.safetensors", "contexts.safetensors", "vocab.json")


def _write_json(path: Path, values: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(values, indent=1), encoding="utf-8"))


def partial_folder(out: Path) -> Path:
    """Where the progress of a build of ``out`` is kept: ``<out>.partial``."""
    return out.with_name(out.name + ".partial")


def write_store(
    out: Path,
    meta: dict[str, Any],
    stats: dict[str, Tensor],
    contexts: dict[str, Tensor],
    vocab: dict[str, str],
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write a whole store at ``out`` atomically (temporary sibling folder, then rename).

    Args:
        out: The store folder to create.
        meta: ``store.json``.
        stats: ``stats.safetensors``.
        contexts: ``contexts.safetensors``.
        vocab: ``vocab.json``.
        extra: Writes more files into the temporary folder (an image store's thumbnails).

    Raises:
        OutputExistsError: ``out`` exists already.
    """
    if out.exists():
        raise OutputExistsError(f"{out} exists; remove it or choose another --out")
    with folder_replaced_atomically(out) as tmp:
        (tmp / "store.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        save_file({k: v.contiguous() for k, v in stats.items()}, tmp / "stats.safetensors")
        save_file({k: v.contiguous() for k, v in contexts.items()}, tmp / "contexts.safetensors")
        (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        if extra is not None:
            extra(tmp)
    return out


def json_ready(values: Any) -> Any:
    """``values`` as JSON gives them back (tuples become lists)."""
    return json.loads(json.dumps(values))


def store_meta(dictionary: Any, settings: Any, site: str, source: str) -> dict[str, Any]:
    """The ``store.json`` fields every store shares: format, the dictionary, the settings.

    Args:
        dictionary: The dictionary of the pass.
        settings: The :class:`~lightning_interp.features.store.FeatureSettings` recorded.
        site: The canonical site read.
        source: How the store names the dictionary.
    """
    s = settings
    provenance = dataclasses.asdict(dictionary.config.provenance)
    return {
        "format": FORMAT,
        "version": VERSION,
        "dictionary": {
            "source": source,
            "architecture": dictionary.config.architecture,
            "d_latent": dictionary.d_latent,
            "site": site,
            "backbone": provenance.get("backbone"),
            "provenance": json_ready(provenance),
        },
        "window": s.window,
        "top_k": s.top_k,
        "quantile_bins": s.quantile_bins,
        "per_quantile": s.per_quantile,
        "correlated": s.correlated,
        "histogram": {"bins": s.histogram_bins, "log10_min": s.log10_min, "log10_max": s.log10_max},
        "settings": s.to_dict(),
    }


def read_store(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a store: ``{"meta", "stats", "contexts", "vocab"}`` (tensors by name).

    Raises:
        FeatureStoreNotFoundError: the folder or one of its files is missing.
        InvalidFeatureStoreError: another format or version.
    """
    folder = Path(folder)
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise FeatureStoreNotFoundError(
            f"{folder} is not a feature store (missing {missing}); build one with "
            f"'lightning-interp features SOURCE --out {folder}'"
        )
    meta = read_json(folder / "store.json")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise InvalidFeatureStoreError(
            f"{folder}/store.json is {meta.get('format')!r} v{meta.get('version')}, not "
            f"{FORMAT!r} v{VERSION}; rebuild it with this version of lightning-interp"
        )
    return {
        "meta": meta,
        "stats": load_file(folder / "stats.safetensors"),
        "contexts": load_file(folder / "contexts.safetensors"),
        "vocab": read_json(folder / "vocab.json"),
    }


def save_progress(partial: Path, tensors: dict[str, Tensor], progress: dict[str, Any]) -> None:
    """Checkpoint a build: the tensors, then ``progress.json`` naming them."""
    partial.mkdir(parents=True, exist_ok=True)
    name = f"state-{progress['batches']}.safetensors"
    atomic_write(partial / name, lambda tmp: save_file(tensors, tmp))
    _write_json(partial / "progress.json", {**progress, "state": name})
    for old in partial.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def load_progress(partial: Path) -> tuple[dict[str, Any], dict[str, Tensor]] | None:
    """``(progress, tensors)`` of the last checkpoint in ``partial``, or ``None``."""
    if not (partial / "progress.json").is_file():
        return None
    progress = read_json(partial / "progress.json")
    return progress, load_file(partial / progress["state"])


def resume_progress(partial: Path, fingerprint: dict[str, Any], acc: Any) -> dict[str, Any] | None:
    """Restore ``acc`` from the checkpoint in ``partial``; its progress, or ``None`` if none.

    Raises:
        ConfigError: the checkpoint was made with another ``fingerprint`` (settings).
    """
    saved = load_progress(partial)
    if saved is None:
        return None
    if saved[0]["fingerprint"] != json_ready(fingerprint):
        raise ConfigError(
            f"{partial} holds a build with other settings; delete it, or resume with the "
            f"settings it was started with"
        )
    acc.load(saved[1])
    return saved[0]
