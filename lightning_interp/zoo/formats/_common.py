"""Pieces every format adapter shares: safe file readers and one way to build a dictionary.

Readers here never unpickle: JSON with :mod:`json`, weights with safetensors,
``.npz`` with ``allow_pickle=False`` and foreign ``.pt`` state dicts with
``torch.load(..., weights_only=True)``. Each failure becomes a typed error naming the file.
"""

from __future__ import annotations

import dataclasses
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_interp._dtypes import dtype_name
from lightning_interp._io import read_json as read_json  # re-exported
from lightning_interp._weights import read_weights as read_weights
from lightning_interp.dictionaries.base import Dictionary
from lightning_interp.dictionaries.config import Provenance
from lightning_interp.dictionaries.registry import get_dictionary_class
from lightning_interp.dictionaries.serialization import build_from_tensors
from lightning_interp.errors import (
    CorruptFileError,
    DictionaryNotFoundError,
    UnsafeFileError,
)
from lightning_interp.zoo.formats.base import DeviceLike, DtypeLike


def require_file(folder: Path, name: str, fmt: str) -> Path:
    """Return ``folder / name``, or raise :class:`DictionaryNotFoundError` listing the folder."""
    path = folder / name
    if not path.is_file():
        present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise DictionaryNotFoundError(
            f"{path} is missing (folder holds: {present or 'nothing'}); a {fmt} dictionary "
            f"folder needs it; re-download the complete folder"
        )
    return path


def require_config_and_weights(
    folder: Path, config_name: str, weights_name: str, fmt: str
) -> tuple[Path, Path]:
    """Return the paths of a folder's config and weights files, each checked to exist.

    Args:
        folder: The dictionary folder.
        config_name: Base name of the config file (checked first).
        weights_name: Base name of the weights file.
        fmt: The format's name, for the error message.

    Returns:
        ``(config_path, weights_path)``.

    Raises:
        DictionaryNotFoundError: either file is missing.
    """
    return require_file(folder, config_name, fmt), require_file(folder, weights_name, fmt)


def read_pt_state_dict(path: Path) -> dict[str, Any]:
    """Read a foreign ``.pt`` state dict with ``torch.load(weights_only=True)``.

    Raises:
        UnsafeFileError: the file needs arbitrary unpickling (a crafted or exotic file).
        CorruptFileError: the file is not a readable torch archive, or not a dict.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only=True refuses any global outside torch's allow-list, before running it.
        raise UnsafeFileError(
            f"{path} asks to unpickle objects other than tensors and plain containers, "
            f"which could run code; it is refused. Convert it to safetensors where it was "
            f"made, from a trusted source ({str(err).splitlines()[0]})"
        ) from err
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise CorruptFileError(
            f"{path} is not a readable torch state dict ({err}); re-download it"
        ) from err
    if not isinstance(state, dict):
        raise CorruptFileError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def read_npz(path: Path) -> dict[str, Tensor]:
    """Read an ``.npz`` of arrays with ``allow_pickle=False``."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: torch.from_numpy(np.array(data[key])) for key in data.files}
    except ValueError as err:  # object arrays need pickling: refused
        raise UnsafeFileError(f"{path} holds object arrays that need unpickling ({err})") from err
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise CorruptFileError(f"{path} is not a readable .npz file ({err})") from err
    except TypeError as err:  # string or other non-numeric arrays: no tensor holds them
        raise CorruptFileError(
            f"{path} holds an array that is not numeric ({err}); re-download the file"
        ) from err


def require_tensors(tensors: dict[str, Any], names: list[str], path: Path) -> None:
    """Raise CorruptFileError naming the tensors of ``names`` missing from ``tensors``."""
    missing = [n for n in names if not isinstance(tensors.get(n), Tensor)]
    if missing:
        present = sorted(k for k, v in tensors.items() if isinstance(v, Tensor))
        raise CorruptFileError(
            f"{path} lacks tensor(s) {missing} (has {present}); it is not a complete "
            f"dictionary of this kind"
        )


