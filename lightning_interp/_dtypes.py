"""Neutral dtype helpers: the floating dtypes weights and activations may be stored in.

Dictionaries, backbones, activation streams and caches all name dtypes in configs
(``"bfloat16"``, ``"torch.float32"``); they share these two functions so a name means the
same everywhere. This module imports nothing else of the library but :mod:`errors` and the
neutral :mod:`._validation`.
"""

from __future__ import annotations

import torch

from lightning_interp._validation import describe
from lightning_interp.errors import ConfigError, ConfigTypeError

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def dtype_from_name(name: str | torch.dtype) -> torch.dtype:
    """Return the torch dtype for a name such as ``"bfloat16"`` or ``"torch.float32"``.

    Args:
        name: A dtype name (with or without the ``torch.`` prefix), or a torch dtype.

    Returns:
        The floating torch dtype.

    Raises:
        ConfigTypeError: ``name`` is neither a string nor a torch dtype.
        ConfigError: the name is not a floating dtype weights can be held in.

    Example:
        >>> dtype_from_name("torch.bfloat16")
        torch.bfloat16
    """
    if isinstance(name, torch.dtype):
        if name not in _DTYPES.values():
            raise ConfigError(
                f"dtype {name} is not supported: dictionary weights are floating point; "
                f"use one of {sorted(_DTYPES)}"
            )
        return name
    if not isinstance(name, str):
        raise ConfigTypeError(
            f"dtype must be a string such as 'float32', got {describe(name)}; "
            f"use one of {sorted(_DTYPES)}"
        )
    key = name.removeprefix("torch.")
    if key not in _DTYPES:
        raise ConfigError(
            f"unknown dtype {name!r}: dictionary weights are floating point; "
            f"use one of {sorted(_DTYPES)}"
        )
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """Return the short name (``"float32"``) of a torch dtype.

    Example:
        >>> dtype_name(torch.bfloat16)
        'bfloat16'
    """
    return str(dtype).removeprefix("torch.")
