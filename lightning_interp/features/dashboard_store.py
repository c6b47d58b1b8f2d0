"""Reading a feature store (layout v1) for the dashboard, with typed errors.

Only what the pages show is read: ``store.json``, the per-latent statistics (small: a few
hundred numbers per latent), the vocabulary, the optional explanations, and the contexts a
slice of latents at a time (``safe_open`` slices), so a wide dictionary's contexts are never
all in memory at once. Every shape is checked against ``store.json`` before a page is
rendered, so a truncated or mismatched store fails with one line, not a traceback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from lightning_interp.errors import ConfigError, FeatureStoreNotFoundError, InvalidFeatureStoreError
from lightning_interp.features.layout import FILES, FORMAT, VERSION

_STATS = ("count", "density", "mean_activation", "max_activation", "quantiles", "histogram")
_STATS_OPTIONAL = ("correlated_ids", "correlated_values")
_LOGIT = ("logit_top_ids", "logit_top_values", "logit_bottom_ids", "logit_bottom_values")
_CONTEXT = ("tokens", "activations", "values", "center", "source")
_META = ("dictionary", "window", "top_k", "quantile_bins", "per_quantile", "histogram")
_CONTROL = {"\n": "↵", "\r": "⏎", "\t": "⇥"}


def visible_text(text: str) -> str:
    """``text`` with line breaks and tabs shown as symbols (a context stays on one line)."""
    for raw, shown in _CONTROL.items():
        text = text.replace(raw, shown)
    return text or "∅"


class TokenTexts(dict):
    """Token ids to display strings (:func:`visible_text`); an unknown id shows as ``⟨id⟩``."""

    def __missing__(self, token: int) -> str:
        return f"⟨{token}⟩"


@dataclass
class DashboardStore:
    """A feature store opened for rendering.

    Attributes:
        folder: The store folder.
        meta: ``store.json``.
        stats: ``stats.safetensors`` (every tensor, first dimension ``d_latent``).
        vocab: ``vocab.json`` with integer keys.
        tokens: The vocabulary as display strings, computed once (pages show each token
            many times).
        explanations: ``explanations.json`` (``{}`` when absent).
        thumbnails: Images with a thumbnail in ``images/<index>.png`` (image stores).
    """

    folder: Path
    meta: dict[str, Any]
    stats: dict[str, torch.Tensor]
    vocab: dict[int, str]
    explanations: dict[str, dict[str, Any]] = field(default_factory=dict)
    thumbnails: frozenset[int] = frozenset()
    tokens: TokenTexts = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = TokenTexts({i: visible_text(text) for i, text in self.vocab.items()})

    @property
    def d_latent(self) -> int:
        """The number of latents."""
        return int(self.meta["dictionary"]["d_latent"])

    @property
    def modality(self) -> str:
        """``"text"`` or ``"image"``."""
        return str(self.meta.get("modality", "text"))

    def check_latents(self, latents: int) -> int:
        """``latents`` if it is a usable count of latents to render (capped at ``d_latent``)."""
        if isinstance(latents, bool) or not isinstance(latents, int) or latents < 1:
            raise ConfigError(f"--latents must be a positive integer, got {latents!r}")
        return min(latents, self.d_latent)

    def read_contexts(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """The context tensors of latents ``start .. stop-1`` (first dimension sliced)."""
        path = self.folder / "contexts.safetensors"
        try:
            with safe_open(str(path), framework="pt") as file:
                return {key: file.get_slice(key)[start:stop] for key in file.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise _unreadable(path, err) from err


def _unreadable(path: Path, err: BaseException) -> InvalidFeatureStoreError:
    return InvalidFeatureStoreError(
        f"{path} is not readable ({err}); rebuild the store with `lightning-interp features`"
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _unreadable(path, err) from err


def _check_meta(meta: Any, path: Path) -> dict[str, Any]:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InvalidFeatureStoreError(
            f"{path} is not a feature store's store.json (format is not {FORMAT!r}); "
            "point at a folder written by `lightning-interp features`"
        )
    if meta.get("version") != VERSION:
        raise InvalidFeatureStoreError(
            f"{path} is feature-store version {meta.get('version')!r}, this dashboard reads "
            f"version {VERSION}; rebuild the store with this version's `features`"
        )
    missing = [key for key in _META if key not in meta]
    d_latent = (
        meta.get("dictionary", {}).get("d_latent")
        if isinstance(meta.get("dictionary"), dict)
        else None
    )
    if missing or not isinstance(d_latent, int) or d_latent < 1:
        raise InvalidFeatureStoreError(
            f"{path} lacks {', '.join(missing) or 'dictionary.d_latent'}; rebuild the store"
        )
    return meta


def _shape_error(path: Path, key: str, shape: Any, expected: Any) -> InvalidFeatureStoreError:
    return InvalidFeatureStoreError(
        f"{path}: tensor {key!r} has shape {list(shape)}, store.json implies {list(expected)}; "
        "the store is inconsistent, rebuild it"
    )


def _read_stats(path: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        stats = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise _unreadable(path, err) from err
    width = int(meta["dictionary"]["d_latent"])
    lens = int(meta.get("logit_lens") or 0)
    required = (*_STATS, *(_LOGIT if lens else ()))
    missing = [key for key in required if key not in stats]
    if missing:
        raise InvalidFeatureStoreError(
            f"{path} lacks {', '.join(missing)}; the store is incomplete, rebuild it"
        )
    expected = {"quantiles": (width, 9), "histogram": (width, int(meta["histogram"]["bins"]))}
    expected |= {key: (width, lens) for key in _LOGIT if lens}
    for key in (*required, *(k for k in _STATS_OPTIONAL if k in stats)):
        shape = tuple(stats[key].shape)
        want = expected.get(key, (width, *shape[1:]))
        if shape != want:
            raise _shape_error(path, key, shape, want)
    for key in _STATS_OPTIONAL:  # a store without co-firing data shows no correlated latents
        stats.setdefault(key, torch.full((width, 0), -1, dtype=torch.int64))
    return stats


def _check_contexts(path: Path, meta: dict[str, Any]) -> None:
    width, window = int(meta["dictionary"]["d_latent"]), int(meta["window"])
    examples = {
        "top_": int(meta["top_k"]),
        "quantile_": int(meta["quantile_bins"]) * int(meta["per_quantile"]),
    }
    try:
        with safe_open(str(path), framework="pt") as file:
            shapes = {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise _unreadable(path, err) from err
    for prefix, count in examples.items():
        image = prefix + "image"  # image stores: the image of each example
        if image in shapes and shapes[image] != (width, count):
            raise _shape_error(path, image, shapes[image], (width, count))
        for name in _CONTEXT:
            key = prefix + name
            want = (width, count, window) if name in ("tokens", "activations") else (width, count)
            if key not in shapes:
                raise InvalidFeatureStoreError(f"{path} lacks {key!r}; rebuild the store")
            if shapes[key] != want:
                raise _shape_error(path, key, shapes[key], want)


def _read_vocab(path: Path) -> dict[int, str]:
    raw = _read_json(path)
    try:
        if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
            raise ValueError("not an object of strings")
        return {int(key): text for key, text in raw.items()}
    except ValueError as err:
        raise InvalidFeatureStoreError(
            f"{path} must map token ids to strings ({err}); rebuild the store"
        ) from err


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, type(None))) and not isinstance(value, bool)


def _valid_scores(scores: Any) -> bool:
    """``{scorer: {"auroc": float, ...}}``: each scorer's numbers (``None`` allowed)."""
    return isinstance(scores, dict) and all(
        isinstance(values, dict) and all(_is_number(v) for v in values.values())
        for values in scores.values()
    )


