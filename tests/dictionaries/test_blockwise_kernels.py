"""The faster encoder pieces (issue "Speed II") give the results of the plain ones.

- ``affine`` (GEMM + in-place bias) equals ``torch.addmm``, gradients included, in fp32 and
  under bf16 autocast;
- ``top_positive`` (AuxK's selection) keeps exactly the positive entries of each row's top k;
- the sparse training path equals the dense one under bf16 autocast (fp32 is pinned in
  test_sparse_topk.py) for every architecture with a sparse path, and on CUDA.
"""

import dataclasses

import pytest
import torch

from lightning_interp.dictionaries import get_dictionary_class
from lightning_interp.dictionaries.sparse_ops import affine, top_positive
from tests.dictionaries.test_sparse_topk import pair
from tests.helpers import sparse_architectures

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def leaves(n=64, d=16, f=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, w, b = (torch.randn(shape, generator=g) for shape in ((n, d), (d, f), (f,)))
    return [t.requires_grad_(True) for t in (x, w, b)]


def test_affine_equals_addmm_with_gradients():
    ours, ref = leaves(), [t.detach().clone().requires_grad_(True) for t in leaves()]
    out, expected = affine(ours[0], ours[1], ours[2]), torch.addmm(ref[2], ref[0], ref[1])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    out.backward(g)
    expected.backward(g)
    for got, want in zip(ours, ref, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-5)


def test_affine_under_bf16_autocast_matches_addmm_to_bf16_precision():
    ours, ref = leaves(), [t.detach().clone().requires_grad_(True) for t in leaves()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = affine(*ours), torch.addmm(ref[2], ref[0], ref[1])
    assert out.dtype == expected.dtype == torch.bfloat16
    # Both round to bf16 (8 bits): addmm adds the bias before rounding, we after.
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=4e-2)
    out.float().sum().backward()
    expected.float().sum().backward()
    for got, want in zip(ours, ref, strict=True):
        assert got.grad.dtype == torch.float32
        torch.testing.assert_close(got.grad, want.grad, rtol=2e-2, atol=0.1)


@pytest.mark.parametrize("every_row_crowded", [False, True])
def test_top_positive_keeps_the_positive_part_of_each_rows_top_k(every_row_crowded):
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(40, 30, generator=g)
    pre[0] = -torch.rand(30, generator=g) - 0.1  # no positive entry at all
    pre[1, ::2] = -1.0  # no positive candidate
    if every_row_crowded:  # more than k positive candidates in every row
        pre = pre.abs() + 0.1
    candidates = torch.arange(0, 30, 2)  # 15 candidate columns
    k = 6
    pattern = top_positive(pre, candidates, k)
    got = torch.zeros_like(pre, dtype=torch.bool)
    got[pattern.rows, pattern.cols] = True
    assert pattern.nnz == int(got.sum()) and pattern.num_rows == 40
    positive = torch.zeros_like(got)
    positive[:, candidates] = pre[:, candidates] > 0
    for row in range(40):
        chosen, rest = pre[row][got[row]], pre[row][positive[row] & ~got[row]]
        # Only positive candidates; all of them if at most k, else k that no rest beats
        # (ties at the k-th value may go either way: row 1 of the crowded case is one).
        assert bool((got[row] <= positive[row]).all())
        assert len(chosen) == min(k, int(positive[row].sum()))
        assert rest.numel() == 0 or chosen.min() >= rest.max()
    counts = torch.bincount(pattern.rows, minlength=40)
    assert (counts == 6).all() if every_row_crowded else (counts[:2] == 0).all()
    # CSR order: rows non-decreasing, columns ascending within each row.
    key = pattern.rows * 30 + pattern.cols
    assert bool((key[1:] > key[:-1]).all())


def autocast_steps(dictionary, x, dead_mask, dtype, steps=1):
    """Adam steps as Lightning's ``bf16-mixed`` runs them: forward and loss under autocast,
    backward, decoder constraint and optimizer step outside it."""
    optimizer = torch.optim.Adam(dictionary.parameters(), lr=1e-2)
    history = []
    for _ in range(steps):
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = dictionary.forward_train(x)
            losses = dictionary.loss(x, out, dead_mask=dead_mask)
        losses["loss"].backward()
        dictionary.remove_parallel_decoder_grad_()
        grads = {n: p.grad.clone() for n, p in dictionary.named_parameters()}
        history.append(({k: v.detach() for k, v in losses.items()}, grads))
        optimizer.step()
        dictionary.normalize_decoder_()
        optimizer.zero_grad()
    return history


def _compare_autocast(architecture, device, dtype, rtol, atol):
    fields = {f.name for f in dataclasses.fields(get_dictionary_class(architecture).config_class)}
    sparse, dense = pair(architecture, **({"aux_k": 12} if "aux_k" in fields else {}))
    sparse, dense = sparse.to(device), dense.to(device)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2)).to(device) + 0.5
    dead = (torch.rand(96, generator=torch.Generator().manual_seed(1)) < 0.3).to(device)
    # One step: after it the two copies' weights differ by rounding, and in bf16 that can
    # flip a near-tie in the next selection (legitimately, in either path).
    s_hist = autocast_steps(sparse, x, dead, dtype)
    d_hist = autocast_steps(dense, x, dead, dtype)
    for (s_losses, s_grads), (d_losses, d_grads) in zip(s_hist, d_hist, strict=True):
        for name in d_losses:
            torch.testing.assert_close(s_losses[name], d_losses[name], rtol=rtol, atol=atol)
        for name in d_grads:
            torch.testing.assert_close(s_grads[name], d_grads[name], rtol=rtol, atol=atol)
    for name, p in dense.named_parameters():
        # Adam moves each weight by about lr (1e-2) per step whatever the gradient's size,
        # so a rounding-level gradient difference can move a weight by up to ~2 lr.
        torch.testing.assert_close(dict(sparse.named_parameters())[name], p, rtol=0, atol=0.05)


@pytest.mark.parametrize("architecture", sparse_architectures())
def test_sparse_path_equals_dense_path_under_bf16_autocast(architecture):
    # The selection is identical (both paths read the same bf16 pre-activations); the dense
    # decode rounds its matmul to bf16 where the sparse one sums in fp32: bf16-level tolerance.
    _compare_autocast(architecture, "cpu", torch.bfloat16, rtol=5e-2, atol=5e-2)


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("architecture", sparse_architectures())
def test_sparse_path_equals_dense_path_on_cuda(architecture, dtype):
    # fp32 on CUDA may use TF32 in matmuls depending on the user's settings: 1e-3 covers it.
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    _compare_autocast(architecture, "cuda", dtype, rtol=tol, atol=tol)
