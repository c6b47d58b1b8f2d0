"""The compiled CPU selection kernels (cpu_topk.py, cpu_sparse.py) select what torch does.

- ``topk_indices`` equals ``torch.topk``'s index set (sorted) on random rows of both chunk
  layouts (chunks of 32, and narrower chunks when ``d_latent < 32 k``), in fp32 and fp64,
  adds the bias in place exactly as ``add_`` would, ranks NaN above +inf as torch does, and
  breaks ties towards the lower index;
- ``top_positive_lists`` keeps the largest positive candidates, ascending;
- ``latent_order`` equals a stable argsort by latent;
- the torch fallback (``LIGHTNING_INTERP_NO_NUMBA=1``) gives the same selections, and a
  TopK training step gives the same losses and gradients either way.
"""

import copy

import pytest
import torch

from lightning_interp import create_dictionary
from lightning_interp.dictionaries import cpu_batch_topk, cpu_sparse, cpu_topk
from lightning_interp.dictionaries.cpu_batch_topk import batch_topk_positions
from lightning_interp.dictionaries.cpu_topk import top_positive_lists, topk_indices

pytestmark = pytest.mark.skipif(
    not cpu_topk.kernels_available(), reason="numba is not installed here"
)


def reference(pre, k):
    return pre.topk(k, dim=-1).indices.sort(dim=-1).values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("n", "f", "k"),
    [(64, 2048, 32), (33, 1000, 7), (16, 96, 5), (8, 50, 50), (5, 40, 1), (0, 64, 4)],
)
def test_topk_indices_equal_torch(dtype, n, f, k):
    g = torch.Generator().manual_seed(n + f + k)
    pre = torch.randn(n, f, generator=g, dtype=dtype)
    assert torch.equal(topk_indices(pre.clone(), k), reference(pre, k))


def test_bias_is_added_in_place_exactly():
    g = torch.Generator().manual_seed(0)
    pre, bias = torch.randn(40, 1024, generator=g), torch.randn(1024, generator=g)
    expected = pre + bias
    got = pre.clone()
    indices = topk_indices(got, 16, bias=bias)
    assert torch.equal(got, expected)  # one float add per entry: the same rounding
    assert torch.equal(indices, reference(expected, 16))


def test_nan_ranks_first_then_infinities():
    pre = torch.randn(4, 300, generator=torch.Generator().manual_seed(1))
    pre[0, 7] = float("nan")
    pre[1, [3, 200]] = float("inf")
    pre[1, 100] = float("nan")
    pre[2, 250] = -float("inf")
    pre[3] = float("nan")
    got = topk_indices(pre.clone(), 4)
    assert 7 in got[0].tolist()
    assert {3, 100, 200} <= set(got[1].tolist())
    assert torch.equal(got[2], reference(pre[2:3], 4)[0])
    assert got[3].tolist() == [0, 1, 2, 3]  # all tied (NaN): lowest indices


def test_ties_go_to_the_lower_index():
    pre = torch.zeros(3, 512)
    pre[1, 100:] = 1.0
    pre[2, ::2] = 2.0
    got = topk_indices(pre, 8)
    assert got[0].tolist() == list(range(8))
    assert got[1].tolist() == list(range(100, 108))
    assert got[2].tolist() == list(range(0, 16, 2))


def test_top_positive_lists_match_a_sorted_reference():
    g = torch.Generator().manual_seed(3)
    pre = torch.randn(50, 3000, generator=g)
    pre[0] = -1.0  # no positive entry
    candidates = torch.randperm(3000, generator=g)[:700].sort().values
    pre[1, candidates[3]] = float("nan")  # NaN is never positive: zero after the ReLU
    cols, counts = top_positive_lists(pre, candidates, 64)
    for row in range(50):
        sub = pre[row, candidates].nan_to_num(nan=-1.0)  # (torch.topk would rank NaN first)
        positive = candidates[sub > 0]
        want = positive if len(positive) <= 64 else candidates[sub.topk(64).indices]
        assert counts[row] == len(want)
        assert cols[row, : counts[row]].tolist() == want.sort().values.tolist()
    assert counts[0] == 0


def test_latent_order_is_a_stable_sort_by_latent():
    g = torch.Generator().manual_seed(4)
    rows = torch.arange(30_000).repeat_interleave(3)  # 90k entries: the threaded path
    cols = torch.randint(0, 500, (90_000,), generator=g)
    order, rows_out, crow = cpu_sparse.latent_order(cols, rows, 500)
    expected = torch.argsort(cols, stable=True)
    assert torch.equal(order, expected)
    assert torch.equal(rows_out, rows[expected])
    assert torch.equal(crow[1:] - crow[:-1], torch.bincount(cols, minlength=500))


def test_torch_fallback_selects_the_same(monkeypatch):
    pre = torch.randn(20, 700, generator=torch.Generator().manual_seed(5))
    bias = torch.randn(700)
    compiled = topk_indices(pre.clone(), 9, bias=bias)
    monkeypatch.setenv(cpu_topk.DISABLE_ENV, "1")
    assert not cpu_topk.kernels_available()
    assert top_positive_lists(pre, torch.arange(0, 700, 3), 4) is None
    assert torch.equal(topk_indices(pre.clone(), 9, bias=bias), compiled)


