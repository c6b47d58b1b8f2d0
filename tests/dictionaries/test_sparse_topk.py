"""The sparse TopK training path gives the dense path's losses, gradients and updates."""

import copy
import dataclasses

import pytest
import torch

from lightning_interp.dictionaries import get_dictionary_class
from lightning_interp.dictionaries.sparse_ops import SparsePattern, gather_encoder, sparse_decode
from tests.helpers import small_dictionary, sparse_architectures

K = 5  # active latents per row in the TopK-specific tests below


def pair(architecture="topk", d_latent=96, **kwargs):
    """A randomised dictionary with the sparse training path, and a dense-path copy."""
    torch.manual_seed(0)
    sparse = small_dictionary(architecture, d_in=16, d_latent=d_latent, **kwargs)
    with torch.no_grad():
        for p in sparse.parameters():
            p.add_(0.1 * torch.randn_like(p))
    dense = copy.deepcopy(sparse)
    dense.sparse_training = False
    return sparse, dense


def step(dictionary, x, target=None, dead_mask=None, steps=3):
    optimizer = torch.optim.Adam(dictionary.parameters(), lr=1e-2)
    history = []
    for _ in range(steps):
        out = dictionary.forward_train(x)
        losses = dictionary.loss(x, out, target=target, dead_mask=dead_mask)
        losses["loss"].backward()
        dictionary.remove_parallel_decoder_grad_()
        history.append(
            (
                {k: v.detach().clone() for k, v in losses.items()},
                {n: p.grad.clone() for n, p in dictionary.named_parameters()},
            )
        )
        optimizer.step()
        dictionary.normalize_decoder_()
        optimizer.zero_grad()
    return history


@pytest.mark.parametrize("architecture", sparse_architectures())
@pytest.mark.parametrize("dead_fraction", [0.0, 0.3, 1.0])
# 96 latents: the CPU top-k kernel's narrow chunks; 512: its 32-entry chunks (cpu_topk.py).
@pytest.mark.parametrize("d_latent", [96, 512])
def test_sparse_path_equals_dense_path(architecture, dead_fraction, d_latent):
    fields = {f.name for f in dataclasses.fields(get_dictionary_class(architecture).config_class)}
    aux = {"aux_k": 12} if "aux_k" in fields else {}
    sparse, dense = pair(architecture, d_latent=d_latent, **aux)
    x = torch.randn(64, 16) + 0.5
    dead = torch.rand(d_latent, generator=torch.Generator().manual_seed(1)) < dead_fraction
    for (s_losses, s_grads), (d_losses, d_grads) in zip(
        step(sparse, x, dead_mask=dead), step(dense, x, dead_mask=dead), strict=True
    ):
        for name in d_losses:
            torch.testing.assert_close(s_losses[name], d_losses[name], rtol=1e-5, atol=1e-6)
        for name in d_grads:
            torch.testing.assert_close(s_grads[name], d_grads[name], rtol=1e-4, atol=1e-6)
    for name, p in dense.named_parameters():
        torch.testing.assert_close(dict(sparse.named_parameters())[name], p, rtol=1e-4, atol=1e-6)
    # State estimated in training (BatchTopK's threshold) agrees too.
    for name, buffer in dense.named_buffers():
        torch.testing.assert_close(dict(sparse.named_buffers())[name], buffer)
    if dead_fraction > 0 and "auxk_loss" in s_losses:
        assert float(s_losses["auxk_loss"]) > 0


def test_sparse_path_equals_dense_path_for_a_transcoder():
    sparse, dense = pair(k=K, d_out=12, apply_b_dec_to_input=False)
    x, y = torch.randn(48, 16), torch.randn(48, 12)
    for (s_losses, s_grads), (d_losses, d_grads) in zip(
        step(sparse, x, y), step(dense, x, y), strict=True
    ):
        torch.testing.assert_close(s_losses["loss"], d_losses["loss"], rtol=1e-5, atol=1e-6)
        for name in d_grads:
            torch.testing.assert_close(s_grads[name], d_grads[name], rtol=1e-4, atol=1e-6)


def test_sparse_output_reports_codes_without_materialising_them():
    sparse, dense = pair(k=K)
    x = torch.randn(32, 16)
    out, reference = sparse.forward_train(x), dense.forward_train(x)
    assert out.indices.shape == (32, K) and out._codes is None
    torch.testing.assert_close(out.l0_per_row(), reference.l0_per_row())
    torch.testing.assert_close(out.fired_latents(), reference.fired_latents())
    torch.testing.assert_close(out.codes, reference.codes)


def test_gradient_reaches_only_the_selected_latents():
    sparse, _ = pair(k=K)
    x = torch.randn(8, 16)
    out = sparse.forward_train(x)
    out.reconstruction.sum().backward()
    selected = torch.zeros(96, dtype=torch.bool)
    selected[out.indices[out.values > 0]] = True
    assert (sparse.W_dec.grad[~selected] == 0).all()
    assert (sparse.W_enc.grad[:, ~selected] == 0).all()
    assert (sparse.W_dec.grad[selected] != 0).any(dim=1).all()


def test_input_gradient_when_the_input_requires_it():
    sparse, dense = pair(k=K)
    x1 = torch.randn(16, 16, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    sparse.forward_train(x1).reconstruction.pow(2).sum().backward()
    dense.forward_train(x2).reconstruction.pow(2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-6)


def test_sparse_kernels_against_dense_formulas():
    torch.manual_seed(0)
    n, d, f, k = 10, 6, 20, 3
    x, w_enc, b_enc, b_dec = torch.randn(n, d), torch.randn(d, f), torch.randn(f), torch.randn(d)
    w_dec = torch.randn(f, d)
    leaves = [t.requires_grad_(True) for t in (x, w_enc, b_enc, b_dec, w_dec)]
    pre = (x - b_dec) @ w_enc + b_enc
    pattern = SparsePattern.from_topk(pre.detach().topk(k, dim=-1).indices, f)
    values = gather_encoder(x, b_dec, w_enc, b_enc, pre, pattern)
    decoded = sparse_decode(values, w_dec, pattern)
    grads = torch.autograd.grad(decoded.pow(2).sum(), leaves)
    codes = torch.zeros(n, f).scatter(-1, pattern.indices, pre.gather(-1, pattern.indices))
    reference = torch.autograd.grad((codes @ w_dec).pow(2).sum(), leaves)
    for got, want in zip(grads, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_runs_the_sparse_path():
    sparse, dense = pair(k=K)
    x = torch.randn(32, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sparse.forward_train(x)
        losses = sparse.loss(x, out, dead_mask=torch.ones(96, dtype=torch.bool))
    losses["loss"].backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in sparse.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = dense.loss(x, dense.forward_train(x))["mse_loss"]
    torch.testing.assert_close(losses["mse_loss"], reference, rtol=0.05, atol=0.05)


def test_batchtopk_sparse_rows_hold_different_counts():
    sparse, dense = pair("batchtopk", k=K)
    x = torch.randn(32, 16) * torch.linspace(0.2, 3.0, 32)[:, None]
    out, reference = sparse.forward_train(x), dense.forward_train(x)
    assert out.indices is None and out.values.shape == (K * 32,)
    torch.testing.assert_close(sparse.threshold, dense.threshold)
    assert float(sparse.threshold) > 0
    counts = out.l0_per_row()
    assert counts.min() != counts.max()
    torch.testing.assert_close(counts, reference.l0_per_row())
    torch.testing.assert_close(out.codes, reference.codes)
    torch.testing.assert_close(out.fired_latents(), reference.fired_latents())
