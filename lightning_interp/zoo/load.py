"""One function to load a dictionary from wherever it lives."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lightning_interp.dictionaries.base import Dictionary
from lightning_interp.dictionaries.serialization import load_folder
from lightning_interp.errors import DictionaryNotFoundError


def load_dictionary(
    source: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> Dictionary:
    """Load a dictionary saved with :meth:`Dictionary.save_pretrained`.

    Args:
        source: A local folder holding ``config.json`` and ``model.safetensors``.
        device: Device for the parameters (default CPU).
        dtype: Convert the parameters to this dtype (default: as saved).

    Returns:
        The dictionary in eval mode.

    Raises:
        DictionaryNotFoundError: ``source`` is not an existing folder, or lacks a file.
        CorruptFileError: a file is unreadable or contradicts its config.

    Example:
        >>> import tempfile
        >>> from lightning_interp import create_dictionary, load_dictionary
        >>> sae = create_dictionary("topk", d_in=8, d_latent=32, k=2)
        >>> folder = tempfile.mkdtemp()
        >>> sae.save_pretrained(folder)
        >>> load_dictionary(folder).config.k
        2
    """
    path = Path(source)
    if not path.is_dir():
        raise DictionaryNotFoundError(
            f"{str(source)!r} is not a local folder; pass the folder written by "
            f"Dictionary.save_pretrained (loading from the Hugging Face Hub is not part of "
            f"this release yet)"
        )
    return load_folder(path, device=device, dtype=dtype)
