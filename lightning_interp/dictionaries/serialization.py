"""Native on-disk format: ``config.json`` + ``model.safetensors`` in one folder.

**Crash consistency.** Each file is written under a temporary name beside its target and
renamed into place (one atomic rename per file), weights first and config last. Two renames
cannot be one atomic step, so the weights carry what is needed to detect and repair the
window between them: their safetensors metadata holds the config text written with them
(:data:`PAIRED_CONFIG_KEY`) and the digest of the ``config.json`` they replace
(:data:`REPLACED_CONFIG_KEY`). A process killed between the two renames leaves new weights
beside the previous ``config.json``; the loader sees that ``config.json`` is exactly the one
the weights replaced and loads the weights with the config saved inside them (the new
dictionary, whole), with a warning. A kill before the weights' rename leaves the previous
dictionary untouched. So a load sees the old dictionary or the new one, never a mix. A
``config.json`` edited by hand after a complete save matches neither digest and is read as
written. Other files in the folder (``metrics.json``, notes) are never touched, and the next
save removes temporaries left by a killed writer (their names carry the writer's process
id; those of live processes are kept; see :mod:`lightning_interp.dictionaries.atomic`).
Writing a sibling folder and swapping it in was the alternative; it would have to copy or
move every other file of the folder and cannot swap atomically on every platform.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lightning_interp.dictionaries.atomic import (
    atomic_write,
    remove_stale_temporaries,
    sync_folder,
)
from lightning_interp.dictionaries.base import Dictionary
from lightning_interp.dictionaries.config import DictionaryConfig, dtype_from_name, dtype_name
from lightning_interp.dictionaries.registry import get_dictionary_class
from lightning_interp.errors import (
    ConfigError,
    CorruptFileError,
    DictionaryNotFoundError,
    NonFiniteError,
)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
#: The ``format`` field of a concept-bottleneck head's ``config.json`` (heads share our
#: file names; this marker tells the two apart).
HEAD_FORMAT = "lightning-interp-concept-head"
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


def save_dictionary(dictionary: Dictionary, directory: str | os.PathLike[str]) -> Path:
    """Write a dictionary as ``config.json`` + ``model.safetensors`` in ``directory``.

    Args:
        dictionary: The dictionary to save, as is (no inference-form conversion).
        directory: Target folder, created if needed.

    Returns:
        The folder path.

    Raises:
        NonFiniteError: a weight is NaN or infinite; nothing is written.
    """
    tensors = {k: v.detach().cpu().contiguous() for k, v in dictionary.export_tensors().items()}
    text = json.dumps(dictionary.config_for_save().to_dict(), indent=2, sort_keys=False) + "\n"
    metadata = {
        "format": "pt",
        "architecture": dictionary.architecture,
        "library": "lightning-interp",
    }
    return write_weights_and_config(
        Path(directory),
        tensors,
        text,
        weights_name=WEIGHTS_NAME,
        config_name=CONFIG_NAME,
        metadata=metadata,
    )


def read_config(folder: Path) -> dict[str, Any]:
    """Read and parse ``config.json`` in ``folder``, with typed errors.

    Raises:
        DictionaryNotFoundError: the folder has no ``config.json``.
        CorruptFileError: the file is not JSON, has no ``architecture``, or describes a
            concept-bottleneck head (which shares our file names) rather than a dictionary.
    """
    path = folder / CONFIG_NAME
    if not path.is_file():
        present = sorted(p.name for p in folder.iterdir())
        raise DictionaryNotFoundError(
            f"{folder} has no {CONFIG_NAME} (found: {present or 'nothing'}); a lightning-interp "
            f"dictionary folder holds {CONFIG_NAME} and {WEIGHTS_NAME}, as written by "
            f"Dictionary.save_pretrained"
        )
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(
            f"{path} is not valid JSON ({err}); re-save or re-download it"
        ) from err
    if isinstance(values, dict) and values.get("format") == HEAD_FORMAT:
        raise CorruptFileError(
            f"{folder} holds a concept-bottleneck head, not a dictionary; load it with "
            f"lightning_interp.zoo.load_head({str(folder)!r})"
        )
    if not isinstance(values, dict) or "architecture" not in values:
        raise CorruptFileError(
            f"{path} has no 'architecture' key; is it a lightning-interp config?"
        )
    return values


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON object from ``path`` with typed errors.

    Raises:
        DictionaryNotFoundError: the file is missing.
        CorruptFileError: the file is not UTF-8 JSON, or holds something other than an object.
    """
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise DictionaryNotFoundError(f"{path} is missing") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{path} is not valid JSON ({err}); re-download it") from err
    if not isinstance(values, dict):
        raise CorruptFileError(f"{path} holds a JSON {type(values).__name__}, not an object")
    return values


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

    If a save was interrupted between its two renames (see the module docstring), the
    config file is still the one the new weights replaced: the config saved inside the
    weights is returned instead, with a warning, so the pair loaded is the new one whole.

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
        f"the two files); loading the weights with the config saved inside them. Save the "
        f"dictionary again to rewrite {config_path.name}",
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
    expected: Dictionary | Mapping[str, tuple[int, ...]],
    tensors: Mapping[str, torch.Tensor],
    source: Path | str,
) -> None:
    """Raise :class:`CorruptFileError` unless ``tensors`` has exactly the expected names/shapes.

    Args:
        expected: A dictionary (its :meth:`~Dictionary.expected_tensor_shapes` are
            expected), or a plain ``{name: shape}`` map.
        tensors: The tensors read from ``source``.
        source: The file the tensors came from (named in the error).
    """
    if isinstance(expected, Dictionary):
        dictionary = expected
        shapes = dictionary.expected_tensor_shapes()
        describes = (
            f"its config ({dictionary.architecture}, d_in={dictionary.d_in}, "
            f"d_latent={dictionary.d_latent})"
        )
    else:
        shapes = {name: tuple(shape) for name, shape in expected.items()}
        describes = "its config"
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


