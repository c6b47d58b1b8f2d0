"""Sparse training kernels for TopK-style dictionaries, in plain torch.

After the dense encoder matmul and the top-k selection, a TopK step needs only the ``k``
selected latents of each row. These autograd functions keep the rest of the step in
O(batch * k * d):

- decoding gathers ``k`` decoder rows per row (``embedding_bag``), never a dense
  ``[batch, d_latent] @ W_dec``;
- the gradient of the selected codes is ``g @ W_dec.T`` sampled at the selected entries
  (``sampled_addmm``), and the decoder gradient is a latent-major sparse matrix times
  ``g``;
- the encoder gradient flows only into the selected columns of ``W_enc`` / ``b_enc``.

The pre-activations are computed once without autograd; the functions here read them.
Results equal the dense path's within float tolerance (tests compare losses, gradients
and updated weights).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_interp.dictionaries import cpu_sparse
from lightning_interp.dictionaries.cpu_topk import top_positive_lists

# torch flags every CSR construction as beta; the ops used here are long-standing.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


class SparsePattern:
    """Selected entries ``(rows[j], cols[j])`` of an ``[N, d_latent]`` code matrix.

    Entries are kept row-major with columns ascending within each row (what CSR needs),
    in two CSR layouts: by row (for sampling ``g @ W.T`` at the entries, and for decoding
    with ``embedding_bag``) and by latent (for ``W`` gradients: one sparse
    ``[d_latent, N]`` times dense ``[N, d]`` product). Rows may hold different numbers of
    entries (BatchTopK) or exactly ``k`` each (TopK, see :meth:`from_topk`).

    Args:
        rows: Row of each entry, ``[nnz]``, non-decreasing.
        cols: Latent of each entry, ``[nnz]``, ascending within a row.
        num_rows: ``N``.
        d_latent: Number of latents.

    Attributes:
        indices: For a fixed ``k`` per row, the latents as ``[N, k]``; else ``None``.
    """

    def __init__(
        self,
        rows: Tensor,
        cols: Tensor,
        num_rows: int,
        d_latent: int,
        *,
        crow: Tensor | None = None,
    ) -> None:
        self.rows, self.cols = rows, cols
        self.num_rows, self.d_latent = num_rows, d_latent
        self.indices: Tensor | None = None
        self.crow = crow if crow is not None else self._offsets(rows, num_rows)
        if cpu_sparse.kernels_available() and cols.device.type == "cpu":
            # One counting sort (cpu_sparse.py) instead of argsort + gather + bincount.
            ordered = cpu_sparse.latent_order(cols.long().contiguous(), rows.long(), d_latent)
            self.by_latent_order, self.by_latent_rows, self.crow_by_latent = ordered
            return
        # Stable, so rows stay ascending within a latent. int32 keys: torch's CPU sort takes
        # a radix path for them, ~8x faster than for int64 at 131k entries (measured).
        keys = cols.to(torch.int32) if d_latent < 2**31 else cols
        self.by_latent_order = torch.argsort(keys, stable=True)
        self.by_latent_rows = rows[self.by_latent_order]
        self.crow_by_latent = self._offsets(cols, d_latent)

    @staticmethod
    def _offsets(ids: Tensor, size: int) -> Tensor:
        offsets = torch.zeros(size + 1, dtype=torch.long, device=ids.device)
        offsets[1:] = torch.bincount(ids, minlength=size).cumsum(0)
        return offsets

    @classmethod
    def from_topk(cls, indices: Tensor, d_latent: int, *, presorted: bool = False) -> SparsePattern:
        """``k`` latents per row, ``indices [N, k]``.

        They are sorted within rows here, unless ``presorted`` says they already ascend
        (as :func:`~lightning_interp.dictionaries.cpu_topk.topk_indices` returns them).
        """
        if not presorted:
            indices = indices.sort(dim=-1).values
        n, k = indices.shape
        rows = torch.arange(n, device=indices.device).repeat_interleave(k)
        crow = torch.arange(0, n * k + 1, k, device=indices.device)
        pattern = cls(rows, indices.reshape(-1), n, d_latent, crow=crow)
        pattern.indices = indices
        return pattern

    @classmethod
    def from_flat(
        cls, flat: Tensor, num_rows: int, d_latent: int, *, presorted: bool = False
    ) -> SparsePattern:
        """Entries given as flat positions ``row * d_latent + col``.

        Any order, or ascending if ``presorted`` says so (then no sort).
        """
        if not presorted:
            flat = flat.sort().values
        return cls(flat // d_latent, flat % d_latent, num_rows, d_latent)

    @property
    def nnz(self) -> int:
        """Number of selected entries."""
        return self.cols.numel()

    def gather(self, dense: Tensor) -> Tensor:
        """The entries of a dense ``[N, d_latent]`` matrix, ``[nnz]``."""
        if self.indices is not None:
            return dense.gather(-1, self.indices).reshape(-1)
        return dense[self.rows, self.cols]

    def bag(self, weight: Tensor, values: Tensor) -> Tensor:
        """``sum_j values[j] * weight[cols[j]]`` per row, ``[N, d]`` (an ``embedding_bag``)."""
        return F.embedding_bag(
            self.cols, weight, self.crow[:-1], per_sample_weights=values, mode="sum"
        )

    def by_row(self, values: Tensor) -> Tensor:
        """CSR ``[N, d_latent]`` holding ``values [nnz]`` at the entries."""
        return torch.sparse_csr_tensor(
            self.crow,
            self.cols,
            values.reshape(-1),
            size=(self.num_rows, self.d_latent),
            check_invariants=False,  # valid by construction; checking costs a pass
        )

    def by_latent(self, values: Tensor) -> Tensor:
        """CSR ``[d_latent, N]``: the transpose of :meth:`by_row`, built directly."""
        return torch.sparse_csr_tensor(
            self.crow_by_latent,
            self.by_latent_rows,
            values.reshape(-1)[self.by_latent_order],
            size=(self.d_latent, self.num_rows),
            check_invariants=False,
        )

    def latent_product(self, values: Tensor, dense: Tensor) -> Tensor:
        """``by_latent(values) @ dense``: ``[d_latent, d]`` from ``dense [N, d]``.

        On CPU torch's ``csr @ dense`` zero-fills its output, has MKL write into a
        temporary and copies that back: 32 ms at 16384 latents x 768 where the product
        itself takes 4 ms. ``addmm`` with ``beta=0`` into a given output skips both (MKL
        never reads that output; a test pins that garbage in it cannot leak through).
        """
        sparse = self.by_latent(values)
        if dense.device.type != "cpu":
            return sparse @ dense
        out = dense.new_empty(self.d_latent, dense.shape[1])
        return torch.addmm(out, sparse, dense, beta=0, out=out)

    def dense(self, values: Tensor) -> Tensor:
        """The ``[N, d_latent]`` matrix with ``values`` at the entries (differentiable)."""
        zeros = values.new_zeros(self.num_rows, self.d_latent)
        return zeros.index_put((self.rows, self.cols), values.reshape(-1))


class _GatherEncoder(torch.autograd.Function):
    """``pre[n, indices[n, j]]`` with gradients only at the selected entries.

    ``pre = (x - b_dec) @ W_enc + b_enc`` was computed without autograd. ``b_dec`` enters
    here rather than through an autograd subtraction so that its gradient,
    ``-W_enc @ grad_b_enc``, costs a matrix-vector product instead of a
    ``[N, d_in]`` gradient of the centred input.
    """

    @staticmethod
    def forward(ctx, x, b_dec, w_enc, b_enc, pre, pattern):  # noqa: D102
        x_in = x if b_dec is None else x - b_dec
        ctx.save_for_backward(x_in, w_enc)
        ctx.pattern = pattern
        ctx.dtypes = (x.dtype, None if b_dec is None else b_dec.dtype, b_enc.dtype)
        return pattern.gather(pre)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        # Autocast off: the CSR products have no bf16 kernel on CPU, and a backward run
        # inside an autocast region (a user's own loop) would otherwise route them to one.
        with torch.autocast(grad.device.type, enabled=False):
            return _GatherEncoder._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        x_in, w_enc = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        x_dtype, b_dec_dtype, b_enc_dtype = ctx.dtypes
        grad = grad.to(w_enc.dtype)
        grad_x = grad_b_dec = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # Sum of the selected encoder columns, weighted by their gradients.
            grad_x = pattern.bag(w_enc.T.contiguous(), grad).to(x_dtype)
        if ctx.needs_input_grad[2]:
            # Latent-major product, then into the parameter's [d_in, d_latent] layout.
            grad_w = cpu_sparse.transposed(pattern.latent_product(grad, x_in.to(w_enc.dtype)))
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
            per_latent = torch.zeros(pattern.d_latent, dtype=w_enc.dtype, device=grad.device)
            per_latent.index_add_(0, pattern.cols, grad)
            if ctx.needs_input_grad[3]:
                grad_b = per_latent.to(b_enc_dtype)
            if ctx.needs_input_grad[1]:
                grad_b_dec = -(w_enc @ per_latent).to(b_dec_dtype)
        return grad_x, grad_b_dec, grad_w, grad_b, None, None


class _SparseDecode(torch.autograd.Function):
    """``sum_j values[j] * W_dec[cols[j]]`` per row, with sparse gradients."""

    @staticmethod
    def forward(ctx, values, w_dec, pattern):  # noqa: D102
        ctx.values_shape = values.shape
        values = values.reshape(-1).to(w_dec.dtype)
        ctx.save_for_backward(values, w_dec)
        ctx.pattern = pattern
        return pattern.bag(w_dec, values)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        with torch.autocast(grad.device.type, enabled=False):  # as _GatherEncoder.backward
            return _SparseDecode._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        values, w_dec = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        grad = grad.to(w_dec.dtype).contiguous()
        grad_values = grad_w = None
        if ctx.needs_input_grad[0]:
            # (grad @ W_dec.T) at the selected entries only.
            sampled = torch.sparse.sampled_addmm(
                pattern.by_row(torch.zeros_like(values)), grad, w_dec.T
            )
            grad_values = sampled.values().view(ctx.values_shape)
        if ctx.needs_input_grad[1]:
            grad_w = pattern.latent_product(values, grad)
        return grad_values, grad_w, None


def affine(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``x @ weight + bias`` as a GEMM and an in-place bias add (differentiable).

    ``torch.addmm(bias, x, weight)`` first broadcasts ``bias`` into the whole
    ``[N, d_latent]`` output and then runs the GEMM on top of it (beta = 1). A profile
    blamed that copy for about half the GEMM's time at 4096 x 384 -> 6144 on CPU; most of
    it was the first touch of the freshly allocated output (page faults), which whichever
    op writes first pays — the training path avoids it by reusing its output
    (``workspace.py``) and adds the bias inside the top-k kernel (``cpu_topk.py``). This
    function serves the other encoders: one GEMM, then one in-place add, under autocast in
    the autocast dtype with the bias cast to it, as ``addmm`` would.

    Args:
        x: ``[N, d_in]``.
        weight: ``[d_in, d_latent]``.
        bias: ``[d_latent]``.
    """
    out = torch.mm(x, weight)
    return out.add_(bias.to(out.dtype))


