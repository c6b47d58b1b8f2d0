"""Codebook features: outputs are sums of exactly k codes, chosen by cosine similarity."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lightning_interp import create_dictionary
from lightning_interp.data import SparseSuperposition
from lightning_interp.dictionaries import CodebookSAE
from lightning_interp.metrics.functional import fraction_of_variance_unexplained

K = 3


@pytest.fixture(autouse=True)
def _seed_one_thread():
    torch.manual_seed(0)
    # Tiny matmuls on a shared machine: more threads only add contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def codebook(dtype="float64", **kwargs):
    """A codebook with random codes of random norms and a non-zero ``b_dec``."""
    config = {"d_in": 12, "d_latent": 40, "k": K, "dtype": dtype, **kwargs}
    if "d_out" in config:
        config["apply_b_dec_to_input"] = False
    dictionary = create_dictionary("codebook", **config)
    with torch.no_grad():
        for p in dictionary.parameters():
            p.add_(0.3 * torch.randn_like(p))
        dictionary.W_dec.mul_(torch.rand(dictionary.d_latent, 1, dtype=dictionary.dtype) + 0.5)
    return dictionary


def chosen(dictionary, x):
    """The k latents of largest cosine similarity, computed independently of the class."""
    keys = dictionary.W_dec if dictionary.keys_are_codes else dictionary.W_enc.T
    centred = x - dictionary.b_dec if dictionary.config.apply_b_dec_to_input else x
    similarity = F.cosine_similarity(centred[:, None, :], keys[None, :, :], dim=-1)
    return similarity.topk(dictionary.config.k, dim=-1).indices


@pytest.mark.parametrize("kind", ["autoencoder", "transcoder"])
def test_outputs_are_sums_of_exactly_k_codes(kind):
    dictionary = codebook(**({"d_out": 7} if kind == "transcoder" else {}))
    x = torch.randn(50, 12, dtype=torch.float64)
    indices = chosen(dictionary, x)
    sums = dictionary.W_dec[indices].sum(1) + dictionary.b_dec
    with torch.no_grad():
        codes = dictionary.encode(x)
        # Exactly k codes per row, each with coefficient exactly 1, at the most similar keys.
        assert ((codes != 0).sum(-1) == K).all() and bool((codes[codes != 0] == 1).all())
        assert torch.equal(codes.topk(K, dim=-1).indices.sort(-1).values, indices.sort(-1).values)
        torch.testing.assert_close(dictionary(x), sums)
    for sparse in (True, False):
        dictionary.sparse_training = sparse
        out = dictionary.forward_train(x)
        torch.testing.assert_close(out.reconstruction, sums)
        assert bool((out.values == 1).all()) if sparse else torch.equal(out.codes, codes)
        assert (out.l0_per_row() == K).all()


def test_an_autoencoder_has_one_codebook_a_transcoder_separate_keys():
    assert not hasattr(codebook(), "W_enc")
    transcoder = codebook(d_out=7)
    assert transcoder.W_enc.shape == (12, 40) and transcoder.W_dec.shape == (40, 7)


def loss_and_grads(dictionary, x, target=None):
    x = x.clone().requires_grad_(True)
    out = dictionary.forward_train(x)
    loss = dictionary.loss(x, out, target=target)["loss"]
    loss.backward()
    grads = {name: p.grad for name, p in dictionary.named_parameters()}
    return loss.detach(), grads, x.grad


@pytest.mark.parametrize("straight_through", [True, False])
@pytest.mark.parametrize("kind", ["autoencoder", "transcoder"])
def test_sparse_path_gradients_equal_the_dense_path(straight_through, kind):
    sparse = codebook(
        "float32",
        straight_through=straight_through,
        **({"d_out": 7} if kind == "transcoder" else {}),
    )
    dense = copy.deepcopy(sparse)
    dense.sparse_training = False
    x = torch.randn(64, 12) + 0.5
    target = torch.randn(64, 7) if kind == "transcoder" else None
    s_loss, s_grads, s_input = loss_and_grads(sparse, x, target)
    d_loss, d_grads, d_input = loss_and_grads(dense, x, target)
    torch.testing.assert_close(s_loss, d_loss, rtol=1e-5, atol=1e-6)
    assert s_grads.keys() == d_grads.keys()
    for name in d_grads:
        torch.testing.assert_close(s_grads[name], d_grads[name], rtol=1e-4, atol=1e-6)
    if d_input is None:  # a transcoder's input gets a gradient only through the keys
        assert s_input is None and kind == "transcoder" and not straight_through
    else:
        torch.testing.assert_close(s_input, d_input, rtol=1e-4, atol=1e-6)


def test_without_straight_through_codes_get_only_the_output_gradient():
    # The reference's gradients: a code's gradient is the sum of the output gradients of the
    # rows that chose it. The straight-through estimator adds the gradient through the
    # similarity (the codes are also the keys); the forward pass is the same either way.
    x = torch.randn(30, 12, dtype=torch.float64)
    upstream = torch.randn(30, 12, dtype=torch.float64)
    base, grads, outputs = codebook(), {}, {}
    for straight_through in (False, True):
        dictionary = copy.deepcopy(base)
        dictionary.config = base.config.replace(straight_through=straight_through)
        out = dictionary.forward_train(x)
        (out.reconstruction * upstream).sum().backward()
        grads[straight_through], outputs[straight_through] = dictionary.W_dec.grad, out
    indices = chosen(base, x)
    expected = torch.zeros(40, 12, dtype=torch.float64).index_add_(
        0, indices.reshape(-1), upstream.repeat_interleave(K, dim=0)
    )
    torch.testing.assert_close(grads[False], expected)
    assert (grads[True] - expected).abs().max() > 1e-3
    torch.testing.assert_close(outputs[True].reconstruction, outputs[False].reconstruction)


@pytest.mark.parametrize("normalize_decoder", [False, True])
def test_free_codes_start_at_the_scale_of_the_data(normalize_decoder):
    dictionary = create_dictionary(
        "codebook", d_in=16, d_latent=64, k=4, normalize_decoder=normalize_decoder
    )
    sample = 50.0 * torch.randn(512, 16) + 3.0
    dictionary.initialize_b_dec_(sample, "mean")
    norms = dictionary.W_dec.norm(dim=1).detach()
    centred = (sample - sample.mean(0)).norm(dim=1).median()
    expected = 1.0 if normalize_decoder else float(centred) / 2  # k = 4 codes sum to a row
    torch.testing.assert_close(norms, torch.full_like(norms, expected))


def test_default_free_codes_learn_a_scaled_planted_dictionary():
    # The paper's free codes (normalize_decoder=False, the default) at 20 times the unit
    # scale: the first batch sets the code norms, Adam does the rest.
    data = SparseSuperposition(d=16, n_features=24, firing_probability=2 / 24, seed=0)
    generator = torch.Generator().manual_seed(0)
    dictionary = create_dictionary("codebook", d_in=16, d_latent=48, k=2)
    assert isinstance(dictionary, CodebookSAE) and not dictionary.config.normalize_decoder
    held_out = 20 * data.sample(2048, generator=generator)[0]
    dictionary.initialize_b_dec_(20 * data.sample(512, generator=generator)[0])
    optimizer = torch.optim.Adam(dictionary.parameters(), lr=0.05)
    for _ in range(300):
        x = 20 * data.sample(256, generator=generator)[0]
        dictionary.loss(x, dictionary.forward_train(x))["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        fvu = fraction_of_variance_unexplained(dictionary(held_out), held_out)
    assert fvu < 0.6, fvu
