"""Reading the folders concept banks and heads are saved in: a JSON config and safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from lightning_interp.dictionaries.serialization import read_json, read_weights
from lightning_interp.errors import DictionaryNotFoundError


def read_saved_folder(
    folder: Path, config_name: str, weights_name: str, *, what: str, hint: str
) -> tuple[Path, dict[str, Any], dict[str, Tensor]]:
    """Read the JSON config and the safetensors weights saved together in ``folder``.

    Args:
        folder: The saved folder.
        config_name: Base name of the JSON config file.
        weights_name: Base name of the safetensors file.
        what: What the folder holds (e.g. ``"concept bank"``), for error messages.
        hint: How to write such a folder, appended to the missing-file error.

    Returns:
        ``(config_path, config, tensors)``: the config's path, its parsed JSON object and
        the tensors.

    Raises:
        DictionaryNotFoundError: either file is missing.
        CorruptFileError: either file cannot be parsed (the config is not a UTF-8 JSON
            object, or the weights are not a readable safetensors file).
    """
    config_path, weights_path = folder / config_name, folder / weights_name
    if not (config_path.is_file() and weights_path.is_file()):
        raise DictionaryNotFoundError(
            f"{folder} holds no {what}: it lacks {config_name} or {weights_name}; {hint}"
        )
    return config_path, read_json(config_path), read_weights(weights_path)