def top_positive(pre: Tensor, candidates: Tensor, k: int) -> SparsePattern:
    """The up to ``k`` largest *positive* entries of each row among ``candidates`` columns.

    What AuxK needs (Gao et al. 2024): the top ``k`` dead latents' ReLU'd pre-activations.
    An entry <= 0 is zero after the ReLU and gets no gradient, so dropping it changes
    neither the loss nor any gradient; what it saves is the top-k itself, which only runs
    on the rows with more than ``k`` positive candidates (none, while dead latents sit
    below zero). Rows therefore hold different numbers of entries.

    Args:
        pre: ``[N, d_latent]`` pre-activations.
        candidates: Ascending column ids ``[c]`` (e.g. the dead latents).
        k: At most this many entries per row.
    """
    lists = top_positive_lists(pre, candidates, k)
    if lists is not None:  # the compiled CPU kernel: one pass, no [N, c] copy
        cols, counts = lists
        n = pre.shape[0]
        if bool((counts == k).all()):
            return SparsePattern.from_topk(cols, pre.shape[1], presorted=True)
        keep = torch.arange(k, device=cols.device) < counts.unsqueeze(1)
        rows = torch.arange(n, device=cols.device).repeat_interleave(counts)
        return SparsePattern(rows, cols[keep], n, pre.shape[1])
    sub = pre.index_select(-1, candidates)
    keep = sub > 0
    crowded = (keep.sum(-1) > k).nonzero().squeeze(1)
    if crowded.numel() == sub.shape[0]:
        # Every row has k positive candidates: a fixed k per row, whose pattern gathers
        # and sorts far faster than a ragged one (what AuxK did before this filter).
        top = sub.topk(k, dim=-1, sorted=False).indices
        return SparsePattern.from_topk(candidates[top], pre.shape[1])
    if crowded.numel():
        top = sub.index_select(0, crowded).topk(k, dim=-1, sorted=False).indices
        chosen = torch.zeros(crowded.numel(), sub.shape[1], dtype=torch.bool, device=sub.device)
        keep[crowded] = chosen.scatter_(1, top, True)
    rows, local = keep.nonzero(as_tuple=True)  # row-major, columns ascending
    return SparsePattern(rows, candidates[local], pre.shape[0], pre.shape[1])


def gather_encoder(
    x: Tensor,
    b_dec: Tensor | None,
    w_enc: Tensor,
    b_enc: Tensor,
    pre: Tensor,
    pattern: SparsePattern,
) -> Tensor:
    """Selected pre-activations ``[nnz]``, differentiable w.r.t. every encoder input.

    Args:
        x: Input ``[N, d_in]``.
        b_dec: Subtracted from ``x`` before encoding, or ``None`` (no centring).
        w_enc: ``[d_in, d_latent]``.
        b_enc: ``[d_latent]``.
        pre: ``(x - b_dec) @ w_enc + b_enc``, computed without autograd.
        pattern: The selection.
    """
    return _GatherEncoder.apply(x, b_dec, w_enc, b_enc, pre.detach(), pattern)


def sparse_decode(values: Tensor, w_dec: Tensor, pattern: SparsePattern) -> Tensor:
    """``[N, d_out]`` decoded from ``values [nnz]`` at ``pattern``, without ``b_dec``."""
    return _SparseDecode.apply(values, w_dec, pattern)
