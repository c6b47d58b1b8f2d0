"""SAELens folders: ``cfg.json`` + ``sae_weights.safetensors`` (read all architectures, write v6).

Checked against SAELens 6.18 (``sae_lens/saes/*.py``, ``loading/pretrained_sae_loaders.py``):
tensors already use our names and layout (``W_enc [d_in, F]``, ``W_dec [F, d_out]``), so
reading is a matter of mapping the config:

- ``standard``/``topk``/``jumprelu``/``gated`` map to ours; BatchTopK and Matryoshka SAEs are
  saved by SAELens as ``jumprelu`` with a constant threshold, and load as such.
- ``transcoder``/``skip_transcoder``/``jumprelu_transcoder``/``jumprelu_skip_transcoder``
  never subtract ``b_dec`` from the input (SAELens's ``Transcoder.process_sae_in`` skips it
  and its config rejects ``apply_b_dec_to_input=True``); the skip adds ``x @ W_skip.T`` on
  the raw input. ``jumprelu_skip_transcoder`` is in SAELens 6.54 (cross-checked against it
  by ``tests/zoo/test_peer_crosscheck.py``).
- TopK with ``rescale_acts_by_decoder_norm`` is folded on read (``W_enc``, ``b_enc`` times
  the decoder norms, ``W_dec`` rows divided by them): the same codes and reconstruction.
- ``matching_pursuit`` (tied: ``W_dec`` and ``b_dec`` only) maps to our ``mp``:
  ``max_iterations`` (default ``d_in``) is ``k``, and ``residual_threshold`` and
  ``stop_on_duplicate_support`` keep SAELens's defaults (1e-2, true). SAELens takes the
  decoder rows to be unit-norm and adds ``b_dec`` only with ``apply_b_dec_to_input``; other
  rows are refused both ways, and an unused ``b_dec`` reads as zero.
- Pre-6.0 flat configs (``hook_point``, ``activation_fn_str``, ``activation_fn_kwargs.k``,
  boolean ``normalize_activations``, a ``scaling_factor`` tensor) are upgraded first, as
  SAELens's ``handle_pre_6_0_config`` does.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_interp._dtypes import dtype_name
from lightning_interp._weights import paired_config, write_weights_and_config
from lightning_interp.dictionaries.base import Dictionary
from lightning_interp.errors import UnsupportedFormatError
from lightning_interp.zoo.formats import sitenames
from lightning_interp.zoo.formats._common import (
    build_dictionary,
    provenance,
    read_json,
    read_weights,
    record_input_normalization,
    require_config_and_weights,
)
from lightning_interp.zoo.formats._fields import ConfigFields
from lightning_interp.zoo.formats.base import DeviceLike, DtypeLike, FormatAdapter
from lightning_interp.zoo.formats.registry import register_format

CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae_weights.safetensors"
SCALER_NAME = "activation_scaler.json"
# Files of SAELens folders the reader never needs: feature sparsities (pretrained releases)
# and the trainer's state (checkpoints; a pickle, never read).
_COMPANIONS = ("sparsity.safetensors", "trainer_state.pt")
#: The SAELens release whose folder layout :meth:`SAELensFormat.write` reproduces.
SAELENS_VERSION = "6.18.0"
#: Metadata key under which we keep our full config, so native -> SAELens -> native is exact.
STASH_KEY = "lightning_interp"

# SAELens architecture -> ours. The transcoders are ReLU/JumpReLU dictionaries with d_out.
_ARCHITECTURES = {
    "standard": "standard",
    "topk": "topk",
    "jumprelu": "jumprelu",
    "gated": "gated",
    "transcoder": "standard",
    "skip_transcoder": "standard",
    "jumprelu_transcoder": "jumprelu",
    "jumprelu_skip_transcoder": "jumprelu",
    "matching_pursuit": "mp",
}
_TRANSCODERS = {"transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"}
_SKIP_TRANSCODERS = {"skip_transcoder", "jumprelu_skip_transcoder"}
# Keys SAELens moves from a flat pre-6.0 config into ``metadata`` (LLM_METADATA_KEYS).
_METADATA_KEYS = {
    "model_name", "hook_name", "model_class_name", "hook_head_index",
    "model_from_pretrained_kwargs", "prepend_bos", "exclude_special_tokens",
    "neuronpedia_id", "context_size", "seqpos_slice", "dataset_path", "sae_lens_version",
    "sae_lens_training_version", "hook_name_out", "hook_head_index_out",
}  # fmt: skip


def _major(version: Any) -> int:
    match = re.match(r"\s*(\d+)", str(version or ""))
    return int(match.group(1)) if match else 0


def upgrade_config(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """Return a v6-shaped config (``metadata`` nested) from a v6 or flat pre-6.0 ``cfg.json``.

    Raises:
        CorruptFileError: a field the upgrade reads has the wrong type.
        UnsupportedFormatError: a pre-6.0 activation function with no equivalent here.
    """
    fields = ConfigFields(raw, path)
    given = fields.section("metadata").values
    version = raw.get("sae_lens_version") or given.get("sae_lens_version")
    if "metadata" in fields and _major(version) >= 6:
        return dict(raw)
    renames = {
        "hook_point": "hook_name",
        "hook_point_head_index": "hook_head_index",
        "activation_fn_str": "activation_fn",
    }
    flat = {renames.get(k, k): v for k, v in raw.items() if k != "metadata"}
    metadata = {**given, **{k: flat.pop(k) for k in list(flat) if k in _METADATA_KEYS}}
    flat_fields = ConfigFields(flat, path)
    activation = flat_fields.string("activation_fn", "relu")
    k = flat_fields.section("activation_fn_kwargs").integer("k", None)
    architecture = flat_fields.string("architecture", "standard")
    if activation == "topk" and k is not None:
        architecture, flat["k"] = "topk", k
    elif activation not in ("relu", None) and architecture == "standard":
        raise UnsupportedFormatError(
            f"{path}: activation_fn {activation!r} has no equivalent here (supported: relu, "
            f"topk with activation_fn_kwargs.k)"
        )
    normalize = flat.get("normalize_activations")
    if isinstance(normalize, bool) or normalize is None:
        # Pre-6.0 stored a boolean: True meant the April-update expected-norm scaling.
        normalize = "expected_average_only_in" if normalize else "none"
    hook = ConfigFields(metadata, path, "metadata.").string("hook_name", "")
    return {
        **flat,
        "architecture": architecture,
        "normalize_activations": normalize,
        "reshape_activations": flat.get(
            "reshape_activations", "hook_z" if "hook_z" in hook else "none"
        ),
        "apply_b_dec_to_input": flat.get("apply_b_dec_to_input", True),
        "metadata": metadata,
    }


def _fold_legacy_scaling(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Fold a pre-6.0 ``scaling_factor`` (codes times it before decoding) into ``W_dec`` rows."""
    tensors = dict(tensors)
    scale = tensors.pop("scaling_factor", None)
    if scale is not None and not torch.all(scale == 1):
        tensors["W_dec"] = tensors["W_dec"] * scale.to(tensors["W_dec"].dtype)[:, None]
    return tensors


