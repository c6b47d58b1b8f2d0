"""Gemma Scope (Google DeepMind) JumpReLU SAEs and transcoders.

- v1 (Gemma 2): ``params.npz`` with ``W_enc [d, F], b_enc, W_dec [F, d], b_dec, threshold``
  and no config. Read with ``numpy.load(allow_pickle=False)``.
- v2 (Gemma Scope 2, Gemma 3): ``params.safetensors`` with lower-case ``w_enc, w_dec``
  (same layout), ``b_enc, b_dec, threshold`` and, for affine transcoders,
  ``affine_skip_connection [d_in, d_out]``, plus ``config.json`` (``model_name, width, l0,
  architecture: "jump_relu", type: "sae"|"transcoder", hf_hook_point_in/out,
  affine_connection``).

Both encode ``relu(pre) * (pre > threshold)`` with ``pre = x @ W_enc + b_enc`` (no input
centring) and decode ``codes @ W_dec + b_dec``; Gemma Scope 2's reference forward adds
``x @ affine_skip_connection``, so our ``W_skip [d_out, d_in]`` is its transpose. Copying
the tensor unchanged into a ``W_skip`` applied as ``x @ W_skip.T`` (as a plain key rename
would) transposes the skip: it is only right for a symmetric matrix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from lightning_interp.dictionaries.base import Dictionary
from lightning_interp.errors import UnsupportedFormatError
from lightning_interp.zoo.formats import sitenames
from lightning_interp.zoo.formats._common import (
    build_dictionary,
    matrix,
    provenance,
    read_json,
    read_npz,
    read_weights,
    require_config_and_weights,
    require_file,
    require_tensors,
)
from lightning_interp.zoo.formats._fields import ConfigFields
from lightning_interp.zoo.formats.base import DeviceLike, DtypeLike, FormatAdapter
from lightning_interp.zoo.formats.registry import register_format

V1_WEIGHTS = "params.npz"
V2_WEIGHTS = "params.safetensors"
V2_CONFIG = "config.json"
_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")


def _canonical_names(raw: dict[str, Tensor]) -> dict[str, Tensor]:
    """``w_enc``/``w_dec`` (v2, some v1 files) -> ``W_enc``/``W_dec``."""
    return {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in raw.items()}


class GemmaScopeFormat(FormatAdapter):
    """Gemma Scope v1 (``params.npz``) and v2 (``params.safetensors`` + ``config.json``)."""

    name = "gemma_scope"
    required_files = ((V1_WEIGHTS, V2_WEIGHTS),)  # either version's weights
    optional_files = (V2_CONFIG,)  # v2 only; its reader requires it

    def read(
        self, folder: Path, *, device: DeviceLike = None, dtype: DtypeLike = None
    ) -> Dictionary:
        """Read either version into a native JumpReLU dictionary."""
        if (folder / V2_WEIGHTS).is_file():
            return self._read_v2(folder, device=device, dtype=dtype)
        weights_path = require_file(folder, V1_WEIGHTS, self.name)
        tensors = _canonical_names(read_npz(weights_path))
        require_tensors(tensors, list(_NAMES), weights_path)
        fields = self._fields(tensors, weights_path, transcoder=False)
        fields["provenance"] = provenance(
            trained_as=f"{self.name}:v1",
            extra={"format": self.name, "version": 1, "folder": folder.name},
        )
        return build_dictionary(
            "jumprelu",
            fields,
            {k: tensors[k] for k in _NAMES},
            weights_path=weights_path,
            config_path=None,
            device=device,
            dtype=dtype,
        )

    def _read_v2(self, folder: Path, *, device: DeviceLike, dtype: DtypeLike) -> Dictionary:
        cfg_path, weights_path = require_config_and_weights(
            folder, V2_CONFIG, V2_WEIGHTS, self.name
        )
        cfg = ConfigFields(read_json(cfg_path), cfg_path)
        architecture = cfg.string("architecture", "jump_relu")
        if architecture != "jump_relu":
            raise UnsupportedFormatError(
                f"{cfg_path}: architecture {architecture!r} is not supported (only jump_relu)"
            )
        raw = _canonical_names(read_weights(weights_path))
        require_tensors(raw, list(_NAMES), weights_path)
        tensors = {k: raw[k] for k in _NAMES}
        hook_in = cfg.string("hf_hook_point_in", None)
        hook_out = cfg.string("hf_hook_point_out", None)
        kind = cfg.string("type", "sae")
        transcoder = kind == "transcoder" or (hook_out not in (None, hook_in))
        fields = self._fields(tensors, weights_path, transcoder=transcoder)
        if "affine_skip_connection" in raw:
            # Gemma Scope applies x @ A with A [d_in, d_out]; ours is x @ W_skip.T.
            tensors["W_skip"] = matrix(raw, "affine_skip_connection", weights_path).T
            fields["skip_connection"] = True
        fields["provenance"] = provenance(
            trained_as=f"{self.name}:v2-{kind}",
            backbone=cfg.string("model_name", None),
            site=sitenames.from_hf_module(hook_in),
            site_out=sitenames.from_hf_module(hook_out) if transcoder else None,
            extra={
                "format": self.name,
                "version": 2,
                "hf_hook_point_in": hook_in,
                "hf_hook_point_out": hook_out,
                "l0": cfg.number("l0", None),
                "width": cfg.integer("width", None),
            },
        )
        return build_dictionary(
            "jumprelu",
            fields,
            tensors,
            weights_path=weights_path,
            config_path=cfg_path,
            device=device,
            dtype=dtype,
        )

    @staticmethod
    def _fields(tensors: dict[str, Tensor], path: Path, *, transcoder: bool) -> dict[str, Any]:
        d_in, d_latent = matrix(tensors, "W_enc", path).shape
        matrix(tensors, "W_dec", path)  # its last size is the output width
        return {
            "d_in": int(d_in),
            "d_latent": int(d_latent),
            "d_out": int(tensors["W_dec"].shape[-1]) if transcoder else None,
            "apply_b_dec_to_input": False,  # Gemma Scope never centres the input
            "normalize_decoder": False,
        }


GEMMA_SCOPE = register_format(GemmaScopeFormat())
