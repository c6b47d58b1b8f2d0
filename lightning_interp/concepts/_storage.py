"""The folders concept banks and heads are saved in: a JSON config and safetensors.

Both are written by :func:`~lightning_interp._weights.write_weights_and_config`, as
dictionaries are, and read back here through
:func:`~lightning_interp._weights.paired_config`: a save killed between its two files
loads as the old object or the new one, never new weights under an old config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from lightning_interp._io import read_json
from lightning_interp._weights import paired_config, read_weights
from lightning_interp.errors import DictionaryNotFoundError

#: The ``format`` field of a concept-bottleneck head's ``config.json`` (heads share the file
#: names of native dictionaries; this marker tells the two apart).
HEAD_FORMAT = "lightning-interp-concept-head"


def read_saved_folder(
    folder: Path, config_name: str, weights_name: str, *, what: str, hint: str
) -> tuple[Path, dict[str, Any], dict[str, Tensor]]:
    """Read the JSON config and the safetensors weights saved together in ``folder``.

    If a save was interrupted between the two files, the config saved inside the weights
    is returned (with a warning), so config and tensors always belong together.

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
    config = paired_config(read_json(config_path), config_path, weights_path)
    return config_path, config, read_weights(weights_path)
