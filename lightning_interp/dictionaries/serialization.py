"""Native on-disk format: ``config.json`` + ``model.safetensors`` in one folder.

Writes are atomic per file (temporary name, then ``os.replace``), weights first and
config last, so a reader never sees a config without the weights it describes and an
interrupted save leaves no partial file behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lightning_interp.dictionaries.base import Dictionary
from lightning_interp.dictionaries.config import dtype_from_name, dtype_name
from lightning_interp.dictionaries.registry import get_dictionary_class
from lightning_interp.errors import ConfigError, CorruptFileError, DictionaryNotFoundError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    The temporary file is removed if ``write`` fails, so no half-written file remains.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_dictionary(dictionary: Dictionary, directory: str | os.PathLike[str]) -> Path:
    """Write a dictionary as ``config.json`` + ``model.safetensors`` in ``directory``.

    Args:
        dictionary: The dictionary to save, as is (no inference-form conversion).
        directory: Target folder, created if needed.

    Returns:
        The folder path.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in dictionary.export_tensors().items()}
    config = dictionary.config_for_save().to_dict()
    metadata = {
        "format": "pt",
        "architecture": dictionary.architecture,
        "library": "lightning-interp",
    }
    atomic_write(folder / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata=metadata))
    text = json.dumps(config, indent=2, sort_keys=False) + "\n"
    atomic_write(folder / CONFIG_NAME, lambda p: p.write_text(text, encoding="utf-8"))
    return folder


def read_config(folder: Path) -> dict[str, Any]:
    """Read and parse ``config.json`` in ``folder``, with typed errors."""
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
    if not isinstance(values, dict) or "architecture" not in values:
        raise CorruptFileError(
            f"{path} has no 'architecture' key; is it a lightning-interp config?"
        )
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


def check_tensors(
    dictionary: Dictionary, tensors: dict[str, torch.Tensor], source: Path | str
) -> None:
    """Raise :class:`CorruptFileError` unless ``tensors`` has exactly the expected names/shapes."""
    expected = dictionary.expected_tensor_shapes()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = {
        name: (tuple(tensors[name].shape), shape)
        for name, shape in expected.items()
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
        raise CorruptFileError(
            f"{source} does not match its config ({dictionary.architecture}, d_in="
            f"{dictionary.d_in}, d_latent={dictionary.d_latent}): " + "; ".join(details)
        )


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
    values = read_config(folder)
    cls = get_dictionary_class(values["architecture"])
    try:
        config = cls.config_class.from_dict(values)
    except ConfigError as err:
        raise CorruptFileError(f"{folder / CONFIG_NAME}: {err}") from err
    tensors = read_weights(folder / WEIGHTS_NAME)
    # Build on the meta device: no throw-away random init of large matrices.
    with torch.device("meta"):
        dictionary = cls(config)
    check_tensors(dictionary, tensors, folder / WEIGHTS_NAME)
    dictionary.import_tensors(tensors, assign=True)
    target_dtype = dtype_from_name(dtype) if dtype is not None else dtype_from_name(config.dtype)
    dictionary = dictionary.to(dtype=target_dtype, device=device or "cpu")
    dictionary.config = config.replace(dtype=dtype_name(target_dtype))
    return dictionary.eval()