def matrix(tensors: dict[str, Any], name: str, path: Path) -> Tensor:
    """``tensors[name]``, checked to be a matrix: readers transpose it or read sizes off it.

    Raises:
        CorruptFileError: it is missing or not 2-D.
    """
    require_tensors(tensors, [name], path)
    tensor = tensors[name]
    if tensor.ndim != 2:
        raise CorruptFileError(
            f"{path}: {name} must be a matrix (2-D), got shape {tuple(tensor.shape)}; "
            f"re-download the file"
        )
    return tensor


def build_dictionary(
    architecture: str,
    fields: dict[str, Any],
    tensors: dict[str, Tensor],
    *,
    weights_path: Path,
    config_path: Path | None,
    device: DeviceLike = None,
    dtype: DtypeLike = None,
) -> Dictionary:
    """Build a native dictionary from config fields and tensors in our names and layout.

    Args:
        architecture: A registered architecture name.
        fields: Config fields (``d_in``, ``d_latent``, ...); ``dtype`` defaults to ``W_dec``'s.
        tensors: Tensors named as :meth:`Dictionary.export_tensors` names them.
        weights_path: File the tensors came from (named in errors).
        config_path: File the fields came from (named in errors).
        device: Target device (default CPU).
        dtype: Target dtype (default: the file's).

    Raises:
        CorruptFileError: the fields are invalid, or contradict the tensors' names or shapes.
    """
    w_dec = tensors.get("W_dec")
    # A non-float W_dec is reported by build_from_tensors, naming the tensor and its dtype.
    floating = isinstance(w_dec, Tensor) and w_dec.is_floating_point()
    saved = dtype_name(w_dec.dtype) if floating else "float32"
    where = f" and {config_path}" if config_path else ""

    def mismatch_hint(config: Any) -> str:
        return (
            f". {weights_path}{where} disagree (d_in={config.d_in}, "
            f"d_latent={config.d_latent}, d_out={config.output_width}); re-download the "
            f"folder, or correct the config to the tensors' shapes"
        )

    return build_from_tensors(
        get_dictionary_class(architecture),
        {"dtype": saved, **fields},
        lambda: tensors,
        config_source=config_path or weights_path,
        weights_source=weights_path,
        device=device,
        dtype=dtype,
        config_hint="; fix or re-download that file",
        mismatch_hint=mismatch_hint,
    )


def provenance(
    *,
    trained_as: str,
    backbone: str | None = None,
    site: str | None = None,
    site_out: str | None = None,
    dataset: str | None = None,
    context_size: int | None = None,
    normalization: str = "none",
    extra: dict[str, Any] | None = None,
) -> Provenance:
    """A :class:`Provenance` with ``None`` for unknown values and JSON-safe ``extra``."""
    return Provenance(
        backbone=backbone or None,
        site=site,
        site_out=site_out,
        dataset=dataset or None,
        context_size=context_size or None,
        normalization=normalization,
        trained_as=trained_as,
        extra={k: v for k, v in (extra or {}).items() if v is not None},
    )


def record_input_normalization(dictionary: Dictionary, kind: str, source: Path) -> Dictionary:
    """Record (and warn) that ``dictionary`` expects per-input normalised activations.

    Per-input normalisations (SAELens ``layer_norm`` / ``constant_norm_rescale``, OpenAI's
    TopK layer norm) rescale each input by its own statistics and undo it on the output:
    not a linear map, so no weight folding can absorb them.
    """
    warnings.warn(
        f"{source}: the dictionary was trained on inputs normalised with {kind!r}, which "
        f"cannot be folded into its weights; normalise inputs yourself before encoding (and "
        f"undo it on the reconstruction). Recorded in config.provenance.normalization.",
        stacklevel=3,
    )
    prov = dataclasses.replace(dictionary.config.provenance, normalization=kind)
    dictionary.config = dictionary.config.replace(provenance=prov)
    return dictionary
