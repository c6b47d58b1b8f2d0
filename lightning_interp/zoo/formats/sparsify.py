"""EleutherAI sparsify folders: ``cfg.json`` + ``sae.safetensors``, one per hookpoint.

Checked against sparsify's ``sparse_coder.py``: ``encoder`` is an ``nn.Linear`` (weight
``[F, d]``), ``W_dec`` is ``[F, d]`` already (latent-major, no transpose), ``b_dec [d]``,
optional ``W_skip [d, d]`` added as ``x @ W_skip.mT``. Encoding is
``relu((x - b_dec) @ encoder.weight.T + encoder.bias)`` then top-k, with no ``b_dec``
subtraction for a transcoder (``transcode``); ReLU then top-k gives the same codes as
our top-k then ReLU.

SAELens's ``sparsify_disk_loader`` (6.18) differs in ways that change outputs; we follow
sparsify itself. It transposes ``W_dec`` to ``[d, F]`` although both libraries keep it
``[F, d]``; it sets ``apply_b_dec_to_input = not normalize_decoder`` where sparsify
subtracts ``b_dec`` whenever it is not transcoding; it drops ``W_skip`` and ``transcode``;
and it calls every hookpoint ``blocks.{i}.hook_resid_post``, an MLP's too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_interp.dictionaries.base import Dictionary
from lightning_interp.errors import CorruptFileError, UnsupportedFormatError
from lightning_interp.zoo.formats import sitenames
from lightning_interp.zoo.formats._common import (
    build_dictionary,
    matrix,
    provenance,
    read_json,
    read_weights,
    require_config_and_weights,
    require_tensors,
)
from lightning_interp.zoo.formats._fields import ConfigFields
from lightning_interp.zoo.formats.base import DeviceLike, DtypeLike, FormatAdapter
from lightning_interp.zoo.formats.registry import register_format

CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae.safetensors"


class SparsifyFormat(FormatAdapter):
    """A sparsify sparse coder (TopK SAE or transcoder, optional skip connection)."""

    name = "sparsify"
    required_files = (CFG_NAME, WEIGHTS_NAME)  # sae.safetensors beside cfg.json

    def read(
        self, folder: Path, *, device: DeviceLike = None, dtype: DtypeLike = None
    ) -> Dictionary:
        """Read a sparsify hookpoint folder into a native TopK dictionary."""
        cfg_path, weights_path = require_config_and_weights(
            folder, CFG_NAME, WEIGHTS_NAME, self.name
        )
        cfg = ConfigFields(read_json(cfg_path), cfg_path)
        d_in, k = cfg.integer("d_in"), cfg.integer("k")
        activation = cfg.string("activation", "topk")
        if activation != "topk":
            raise UnsupportedFormatError(
                f"{cfg_path}: sparsify activation {activation!r} is not supported (only "
                f"'topk'; 'groupmax' picks one latent per group, which no architecture here does)"
            )
        raw = read_weights(weights_path)
        require_tensors(raw, ["encoder.weight", "encoder.bias", "W_dec", "b_dec"], weights_path)
        # sparsify's SparseCoderConfig: num_latents 0 means "d_in * expansion_factor".
        num_latents = cfg.integer("num_latents", 0) or d_in * cfg.integer("expansion_factor", 0)
        if num_latents <= 0:
            raise CorruptFileError(
                f"{cfg_path} sets neither num_latents nor expansion_factor to a positive "
                f"integer; re-download the file"
            )
        transcode = cfg.boolean("transcode", False)
        skip = cfg.boolean("skip_connection", False)
        tensors = {
            "W_enc": matrix(raw, "encoder.weight", weights_path).T,
            "b_enc": raw["encoder.bias"],
            "W_dec": raw["W_dec"],  # already [F, d]: sparsify's decoder is latent-major
            "b_dec": raw["b_dec"],
        }
        if "W_skip" in raw:
            if not skip:
                raise CorruptFileError(
                    f"{weights_path} holds W_skip but {cfg_path} says skip_connection=false; "
                    f"re-download the pair"
                )
            tensors["W_skip"] = raw["W_skip"]
        fields: dict[str, Any] = {
            "d_in": d_in,
            "d_latent": num_latents,
            # A transcoder predicts a different activation of the same width.
            "d_out": d_in if transcode else None,
            "k": k,
            "apply_b_dec_to_input": not transcode,
            "skip_connection": skip,
            "normalize_decoder": cfg.boolean("normalize_decoder", True) and not transcode,
            "provenance": self._provenance(folder, cfg, transcode),
        }
        return build_dictionary(
            "topk",
            fields,
            tensors,
            weights_path=weights_path,
            config_path=cfg_path,
            device=device,
            dtype=dtype,
        )

    def _provenance(self, folder: Path, cfg: ConfigFields, transcode: bool) -> Any:
        hookpoint = folder.name
        site, site_out = sitenames.from_sparsify(hookpoint, transcode=transcode)
        # sparsify writes its run config (model, dataset, ctx_len) one level up.
        run_cfg_path = folder.parent / "config.json"
        run = ConfigFields(read_json(run_cfg_path) if run_cfg_path.is_file() else {}, run_cfg_path)
        return provenance(
            trained_as=f"{self.name}:{'transcoder' if transcode else 'topk'}",
            backbone=run.string("model", None),
            site=site,
            site_out=site_out,
            # sparsify's TrainConfig.dataset is a Hub id; ctx_len an integer.
            dataset=run.string("dataset", None),
            context_size=run.integer("ctx_len", None),
            extra={
                "format": self.name,
                "hookpoint": hookpoint,
                "multi_topk": cfg.boolean("multi_topk", None),
                "expansion_factor": cfg.integer("expansion_factor", None),
            },
        )


SPARSIFY = register_format(SparsifyFormat())
