"""PerLayerTranscoders: this repo's transcoders as a TranscoderSet, scales folded."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lightning_interp import create_dictionary
from lightning_interp.circuits import PerLayerTranscoders, TranscoderSet
from lightning_interp.errors import ConfigError, ShapeMismatchError


def _scaled(scale_in: float, scale_out: float):
    torch.manual_seed(0)
    tc = create_dictionary("topk", d_in=8, d_out=6, d_latent=16, k=3, apply_b_dec_to_input=False)
    with torch.no_grad():
        tc.b_enc.normal_()
        tc.b_dec.normal_()
    provenance = dataclasses.replace(
        tc.config.provenance,
        activation_scale=scale_in,
        activation_scale_out=scale_out,
        site="layers.0.mlp_in",
        site_out="layers.0.mlp_out",
    )
    tc.config = tc.config.replace(provenance=provenance)
    return tc


def test_encoder_and_decoder_act_on_raw_activations():
    tc = _scaled(2.0, 0.5)
    plt = PerLayerTranscoders([tc])
    assert isinstance(plt, TranscoderSet)
    x = torch.randn(5, 8)
    codes = tc.encode(2.0 * x)  # the dictionary was trained on scaled inputs
    torch.testing.assert_close(plt.encode(0, x), codes)
    w, b = plt.encoder(0)
    torch.testing.assert_close(x @ w + b, tc.encode_pre(2.0 * x))
    out = codes @ plt.decoder(0, 0) + plt.output_bias(0)
    torch.testing.assert_close(out, tc.decode(codes) / 0.5)
    assert plt.input_sites == ["layers.0.mlp_in"] and plt.output_sites == ["layers.0.mlp_out"]


def test_b_dec_applied_to_input_is_folded_into_the_encoder_bias():
    tc = create_dictionary("topk", d_in=8, d_latent=16, k=3, apply_b_dec_to_input=True)
    with torch.no_grad():
        tc.b_dec.normal_()
    plt = PerLayerTranscoders([tc])
    x = torch.randn(4, 8)
    w, b = plt.encoder(0)
    torch.testing.assert_close(x @ w + b, tc.encode_pre(x))


def test_decoders_reach_their_own_layer_only():
    plt = PerLayerTranscoders([_scaled(1.0, 1.0), _scaled(1.0, 1.0)])
    assert plt.decoder(0, 1) is None and plt.decoder(1, 0) is None
    assert plt.decoder(1, 1).shape == (16, 6) and plt.d_latent(1) == 16


def test_refusals():
    skip = create_dictionary("topk", d_in=8, d_out=8, d_latent=16, k=3, skip_connection=True)
    with pytest.raises(ConfigError, match="skip"):
        PerLayerTranscoders([skip])
    gated = create_dictionary("gated", d_in=8, d_out=8, d_latent=16, l1_coefficient=1.0)
    with pytest.raises(ConfigError, match="affine encoder"):
        PerLayerTranscoders([gated])
    with pytest.raises(ShapeMismatchError, match="disagree"):
        PerLayerTranscoders(
            [_scaled(1.0, 1.0), create_dictionary("topk", d_in=8, d_latent=16, k=3)]
        )
    with pytest.raises(ConfigError, match="one per layer"):
        PerLayerTranscoders([_scaled(1.0, 1.0)], input_sites=["a", "b"])
    with pytest.raises(ConfigError, match="at least one"):
        PerLayerTranscoders([])