def _fold_decoder_norm(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Fold ``rescale_acts_by_decoder_norm`` (SAELens TopK) into the weights.

    SAELens ranks ``pre * ||W_dec_i||`` and decodes ``codes / ||W_dec_i||``; scaling
    ``W_enc``/``b_enc`` by the norms and ``W_dec`` rows by their inverse gives a plain TopK SAE
    with the same codes and reconstruction.
    """
    norms = tensors["W_dec"].norm(dim=-1)
    return {
        **tensors,
        "W_enc": tensors["W_enc"] * norms,
        "b_enc": tensors["b_enc"] * norms,
        "W_dec": tensors["W_dec"] / norms[:, None],
    }


def _check_unit_rows(w_dec: Tensor, where: str) -> None:
    """SAELens's matching pursuit uses ``<r, W_dec[i]>`` as is: only unit rows mean MP."""
    norms = w_dec.detach().float().norm(dim=-1)
    if not torch.allclose(norms, torch.ones_like(norms), atol=1e-2, rtol=0):
        raise UnsupportedFormatError(
            f"{where}: SAELens's matching pursuit needs unit-norm decoder rows, these range "
            f"{float(norms.min()):.4g}..{float(norms.max()):.4g} (a folded activation scale?); "
            f"use format='native'"
        )


def _scaling_factor(folder: Path, cfg: ConfigFields) -> float | None:
    if "norm_scaling_factor" in cfg:
        return cfg.number("norm_scaling_factor", positive=True)
    scaler = folder / SCALER_NAME
    if scaler.is_file():
        return ConfigFields(read_json(scaler), scaler).number("scaling_factor", None, positive=True)
    return None


class SAELensFormat(FormatAdapter):
    """SAELens's per-SAE folder, pre-6.0 and v6."""

    name = "saelens"
    required_files = (CFG_NAME, WEIGHTS_NAME)  # sae_weights.safetensors beside cfg.json
    optional_files = (SCALER_NAME,)
    companion_files = _COMPANIONS
    can_write = True

    def read(
        self, folder: Path, *, device: DeviceLike = None, dtype: DtypeLike = None
    ) -> Dictionary:
        """Read a SAELens folder (any architecture) into a native dictionary."""
        cfg_path, weights_path = require_config_and_weights(
            folder, CFG_NAME, WEIGHTS_NAME, self.name
        )
        raw = paired_config(read_json(cfg_path), cfg_path, weights_path)
        cfg = ConfigFields(upgrade_config(raw, cfg_path), cfg_path)
        architecture = cfg.string("architecture", "standard")
        if architecture not in _ARCHITECTURES:
            raise UnsupportedFormatError(
                f"{cfg_path}: SAELens architecture {architecture!r} is not supported; "
                f"supported: {sorted(_ARCHITECTURES)}"
            )
        tensors = _fold_legacy_scaling(read_weights(weights_path))
        stash = cfg.section("metadata").values.get(STASH_KEY)
        stashed = (
            isinstance(stash, dict) and stash.get("architecture") == _ARCHITECTURES[architecture]
        )
        if stashed:
            # Written by us: the stash holds the exact config, training fields included.
            fields = {k: v for k, v in stash.items() if k != "architecture"}
        else:
            fields = self._fields(cfg, architecture, tensors)
            if architecture == "topk" and cfg.boolean("rescale_acts_by_decoder_norm", False):
                tensors = _fold_decoder_norm(tensors)
            if architecture == "matching_pursuit":
                _check_unit_rows(tensors["W_dec"], str(weights_path))
                if not fields["apply_b_dec_to_input"]:  # SAELens then never adds b_dec
                    tensors = {**tensors, "b_dec": torch.zeros_like(tensors["b_dec"])}
        dictionary = build_dictionary(
            _ARCHITECTURES[architecture],
            fields,
            tensors,
            weights_path=weights_path,
            config_path=cfg_path,
            device=device,
            dtype=dtype,
        )
        if stashed:  # the stash already describes the dictionary as it should be read
            return dictionary
        return self._normalized(dictionary, folder, cfg)

    def _fields(
        self, cfg: ConfigFields, architecture: str, tensors: dict[str, Tensor]
    ) -> dict[str, Any]:
        metadata = cfg.section("metadata")
        transcoder = architecture in _TRANSCODERS
        hook, hook_out = metadata.string("hook_name", None), metadata.string("hook_name_out", None)
        site_out = sitenames.from_transformerlens(hook_out) if transcoder else None
        extra = {
            "format": self.name,
            "architecture": architecture,
            "hook_name": hook,
            "hook_name_out": hook_out,
            "hook_head_index": metadata.integer("hook_head_index", None),
            "sae_lens_version": metadata.values.get("sae_lens_version"),
            "neuronpedia_id": metadata.values.get("neuronpedia_id"),
            "prepend_bos": metadata.values.get("prepend_bos"),
        }
        if cfg.values.get("reshape_activations") == "hook_z":
            # SAELens flattens hook_z's [..., n_heads, d_head] to d_in = n_heads * d_head:
            # exactly our attn_z site (the concatenated heads entering the output projection).
            extra["reshape_activations"] = "hook_z"
        w_dec = tensors.get("W_dec")
        fields: dict[str, Any] = {
            "d_in": cfg.integer("d_in"),
            "d_latent": cfg.integer("d_sae"),
            "d_out": cfg.integer("d_out", w_dec.shape[-1] if w_dec is not None else None)
            if transcoder
            else None,
            "apply_b_dec_to_input": False
            if transcoder
            else cfg.boolean("apply_b_dec_to_input", True),
            "skip_connection": architecture in _SKIP_TRANSCODERS,
            # Foreign decoders make no unit-norm promise; do not renormalise when fine-tuning.
            "normalize_decoder": False,
        }
        if architecture == "topk":
            fields["k"] = cfg.integer("k")
            if cfg.boolean("rescale_acts_by_decoder_norm", False):
                extra["folded_decoder_norm"] = True  # done by read(), on the tensors
        if architecture == "matching_pursuit":
            steps = cfg.integer("max_iterations", None) or fields["d_in"]
            fields["k"] = min(steps, fields["d_latent"])
            fields["residual_threshold"] = cfg.number("residual_threshold", 1e-2)
            fields["stop_on_duplicate_support"] = cfg.boolean("stop_on_duplicate_support", True)
        fields["provenance"] = provenance(
            trained_as=f"{self.name}:{architecture}",
            backbone=metadata.string("model_name", None),
            site=sitenames.from_transformerlens(hook),
            site_out=site_out,
            dataset=metadata.string("dataset_path", None),
            context_size=metadata.integer("context_size", None),
            extra=extra,
        )
        return fields

    def _normalized(
        self,
        dictionary: Dictionary,
        folder: Path,
        cfg: ConfigFields,
    ) -> Dictionary:
        """Apply ``normalize_activations``: fold a known constant, report a per-input one."""
        kind = cfg.string("normalize_activations", "none")
        if kind == "none":
            return dictionary
        if kind == "expected_average_only_in":
            factor = _scaling_factor(folder, cfg)
            if factor is not None:
                prov = dictionary.config.provenance
                scaled = dataclasses.replace(
                    prov, activation_scale=factor, normalization="expected_norm"
                )
                dictionary.config = dictionary.config.replace(provenance=scaled)
                return dictionary.with_scale_folded()
        if kind == "expected_average_only_in":
            kind = "expected_average_only_in (scaling factor unknown)"
        return record_input_normalization(dictionary, kind, Path(cfg.source))

    # ---------------------------------------------------------------- writing
    def write(self, dictionary: Dictionary, folder: Path) -> Path:
        """Write a folder as SAELens v6's ``SAE.save_model`` does (inference form).

        Raises:
            UnsupportedFormatError: the dictionary has no SAELens equivalent (e.g. a TopK
                transcoder); nothing is written.
        """
        dictionary = dictionary.to_inference().with_scale_folded()
        cfg = self.saelens_config(dictionary)
        tensors = {k: v.detach().cpu().contiguous() for k, v in dictionary.export_tensors().items()}
        return write_weights_and_config(
            folder, tensors, json.dumps(cfg), weights_name=WEIGHTS_NAME, config_name=CFG_NAME
        )

    def saelens_config(self, dictionary: Dictionary) -> dict[str, Any]:
        """The ``cfg.json`` SAELens v6 would write for this dictionary, keys in its order."""
        config = dictionary.config
        architecture = self._saelens_architecture(dictionary)
        transcoder = architecture in _TRANSCODERS
        prov = config.provenance
        hook = prov.extra.get("hook_name") or sitenames.to_transformerlens(prov.site) or prov.site
        metadata: dict[str, Any] = {
            "sae_lens_version": SAELENS_VERSION,
            "sae_lens_training_version": SAELENS_VERSION,
            "model_name": prov.backbone,
            "hook_name": hook,
            "hook_head_index": prov.extra.get("hook_head_index"),
            "context_size": prov.context_size,
            "dataset_path": prov.dataset,
        }
        if transcoder:
            metadata["hook_name_out"] = (
                prov.extra.get("hook_name_out")
                or sitenames.to_transformerlens(prov.site_out)
                or prov.site_out
            )
        metadata[STASH_KEY] = dictionary.config_for_save().to_dict()
        cfg: dict[str, Any] = {
            "d_in": config.d_in,
            "d_sae": config.d_latent,
            "dtype": dtype_name(dictionary.dtype),
            "device": "cpu",
            "apply_b_dec_to_input": bool(config.apply_b_dec_to_input) and not transcoder,
            "normalize_activations": "none",
            "reshape_activations": "hook_z" if str(hook or "").endswith("hook_z") else "none",
            "metadata": metadata,
        }
        if architecture == "topk":
            cfg.update(k=config.k, rescale_acts_by_decoder_norm=False)
        if architecture == "matching_pursuit":
            cfg.update(
                residual_threshold=config.residual_threshold,
                max_iterations=config.k,
                stop_on_duplicate_support=config.stop_on_duplicate_support,
            )
        if transcoder:
            cfg["d_out"] = config.output_width
        cfg["architecture"] = architecture
        return cfg

    @staticmethod
    def _saelens_architecture(dictionary: Dictionary) -> str:
        config, ours = dictionary.config, dictionary.architecture
        transcoder = config.d_out is not None or config.skip_connection
        if not transcoder:
            if ours in ("standard", "topk", "jumprelu", "gated"):
                return ours
            if ours == "mp" and dictionary.tied:
                _check_unit_rows(dictionary.W_dec, f"this {ours} dictionary")
                if not config.apply_b_dec_to_input and bool(dictionary.b_dec.any()):
                    raise UnsupportedFormatError(
                        "SAELens's matching pursuit adds b_dec only with apply_b_dec_to_input, "
                        "but this one has apply_b_dec_to_input=False and a non-zero b_dec; "
                        "save it with format='native'"
                    )
                return "matching_pursuit"
        elif config.apply_b_dec_to_input:
            raise UnsupportedFormatError(
                f"SAELens transcoders never subtract b_dec from the input, but this {ours} "
                f"dictionary has apply_b_dec_to_input=True; save it with format='native'"
            )
        elif ours == "standard":
            return "skip_transcoder" if config.skip_connection else "transcoder"
        elif ours == "jumprelu":
            return "jumprelu_skip_transcoder" if config.skip_connection else "jumprelu_transcoder"
        raise UnsupportedFormatError(
            f"SAELens has no architecture for a {ours} dictionary with d_out={config.d_out} "
            f"and skip_connection={config.skip_connection}; save it with format='native'"
        )


SAELENS = register_format(SAELensFormat())
