"""The optional linear skip connection: reconstruction = decode(codes) + x @ W_skip.T."""

import pytest
import torch

from lightning_interp import create_dictionary, load_dictionary
from lightning_interp.dictionaries import Provenance
from tests.helpers import example_kwargs, transcoding_architectures

D_IN, D_OUT, F = 8, 6, 32


def skip_dictionary(architecture, d_out=D_OUT):
    torch.manual_seed(0)
    kwargs = {**example_kwargs(architecture), "d_out": d_out, "apply_b_dec_to_input": False}
    dictionary = create_dictionary(
        architecture, d_in=D_IN, d_latent=F, skip_connection=True, **kwargs
    )
    with torch.no_grad():
        for p in dictionary.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return dictionary


def test_off_by_default_and_zero_at_init():
    plain = create_dictionary("topk", d_in=D_IN, d_latent=F, k=4)
    assert not plain.config.skip_connection and "W_skip" not in plain.export_tensors()
    skip = create_dictionary("topk", d_in=D_IN, d_latent=F, k=4, skip_connection=True)
    assert skip.W_skip.shape == (D_IN, D_IN) and not skip.W_skip.any()


@pytest.mark.parametrize("architecture", transcoding_architectures())
@pytest.mark.parametrize("sparse", [True, False])
def test_reconstruction_adds_the_skip(architecture, sparse):
    dictionary = skip_dictionary(architecture)
    if hasattr(dictionary, "sparse_training"):
        dictionary.sparse_training = sparse
    x = torch.randn(16, D_IN)
    expected_eval = dictionary.decode(dictionary.encode(x)) + x @ dictionary.W_skip.T
    torch.testing.assert_close(dictionary(x), expected_eval)
    out = dictionary.forward_train(x)
    torch.testing.assert_close(
        out.reconstruction, dictionary.decode(out.codes) + x @ dictionary.W_skip.T
    )
    assert out.reconstruction.shape == (16, D_OUT)


def test_skip_is_trained():
    dictionary = skip_dictionary("topk")
    x, target = torch.randn(16, D_IN), torch.randn(16, D_OUT)
    dictionary.loss(x, dictionary.forward_train(x), target=target)["loss"].backward()
    assert dictionary.W_skip.grad is not None and dictionary.W_skip.grad.abs().sum() > 0


@pytest.mark.parametrize("architecture", transcoding_architectures())
def test_native_round_trip_keeps_the_skip(tmp_path, architecture):
    dictionary = skip_dictionary(architecture)
    # One training forward pass gives state estimated in training (BatchTopK's threshold)
    # a value, so every architecture can export its inference form.
    dictionary.train().forward_train(torch.randn(64, D_IN))
    dictionary.eval().save_pretrained(tmp_path)
    loaded = load_dictionary(tmp_path)
    assert loaded.config.skip_connection
    x = torch.randn(16, D_IN)
    torch.testing.assert_close(loaded(x), dictionary.to_inference()(x), rtol=0, atol=0)
    torch.testing.assert_close(loaded.W_skip, dictionary.W_skip, rtol=0, atol=0)


@pytest.mark.parametrize("scale_in, scale_out", [(0.5, 4.0), (3.0, None)])
def test_folding_scales_the_skip_by_input_over_output(scale_in, scale_out):
    dictionary = skip_dictionary("topk")
    provenance = Provenance(activation_scale=scale_in, activation_scale_out=scale_out)
    dictionary.config = dictionary.config.replace(provenance=provenance)
    folded = dictionary.with_scale_folded()
    ratio = scale_in / (scale_out or scale_in)
    torch.testing.assert_close(folded.W_skip, dictionary.W_skip * ratio)
    # The skip alone (no latent fires) maps raw x as the trained one maps the scaled x.
    with torch.no_grad():
        for d in (dictionary, folded):
            d.b_enc.fill_(-1e3)
    x = torch.randn(16, D_IN)
    torch.testing.assert_close(folded(x), dictionary(scale_in * x) / (scale_out or scale_in))
