"""OpenAI ``sparse_autoencoder`` state dicts (``<layer>.pt``), read without unpickling.

Checked against ``sparse_autoencoder/model.py``: ``encoder.weight [F, d]`` (no bias),
``latent_bias [F]``, ``pre_bias [d]`` (subtracted from the input and added back after
decoding), ``decoder.weight [d, F]`` (absent when tied: the decoder is then the encoder's
transpose), ``activation`` (``"ReLU"`` or ``"TopK"``) and ``activation_state_dict``
(``{"k", "postact_fn"}``). ``Autoencoder.from_state_dict`` switches on per-input layer
norm exactly when the activation is TopK; that cannot be folded into weights, so it is
recorded in ``provenance.normalization`` with a warning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_interp.dictionaries.base import Dictionary
from lightning_interp.errors import (
    DictionaryNotFoundError,
    UnsupportedFormatError,
)
from lightning_interp.zoo.formats._common import (
    build_dictionary,
    matrix,
    provenance,
    read_pt_state_dict,
    record_input_normalization,
    require_tensors,
)
from lightning_interp.zoo.formats._fields import ConfigFields
from lightning_interp.zoo.formats.base import PATTERN, DeviceLike, DtypeLike, FormatAdapter
from lightning_interp.zoo.formats.registry import register_format

_PT = "*.pt"


class OpenAIFormat(FormatAdapter):
    """A folder holding one OpenAI sparse autoencoder state dict."""

    name = "openai"
    # Any .pt file that no other format names (dictionary_learning's ae.pt, SAELens's
    # trainer_state.pt are theirs). A bare pattern is weak evidence: a format known by
    # file names of its own wins a folder both match.
    required_files = (_PT,)
    specificity = PATTERN

    def read(
        self, folder: Path, *, device: DeviceLike = None, dtype: DtypeLike = None
    ) -> Dictionary:
        """Read the folder's single ``.pt`` state dict into a standard or TopK dictionary."""
        files = self.own_files(_PT, (p.name for p in folder.iterdir())) if folder.is_dir() else []
        if len(files) != 1:
            raise DictionaryNotFoundError(
                f"{folder} should hold exactly one OpenAI autoencoder .pt file, found "
                f"{files or 'none'}; pass the folder of a single autoencoder"
            )
        path = folder / files[0]
        state = read_pt_state_dict(path)
        require_tensors(state, ["encoder.weight", "latent_bias", "pre_bias"], path)
        encoder = matrix(state, "encoder.weight", path)  # [n_latents, d_model]
        fields_in = ConfigFields(state, path)
        activation = fields_in.string("activation", "ReLU")
        act_state = fields_in.section("activation_state_dict")
        tied = "decoder.weight" not in state
        tensors = {
            "W_enc": encoder.T,
            "b_enc": state["latent_bias"],
            # A tied decoder is the encoder's transpose: decoder(z) = z @ encoder.weight.
            "W_dec": matrix(state, "decoder.weight", path).T
            if "decoder.weight" in state
            else encoder,
            "b_dec": state["pre_bias"],
        }
        n_latents, d_in = encoder.shape
        fields: dict[str, Any] = {
            "d_in": int(d_in),
            "d_latent": int(n_latents),
            "normalize_decoder": False,
        }
        if activation == "TopK":
            if act_state.string("postact_fn", "ReLU") != "ReLU" or "k" not in act_state:
                raise UnsupportedFormatError(
                    f"{path}: TopK needs activation_state_dict with k and postact_fn 'ReLU', "
                    f"got {act_state.values}"
                )
            fields["k"] = act_state.integer("k")
        elif activation != "ReLU":
            raise UnsupportedFormatError(
                f"{path}: activation {activation!r} is not supported (ReLU, TopK)"
            )
        fields["provenance"] = provenance(
            trained_as=f"{self.name}:{activation}",
            extra={"format": self.name, "file": path.name, "tied": tied},
        )
        dictionary = build_dictionary(
            "topk" if activation == "TopK" else "standard",
            fields,
            tensors,
            weights_path=path,
            config_path=None,
            device=device,
            dtype=dtype,
        )
        if activation == "TopK":
            return record_input_normalization(dictionary, "layer_norm", path)
        return dictionary


OPENAI = register_format(OpenAIFormat())