def build_from_tensors(
    cls: type[Dictionary],
    values: Mapping[str, Any],
    read_tensors: Callable[[], Mapping[str, torch.Tensor]],
    *,
    config_source: Path | str,
    weights_source: Path | str,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    config_hint: str = "",
    mismatch_hint: Callable[[DictionaryConfig], str] | None = None,
) -> Dictionary:
    """Build a dictionary of class ``cls`` from config values and tensors in our layout.

    The config is validated before ``read_tensors`` is called, so a bad config is reported
    first. The dictionary is built on the meta device (no throw-away random init), the
    tensors checked against the config's names and shapes and assigned in place.

    Args:
        cls: The dictionary class (from the registry).
        values: Config fields, as ``config.json`` holds them.
        read_tensors: Returns the tensors, named as :meth:`Dictionary.export_tensors` does.
        config_source: Where ``values`` came from (named in errors).
        weights_source: Where the tensors came from (named in errors).
        device: Where to put the parameters (default: CPU).
        dtype: Convert the parameters to this dtype (default: the config's ``dtype``).
        config_hint: Appended to the error for invalid config values.
        mismatch_hint: Given the parsed config, text appended to a name/shape mismatch error.

    Returns:
        The dictionary, in eval mode, its ``config.dtype`` the dtype it now has.

    Raises:
        CorruptFileError: the values are invalid, contradict the tensors, or the tensors
            are not floating point or not finite.
    """
    try:
        config = cls.config_class.from_dict(dict(values))
    except ConfigError as err:
        raise CorruptFileError(f"{config_source}: {err}{config_hint}") from err
    tensors = read_tensors()
    with torch.device("meta"):
        dictionary = cls(config)
    try:
        check_tensors(dictionary, tensors, weights_source)
    except CorruptFileError as err:
        if mismatch_hint is None:
            raise
        raise CorruptFileError(f"{err}{mismatch_hint(config)}") from err
    check_weight_values(tensors, weights_source)
    target = dtype_from_name(dtype) if dtype is not None else dtype_from_name(config.dtype)
    converted = {k: v.to(target).contiguous() for k, v in tensors.items()}
    dictionary.import_tensors(converted, assign=True)
    dictionary = dictionary.to(dtype=target, device=device or "cpu")
    dictionary.config = config.replace(dtype=dtype_name(target))
    return dictionary.eval()


def load_folder(
    directory: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> Dictionary:
    """Load a dictionary from a native folder.

    Args:
        directory: Folder holding ``config.json`` and ``model.safetensors``.
        device: Where to put the parameters (default: CPU).
        dtype: Convert parameters to this dtype (default: the dtype they were saved in).

    Returns:
        The dictionary, in eval mode.

    Raises:
        DictionaryNotFoundError: the folder or one of its files is missing.
        CorruptFileError: a file cannot be parsed or contradicts the config.
        UnknownArchitectureError: the config names an unregistered architecture.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise DictionaryNotFoundError(f"dictionary folder {folder} does not exist")
    values = paired_config(read_config(folder), folder / CONFIG_NAME, folder / WEIGHTS_NAME)
    return build_from_tensors(
        get_dictionary_class(values["architecture"]),
        values,
        lambda: read_weights(folder / WEIGHTS_NAME),
        config_source=folder / CONFIG_NAME,
        weights_source=folder / WEIGHTS_NAME,
        device=device,
        dtype=dtype,
    )
