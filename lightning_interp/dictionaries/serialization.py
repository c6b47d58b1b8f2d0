"""Native on-disk format: ``config.json`` + ``model.safetensors`` in one folder.

Writes are atomic per file (temporary name, then ``os.replace``), weights first and
config last, so a reader never sees a config without the weights it describes and an
interrupted save leaves no partial file behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lightning_interp.dictionaries.base import Dictionary
from lightning_interp.dictionaries.config import DictionaryConfig, dtype_from_name, dtype_name
from lightning_interp.dictionaries.registry import get_dictionary_class
from lightning_interp.errors import ConfigError, CorruptFileError, DictionaryNotFoundError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
#: The ``format`` field of a concept-bottleneck head's ``config.json`` (heads share our
#: file names; this marker tells the two apart).
HEAD_FORMAT = "lightning-interp-concept-head"


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
        CorruptFileError: the values are invalid, or contradict the tensors.
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
    target = dtype_from_name(dtype) if dtype is not None else dtype_from_name(config.dtype)
    converted = {
        k: v.to(target).contiguous() if v.is_floating_point() else v for k, v in tensors.items()
    }
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
    values = read_config(folder)
    return build_from_tensors(
        get_dictionary_class(values["architecture"]),
        values,
        lambda: read_weights(folder / WEIGHTS_NAME),
        config_source=folder / CONFIG_NAME,
        weights_source=folder / WEIGHTS_NAME,
        device=device,
        dtype=dtype,
    )