def _read_explanations(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    raw = _read_json(path)
    valid = isinstance(raw, dict) and all(
        isinstance(v, dict)
        and isinstance(v.get("text", ""), str)
        and _is_number(v.get("score"))
        and _valid_scores(v.get("scores", {}))
        for v in raw.values()
    )
    if not valid:
        raise InvalidFeatureStoreError(
            f'{path} must map latent ids to {{"text": str, "score": float, "scores": '
            f'{{scorer: {{"auroc": float, ...}}}}}}; rerun `lightning-interp explain` or remove it'
        )
    return raw


def read_store(folder: Path) -> DashboardStore:
    """Open the feature store at ``folder`` after checking its files and shapes.

    Raises:
        FeatureStoreNotFoundError: the folder or one of its four files is missing.
        InvalidFeatureStoreError: a file is unreadable, of another format, or its shapes
            contradict ``store.json``.
    """
    if not folder.is_dir():
        raise FeatureStoreNotFoundError(
            f"feature store {folder} does not exist; build one with "
            f"`lightning-interp features SOURCE --out {folder}`"
        )
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise FeatureStoreNotFoundError(
            f"{folder} is not a complete feature store (missing {', '.join(missing)}); "
            "build it with `lightning-interp features` (an interrupted build resumes)"
        )
    meta = _check_meta(_read_json(folder / "store.json"), folder / "store.json")
    stats = _read_stats(folder / "stats.safetensors", meta)
    _check_contexts(folder / "contexts.safetensors", meta)
    return DashboardStore(
        folder=folder,
        meta=meta,
        stats=stats,
        vocab=_read_vocab(folder / "vocab.json"),
        explanations=_read_explanations(folder / "explanations.json"),
        thumbnails=frozenset(
            int(p.stem) for p in (folder / "images").glob("*.png") if p.stem.isdigit()
        ),
    )
