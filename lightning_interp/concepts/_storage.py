"""Reading the folders concept banks and heads are saved in: a JSON config and safetensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from lightning_interp.errors import CorruptFileError, DictionaryNotFoundError


def read_saved_folder(
    folder: Path, config_name: str, weights_name: str, *, what: str, hint: str
) -> tuple[Path, Any, dict[str, Tensor]]:
    """Read the JSON config and the safetensors weights saved together in ``folder``.

    Args:
        folder: The saved folder.
        config_name: Base name of the JSON config file.
        weights_name: Base name of the safetensors file.
        what: What the folder holds (e.g. ``"concept bank"``), for error messages.
        hint: How to write such a folder, appended to the missing-file error.

    Returns:
        ``(config_path, config, tensors)``: the config's path, its parsed JSON and the tensors.

    Raises:
        DictionaryNotFoundError: either file is missing.
        CorruptFileError: either file cannot be parsed.
    """
    config_path, weights_path = folder / config_name, folder / weights_name
    if not (config_path.is_file() and weights_path.is_file()):
        raise DictionaryNotFoundError(f"{folder} lacks {config_name} or {weights_name}; {hint}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        tensors = load_file(str(weights_path))
    except (json.JSONDecodeError, SafetensorError) as error:
        raise CorruptFileError(f"cannot read the {what} in {folder}: {error}") from None
    return config_path, config, tensors
