"""Neutral weights-file helpers: safe safetensors reads, checks, and crash-consistent pairs.

Dictionaries, concept heads, concept banks and foreign-format adapters all store a
safetensors file beside a JSON config, so they share one reader, one set of checks and one
pair writer. This module imports nothing else of the library but :mod:`errors` and the
other neutral modules (:mod:`._io`, :mod:`._dtypes`).

**Crash consistency of a pair.** Each file is written under a temporary name beside its
target and renamed into place (one atomic rename per file), weights first and config last.
Two renames cannot be one atomic step, so the weights carry what is needed to detect and
repair the window between them: their safetensors metadata holds the config text written
with them (:data:`PAIRED_CONFIG_KEY`) and the digest of the config file they replace
(:data:`REPLACED_CONFIG_KEY`). A process killed between the two renames leaves new weights
beside the previous config; :func:`paired_config` sees that the config is exactly the one
the weights replaced and returns the config saved inside them (the new pair, whole), with a
warning. A kill before the weights' rename leaves the previous pair untouched. So a reader
sees the old pair or the new one, never a mix. A config edited by hand after a complete
save matches neither digest and is read as written. Other files in the folder
(``metrics.json``, notes) are never touched, and the next write removes temporaries left by
a killed writer (see :func:`~lightning_interp._io.remove_stale_temporaries`). Writing a
sibling folder and swapping it in was the alternative; it would have to copy or move every
other file of the folder and cannot swap atomically on every platform.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lightning_interp._dtypes import dtype_name
from lightning_interp._io import atomic_write, remove_stale_temporaries, sync_folder
from lightning_interp.errors import CorruptFileError, DictionaryNotFoundError, NonFiniteError

#: Weights metadata: the JSON text of the config file written together with the weights.
PAIRED_CONFIG_KEY = "lightning_interp.paired_config"
#: Weights metadata: :func:`config_digest` of the config file present before this save.
REPLACED_CONFIG_KEY = "lightning_interp.replaced_config"


def _non_finite(tensor: torch.Tensor) -> bool:
    if not tensor.is_floating_point():
        return False
    # The float64 sum of finite float32/16/bf16 values cannot overflow; any NaN or Inf makes
    # it non-finite: one pass, without a full-size boolean mask.
    return not math.isfinite(float(tensor.sum(dtype=torch.float64)))


def non_finite_summary(tensors: Mapping[str, torch.Tensor]) -> str:
    """``"W_enc (3 NaN, 1 Inf of 256)"``-style list of the non-finite tensors, or ``""``."""
    parts = []
    for name, tensor in tensors.items():
        if _non_finite(tensor):
            nan = int(torch.isnan(tensor).sum())
            inf = int(torch.isinf(tensor).sum())
            parts.append(f"{name} ({nan} NaN, {inf} Inf of {tensor.numel()})")
    return ", ".join(parts)


def check_finite(tensors: Mapping[str, torch.Tensor], target: Path | str) -> None:
    """Raise :class:`NonFiniteError` naming each tensor with NaN or Inf values.

    Args:
        tensors: The tensors about to be written.
        target: Where they would go (named in the message; nothing is written there).
    """
    bad = non_finite_summary(tensors)
    if bad:
        raise NonFiniteError(
            f"refusing to write {target}: non-finite weights in {bad}; the training run "
            f"diverged or read a NaN batch: lower the learning rate or resume from an "
            f"earlier checkpoint"
        )


def config_digest(values: Any) -> str:
    """SHA-256 of a parsed config in canonical form (sorted keys, no whitespace)."""
    text = json.dumps(values, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _file_digest(path: Path) -> str:
    """:func:`config_digest` of the JSON file at ``path`` (raw bytes if unparseable; ``""``)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return ""
    try:
        return config_digest(json.loads(raw.decode("utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return hashlib.sha256(raw).hexdigest()


def write_weights_and_config(
    folder: Path,
    tensors: Mapping[str, torch.Tensor],
    config_text: str,
    *,
    weights_name: str,
    config_name: str,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a weights + config pair so a crash leaves the old pair or the new one.

    Weights are checked finite first (nothing is written otherwise), written with the
    pairing metadata described in the module docstring, then the config. Stale temporaries
    of both names are removed first.

    Args:
        folder: Target folder, created if needed; other files in it are left alone.
        tensors: The tensors (contiguous, on the CPU).
        config_text: The config file's exact text (JSON).
        weights_name: The safetensors file name.
        config_name: The config file name.
        metadata: Extra safetensors metadata.

    Returns:
        The folder.

    Raises:
        NonFiniteError: a tensor holds NaN or Inf.
    """
    check_finite(tensors, folder / weights_name)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder, (weights_name, config_name))
    paired = {
        **(metadata or {}),
        PAIRED_CONFIG_KEY: config_text,
        REPLACED_CONFIG_KEY: _file_digest(folder / config_name),
    }
    atomic_write(folder / weights_name, lambda p: save_file(dict(tensors), str(p), paired))
    sync_folder(folder)  # the weights' rename is on disk before the config's can be
    atomic_write(folder / config_name, lambda p: p.write_text(config_text, encoding="utf-8"))
    return folder


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file, turning every parse failure into :class:`CorruptFileError`."""
    if not path.is_file():
        raise DictionaryNotFoundError(
            f"{path} is missing; the folder has a config but no weights (an interrupted copy?)"
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CorruptFileError(
            f"{path} is not a readable safetensors file ({err}); re-save or re-download it"
        ) from err


def read_weights_metadata(path: Path) -> dict[str, str]:
    """The metadata of the safetensors file at ``path`` (``{}`` if it has none or is unreadable).

    Only the header is read; an unreadable file is reported by :func:`read_weights` later.
    """
    try:
        with safe_open(str(path), framework="pt") as file:
            return dict(file.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return {}


def paired_config(values: dict[str, Any], config_path: Path, weights_path: Path) -> dict[str, Any]:
    """The config that describes the weights at ``weights_path``: normally ``values``.

    If a write was interrupted between its two renames (see the module docstring), the
    config file is still the one the new weights replaced: the config saved inside the
    weights is returned instead, with a warning, so the pair read is the new one whole.

    Args:
        values: The parsed config file.
        config_path: Where ``values`` came from.
        weights_path: The weights file written with it.

    Raises:
        CorruptFileError: the weights' saved config is not a JSON object.
    """
    metadata = read_weights_metadata(weights_path)
    text = metadata.get(PAIRED_CONFIG_KEY)
    if text is None:
        return values  # written by another tool, or before pairing existed
    digest = config_digest(values)
    if digest != metadata.get(REPLACED_CONFIG_KEY):
        return values  # the pair as written, or a config edited by hand: it is read as is
    try:
        saved = json.loads(text)
    except json.JSONDecodeError as err:
        raise CorruptFileError(f"{weights_path} holds an unreadable paired config ({err})") from err
    if not isinstance(saved, dict):
        raise CorruptFileError(f"{weights_path} holds a paired config that is not an object")
    if config_digest(saved) == digest:
        return values
    warnings.warn(
        f"{config_path} is older than {weights_path.name} (a save was interrupted between "
        f"the two files); loading the weights with the config saved inside them. Save it "
        f"again to rewrite {config_path.name}",
        stacklevel=3,
    )
    return saved


def check_weight_values(tensors: Mapping[str, torch.Tensor], source: Path | str) -> None:
    """Raise :class:`CorruptFileError` for weights that are not floats, or not finite.

    Args:
        tensors: The tensors read from ``source``.
        source: The weights file (named in the error).
    """
    integral = sorted(
        f"{name} ({dtype_name(t.dtype)})"
        for name, t in tensors.items()
        if not t.is_floating_point()
    )
    if integral:
        raise CorruptFileError(
            f"{source}: {', '.join(integral)} must hold floating-point weights; convert them "
            f"to float32 (or bfloat16/float16) where the file was made"
        )
    bad = non_finite_summary(tensors)
    if bad:
        raise CorruptFileError(
            f"{source}: non-finite weights in {bad}; the file comes from a diverged run or "
            f"is damaged: re-download it or export it again from a good checkpoint"
        )


def check_tensors(
    shapes: Mapping[str, tuple[int, ...]],
    tensors: Mapping[str, torch.Tensor],
    source: Path | str,
    *,
    describes: str = "its config",
) -> None:
    """Raise :class:`CorruptFileError` unless ``tensors`` has exactly the expected names/shapes.

    Args:
        shapes: The expected ``{name: shape}``.
        tensors: The tensors read from ``source``.
        source: The file the tensors came from (named in the error).
        describes: What the shapes come from, for the message (e.g. ``"its config (topk,
            d_in=8, d_latent=32)"``).
    """
    shapes = {name: tuple(shape) for name, shape in shapes.items()}
    missing = sorted(set(shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(shapes))
    wrong = {
        name: (tuple(tensors[name].shape), shape)
        for name, shape in shapes.items()
        if name in tensors and tuple(tensors[name].shape) != shape
    }
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing tensors {missing}")
        if unexpected:
            details.append(f"unexpected tensors {unexpected}")
        for name, (got, want) in wrong.items():
            details.append(f"{name} has shape {got}, config implies {want}")
        raise CorruptFileError(f"{source} does not match {describes}: " + "; ".join(details))
