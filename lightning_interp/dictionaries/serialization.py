"""Native on-disk format: ``config.json`` + ``model.safetensors`` in one folder.

The pair is written by :func:`~lightning_interp._weights.write_weights_and_config`, weights
first and config last, the weights carrying the config written with them, so a process killed
at any point leaves the old dictionary or the new one, never a mix (the full argument is in
:mod:`lightning_interp._weights`; concept heads and banks are stored the same way). This
module holds what is specific to dictionaries: the file names, saving a
:class:`~lightning_interp.dictionaries.base.Dictionary`, and building one from tensors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_interp._dtypes import dtype_from_name, dtype_name
from lightning_interp._weights import (
    check_tensors,
    check_weight_values,
    paired_config,
    read_weights,
    write_weights_and_config,
)
from lightning_interp.dictionaries.base import Dictionary
from lightning_interp.dictionaries.config import DictionaryConfig
from lightning_interp.dictionaries.registry import get_dictionary_class
from lightning_interp.errors import ConfigError, CorruptFileError, DictionaryNotFoundError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# A concept-bottleneck head's config.json carries this ``format`` (heads share our file
# names). It is defined by lightning_interp.concepts._storage.HEAD_FORMAT; dictionaries may
# not import concepts/, so the value is repeated here and a test keeps the two equal.
_HEAD_FORMAT = "lightning-interp-concept-head"


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
    return _dictionary_config(values, path)


def _dictionary_config(values: Any, path: Path) -> dict[str, Any]:
    """``values`` if they describe a dictionary, else a :class:`CorruptFileError`."""
    if isinstance(values, dict) and values.get("format") == _HEAD_FORMAT:
        raise CorruptFileError(
            f"{path.parent} holds a concept-bottleneck head, not a dictionary; load it with "
            f"lightning_interp.zoo.load_head({str(path.parent)!r})"
        )
    if not isinstance(values, dict) or "architecture" not in values:
        raise CorruptFileError(
            f"{path} has no 'architecture' key; is it a lightning-interp config?"
        )
    return values


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
    describes = (
        f"its config ({dictionary.architecture}, d_in={dictionary.d_in}, "
        f"d_latent={dictionary.d_latent})"
    )
    try:
        check_tensors(
            dictionary.expected_tensor_shapes(), tensors, weights_source, describes=describes
        )
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
    config_path = folder / CONFIG_NAME
    values = paired_config(read_config(folder), config_path, folder / WEIGHTS_NAME)
    # A head saved over a dictionary and killed between its two writes pairs a dictionary
    # config with head weights: the config they carry is checked like the file's.
    values = _dictionary_config(values, config_path)
    return build_from_tensors(
        get_dictionary_class(values["architecture"]),
        values,
        lambda: read_weights(folder / WEIGHTS_NAME),
        config_source=config_path,
        weights_source=folder / WEIGHTS_NAME,
        device=device,
        dtype=dtype,
    )
