"""Per-layer transcoders (PLTs) as the special case of a CLT whose decoders stay in their layer."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lightning_interp.dictionaries import Dictionary, create_dictionary
from lightning_interp.errors import ConfigError

if TYPE_CHECKING:
    from lightning_interp.circuits.clt import CrossLayerTranscoder


def layer_transcoder(clt: CrossLayerTranscoder, layer: int) -> Dictionary:
    """Layer ``layer`` of a PLT as a registered transcoder dictionary with the same weights.

    JumpReLU gives a ``jumprelu`` transcoder, TopK a ``topk`` one and BatchTopK a
    ``batchtopk`` one carrying its threshold; the provenance records the layer's sites and
    scales, so the dictionary takes the same (scaled) inputs as the CLT.

    Raises:
        ConfigError: ``clt`` is cross-layer (its writes to later layers have no place in
            a per-layer transcoder).
    """
    cfg = clt.config
    if cfg.cross_layer:
        raise ConfigError(
            "a cross-layer transcoder's features also write to later layers, which a "
            "per-layer transcoder cannot hold; build it with cross_layer=False for PLTs"
        )
    scales_in, scales_out = cfg.input_scales, cfg.output_scales
    provenance = {
        "backbone": cfg.backbone,
        "site": clt.input_sites[layer],
        "site_out": clt.output_sites[layer],
        "activation_scale": 1.0 if scales_in is None else scales_in[layer],
        "activation_scale_out": None if scales_out is None else scales_out[layer],
    }
    common = dict(
        d_in=cfg.d_in,
        d_latent=clt.d_latent(layer),
        d_out=cfg.output_width,
        dtype=cfg.dtype,
        normalize_decoder=False,
        apply_b_dec_to_input=False,
        provenance=provenance,
    )
    tensors = {
        "W_enc": clt.W_enc[layer],
        "b_enc": clt.b_enc[layer],
        "W_dec": clt.W_dec[layer][:, 0],
        "b_dec": clt.b_dec[layer],
    }
    if cfg.activation == "jumprelu":
        extra = {"bandwidth": cfg.bandwidth, "initial_threshold": cfg.initial_threshold}
        dictionary = create_dictionary("jumprelu", **common, **extra)
        tensors["threshold"] = clt.threshold(layer)
    else:
        dictionary = create_dictionary(cfg.activation, **common, k=cfg.k)
        if cfg.activation == "batchtopk":
            tensors["threshold"] = clt.thresholds[layer].clone()
    with torch.no_grad():
        dictionary.import_tensors({k: v.detach().clone() for k, v in tensors.items()})
    return dictionary.train(clt.training)
