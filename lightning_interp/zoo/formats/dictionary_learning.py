"""saprmarks/dictionary_learning folders: ``ae.pt`` (a state dict) + ``config.json``.

``ae.pt`` is read with ``torch.load(weights_only=True)``, never unpickled freely.
Checked against dictionary_learning's ``dictionary.py`` and ``trainers/*.py``; the class is
told by ``config.json["trainer"]["dict_class"]`` and confirmed by the tensor names (the
April-update trainer labels its ``AutoEncoderNew`` as ``AutoEncoder``):

=======================  ==========================================  ====================
dict_class               tensors                                     here
=======================  ==========================================  ====================
AutoEncoder              ``encoder.weight/bias``, ``decoder.weight``,  standard, centred
                         ``bias`` (= b_dec)
AutoEncoderNew           ``encoder.*``, ``decoder.weight/bias``         standard, uncentred
AutoEncoderTopK          ``encoder.*``, ``decoder.weight``, ``b_dec``,  topk
                         ``k``, ``threshold``
BatchTopKSAE             as TopK                                     jumprelu at
MatryoshkaBatchTopKSAE   ``W_enc, b_enc, W_dec, b_dec, k,``           ``threshold`` (its
                         ``threshold, group_sizes``                  default encode)
JumpReluAutoEncoder      ``W_enc, b_enc, W_dec, b_dec, threshold``   jumprelu, uncentred
GatedAutoEncoder         ``encoder.weight, decoder.weight,``          gated
                         ``decoder_bias, gate_bias, mag_bias, r_mag``
=======================  ==========================================  ====================

SAELens's ``dictionary_learning_sae_huggingface_loader_1`` (6.18) maps every class but
TopK and Gated to a plain ReLU ``standard`` SAE with ``apply_b_dec_to_input=True``: a
BatchTopK SAE then loses its threshold (dense codes), and JumpReLU / AutoEncoderNew
dictionaries get an input centring they never had. We follow dictionary_learning's
``encode`` instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_interp.dictionaries.base import Dictionary
from lightning_interp.errors import CorruptFileError, UnsupportedFormatError
from lightning_interp.zoo.formats import sitenames
from lightning_interp.zoo.formats._common import (
    build_dictionary,
    matrix,
    provenance,
    read_json,
    read_pt_state_dict,
    require_config_and_weights,
    require_tensors,
)
from lightning_interp.zoo.formats._fields import ConfigFields
from lightning_interp.zoo.formats.base import DeviceLike, DtypeLike, FormatAdapter
from lightning_interp.zoo.formats.registry import register_format

WEIGHTS_NAME = "ae.pt"
CONFIG_NAME = "config.json"
_BATCH_TOPK = ("BatchTopKSAE", "MatryoshkaBatchTopKSAE")


def _linear_layout(state: dict[str, Tensor], path: Path, bias: str) -> dict[str, Tensor]:
    """``nn.Linear`` encoder/decoder (weights ``[F, d]`` / ``[d, F]``) -> our layout."""
    require_tensors(state, ["encoder.weight", "encoder.bias", "decoder.weight", bias], path)
    return {
        "W_enc": matrix(state, "encoder.weight", path).T,
        "b_enc": state["encoder.bias"],
        "W_dec": matrix(state, "decoder.weight", path).T,
        "b_dec": state[bias],
    }


def _convert(dict_class: str, state: dict[str, Tensor], path: Path) -> tuple[str, dict, dict]:
    """Return (our architecture, tensors, extra config fields) for one dictionary class."""
    if dict_class == "AutoEncoder" and "decoder.bias" in state and "bias" not in state:
        dict_class = "AutoEncoderNew"  # the April-update trainer's mislabel
    if dict_class == "AutoEncoder":
        return "standard", _linear_layout(state, path, "bias"), {"apply_b_dec_to_input": True}
    if dict_class == "AutoEncoderNew":
        return (
            "standard",
            _linear_layout(state, path, "decoder.bias"),
            {"apply_b_dec_to_input": False},
        )
    if dict_class == "GatedAutoEncoder":
        names = [
            "encoder.weight",
            "decoder.weight",
            "decoder_bias",
            "gate_bias",
            "mag_bias",
            "r_mag",
        ]
        require_tensors(state, names, path)
        tensors = {
            "W_enc": matrix(state, "encoder.weight", path).T,
            "W_dec": matrix(state, "decoder.weight", path).T,
            "b_dec": state["decoder_bias"],
            "b_gate": state["gate_bias"],
            "b_mag": state["mag_bias"],
            "r_mag": state["r_mag"],
        }
        return "gated", tensors, {"apply_b_dec_to_input": True}
    if dict_class == "JumpReluAutoEncoder":
        require_tensors(state, ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"], path)
        tensors = {k: state[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
        # JumpReluAutoEncoder.apply_b_dec_to_input is a plain attribute, False unless loaded
        # through SAELens, and not saved: its encode does not centre the input.
        return "jumprelu", tensors, {"apply_b_dec_to_input": False}
    if dict_class in ("AutoEncoderTopK", *_BATCH_TOPK):
        if "W_enc" in state:  # Matryoshka keeps raw parameters, not nn.Linear
            require_tensors(state, ["W_enc", "b_enc", "W_dec", "b_dec"], path)
            tensors = {k: state[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
        else:
            tensors = _linear_layout(state, path, "b_dec")
        if dict_class == "AutoEncoderTopK":
            return "topk", tensors, {"apply_b_dec_to_input": True}
        threshold = ConfigFields(state, path).number("threshold", -1.0)
        if threshold < 0:
            # No threshold estimated yet: keep batch-level selection (our BatchTopK), as it
            # trained. Its own default encode would keep relu(pre) > -1: dense ReLU codes
            # (cross-checked in tests/zoo/test_peer_crosscheck.py).
            tensors["threshold"] = torch.tensor(-1.0)
            return "batchtopk", tensors, {"apply_b_dec_to_input": True}
        # Their default encode (use_threshold=True) keeps relu(pre) where it exceeds the
        # threshold: a JumpReLU with that threshold on every latent.
        tensors["threshold"] = torch.full((tensors["b_enc"].shape[0],), threshold)
        return "jumprelu", tensors, {"apply_b_dec_to_input": True}
    raise UnsupportedFormatError(
        f"{path}: dictionary_learning class {dict_class!r} is not supported; supported: "
        f"AutoEncoder, AutoEncoderNew, AutoEncoderTopK, BatchTopKSAE, MatryoshkaBatchTopKSAE, "
        f"JumpReluAutoEncoder, GatedAutoEncoder"
    )


class DictionaryLearningFormat(FormatAdapter):
    """dictionary_learning's trainer output folder."""

    name = "dictionary_learning"
    required_files = (WEIGHTS_NAME, CONFIG_NAME)  # ae.pt beside config.json

    def read(
        self, folder: Path, *, device: DeviceLike = None, dtype: DtypeLike = None
    ) -> Dictionary:
        """Read ``ae.pt`` safely and map it onto the matching native architecture."""
        cfg_path, weights_path = require_config_and_weights(
            folder, CONFIG_NAME, WEIGHTS_NAME, self.name
        )
        config = ConfigFields(read_json(cfg_path), cfg_path)
        if "trainer" not in config:
            raise CorruptFileError(
                f"{cfg_path} lacks the 'trainer' section dictionary_learning writes; "
                f"re-download the folder"
            )
        trainer = config.section("trainer")
        dict_class = trainer.string("dict_class")
        d_in, d_latent = trainer.integer("activation_dim"), trainer.integer("dict_size")
        state = read_pt_state_dict(weights_path)
        architecture, tensors, fields = _convert(dict_class, state, weights_path)
        fields = {"d_in": d_in, "d_latent": d_latent, **fields}
        if architecture in ("topk", "batchtopk"):
            fields["k"] = self._k(trainer, ConfigFields(state, weights_path), cfg_path)
        fields["provenance"] = self._provenance(config, state, architecture, weights_path)
        return build_dictionary(
            architecture,
            fields,
            tensors,
            weights_path=weights_path,
            config_path=cfg_path,
            device=device,
            dtype=dtype,
        )

    @staticmethod
    def _k(trainer: ConfigFields, state: ConfigFields, cfg_path: Path) -> int:
        k, saved = trainer.integer("k", None), state.integer("k", None)
        if k is not None and saved is not None and k != saved:
            raise CorruptFileError(
                f"{cfg_path} says k={k} but ae.pt's k buffer is {saved}; re-download the pair"
            )
        if k is None and saved is None:
            raise CorruptFileError(f"{cfg_path} has no trainer.k and ae.pt no k buffer")
        return k if k is not None else saved

    def _provenance(
        self, config: ConfigFields, state: dict[str, Any], architecture: str, weights_path: Path
    ) -> Any:
        trainer = config.section("trainer")
        submodule = trainer.string("submodule_name", None)
        extra: dict[str, Any] = {
            "format": self.name,
            "dict_class": trainer.string("dict_class"),
            "trainer_class": trainer.string("trainer_class", None),
            "submodule_name": submodule,
            "layer": trainer.integer("layer", None),
        }
        if isinstance(state.get("group_sizes"), Tensor):
            extra["group_sizes"] = [int(s) for s in state["group_sizes"].tolist()]
        if architecture == "topk" and "threshold" in state:
            extra["inference_threshold"] = ConfigFields(state, weights_path).number("threshold")
        return provenance(
            trained_as=f"{self.name}:{extra['dict_class']}",
            backbone=trainer.string("lm_name", None),
            site=sitenames.from_dictionary_learning(submodule),
            context_size=config.section("buffer").integer("ctx_len", None),
            extra=extra,
        )


DICTIONARY_LEARNING = register_format(DictionaryLearningFormat())