def test_training_step_is_the_same_with_and_without_the_kernels(monkeypatch):
    # d_latent 512, k 8: chunks of 32 (the layout the benchmark shape uses), AuxK on.
    torch.manual_seed(0)
    compiled = create_dictionary("topk", d_in=32, d_latent=512, k=8, aux_k=16)
    with torch.no_grad():
        compiled.b_enc.normal_()
    fallback = copy.deepcopy(compiled)
    x = torch.randn(128, 32)
    dead = torch.rand(512, generator=torch.Generator().manual_seed(6)) < 0.25

    def step(dictionary):
        out = dictionary.forward_train(x)
        losses = dictionary.loss(x, out, dead_mask=dead)
        losses["loss"].backward()
        return losses, {n: p.grad for n, p in dictionary.named_parameters()}

    losses, grads = step(compiled)
    monkeypatch.setenv(cpu_topk.DISABLE_ENV, "1")
    ref_losses, ref_grads = step(fallback)
    assert float(losses["auxk_loss"].detach()) > 0
    for name, value in ref_losses.items():
        torch.testing.assert_close(losses[name], value, rtol=1e-6, atol=1e-7)
    for name, value in ref_grads.items():
        torch.testing.assert_close(grads[name], value, rtol=1e-5, atol=1e-6)


def test_latent_product_ignores_its_uninitialised_output():
    # addmm with beta=0 must not read the fresh output; NaN-filled memory shows if it does.
    from lightning_interp.dictionaries.sparse_ops import SparsePattern

    g = torch.Generator().manual_seed(7)
    pattern = SparsePattern.from_topk(torch.randn(64, 300, generator=g).topk(5).indices, 300)
    values, dense = torch.rand(pattern.nnz, generator=g), torch.randn(64, 24, generator=g)
    expected = pattern.dense(values).T @ dense
    garbage = torch.full((300, 24), float("nan"))
    torch.addmm(garbage, pattern.by_latent(values), dense, beta=0, out=garbage)
    torch.testing.assert_close(garbage, expected)
    torch.testing.assert_close(pattern.latent_product(values, dense), expected)


@pytest.mark.parametrize("shape", [(1, 1), (130, 70), (64, 64), (3, 500)])
def test_transposed_equals_torch(shape):
    matrix = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    out = cpu_sparse.transposed(matrix)
    assert out.is_contiguous() and torch.equal(out, matrix.T)


def test_row_dots_equal_the_one_line_version():
    from lightning_interp.dictionaries.rowwise import row_dots

    g = torch.Generator().manual_seed(9)
    a, b = torch.randn(2500, 33, generator=g), torch.randn(2500, 33, generator=g)
    torch.testing.assert_close(row_dots(a, b), (a * b).sum(1, keepdim=True))


@pytest.mark.parametrize("k", [0, 65])
def test_k_outside_the_row_is_refused(k):
    from lightning_interp.errors import ShapeMismatchError

    with pytest.raises(ShapeMismatchError, match="k must be in"):
        topk_indices(torch.randn(3, 64), k)


def batch_reference(pre, count):
    """torch's BatchTopK selection, positive entries only (zeros get no gradient)."""
    flat = torch.relu(pre).flatten().nan_to_num(nan=float("inf"))
    chosen = flat.topk(count).indices
    return chosen[flat[chosen] > 0].sort().values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("n", "f", "k"), [(256, 512, 8), (33, 100, 3), (4, 7, 2)])
def test_batch_topk_positions_equal_torch(dtype, n, f, k):
    pre = torch.randn(n, f, generator=torch.Generator().manual_seed(n * f), dtype=dtype)
    got = batch_topk_positions(pre, k * n)
    assert torch.equal(got, batch_reference(pre, k * n))


def test_batch_topk_keeps_every_positive_entry_when_fewer_than_asked():
    pre = -torch.rand(40, 300, generator=torch.Generator().manual_seed(10))
    pre[3, [5, 9]] = torch.tensor([2.0, 1.0])
    pre[20, 0] = float("nan")  # ranked first, as torch.topk ranks NaN
    assert batch_topk_positions(pre, 100).tolist() == [3 * 300 + 5, 3 * 300 + 9, 20 * 300]


def test_batch_topk_survives_a_misleading_sample():
    # Every entry the strided sample reads is huge, the rest small and positive: the first
    # thresholds admit too few entries and the kernel must fall back to lower ones.
    # (1M entries, every 16th sampled: a floor expecting 2x or 8x of 5,000 above it admits
    # only 625 or 2,500 here.)
    pre = torch.rand(256, 4096, generator=torch.Generator().manual_seed(11)) + 0.01
    flat = pre.view(-1)
    flat[:: flat.numel() // (1 << 16)] += 100.0 + torch.rand(1 << 16)
    first = cpu_batch_topk._floors(
        flat.view(256, 4096).numpy().view("int32"), 0x7FFFFFFF, 0x7F800000, 5000
    )
    assert len(first) == 3 and (flat.view(torch.int32) >= first[1]).sum() < 5000
    assert torch.equal(batch_topk_positions(pre, 5000), batch_reference(pre, 5000))


def test_batch_topk_ties_are_filled_to_exactly_the_count():
    pre = torch.ones(16, 64)
    got = batch_topk_positions(pre, 100)
    assert got.tolist() == list(range(100))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_column_top_equals_torch_topk_over_the_batch(dtype):
    from lightning_interp.dictionaries.choice import column_top

    g = torch.Generator().manual_seed(12)
    pre = torch.randn(300, 700, generator=g, dtype=dtype)
    pre[:, 5] = -torch.rand(300, generator=g, dtype=dtype)  # a latent with nothing positive
    pre[:290, 6] = -1.0  # and one with fewer positive rows than the depth
    values, rows = column_top(pre, 12)
    expected_values, expected_rows = torch.relu(pre).topk(12, dim=0)
    assert torch.equal(values, expected_values)
    positive = expected_values > 0  # zeros after the ReLU: any row is a valid pick
    assert torch.equal(rows[positive], expected_rows[positive])
