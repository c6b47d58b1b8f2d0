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

# torch flags every CSR construction as beta; the ops used here are long-standing.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


class SparsePattern:
    """The positions ``(row, indices[row, j])`` of a ``[N, k]`` selection, in two layouts.

    Row-major CSR (for sampling ``g @ W.T`` at the selected entries) and latent-major CSR
    (for ``W`` gradients: one sparse ``[d_latent, N]`` times dense ``[N, d]`` product).

    Args:
        indices: Selected latent ids ``[N, k]``; sorted within each row here (CSR needs it).
        d_latent: Number of latents.

    Attributes:
        indices: The sorted indices ``[N, k]``.
        order: Permutation that sorted each row (apply to values gathered with the
            original order).
    """

    def __init__(self, indices: Tensor, d_latent: int) -> None:
        indices, self.order = indices.sort(dim=-1)
        self.indices = indices
        self.d_latent = d_latent
        n, k = indices.shape
        flat = indices.reshape(-1)
        device = indices.device
        self.crow = torch.arange(0, n * k + 1, k, device=device)
        self.flat = flat
        self.by_latent_order = torch.argsort(flat, stable=True)
        self.by_latent_rows = torch.div(self.by_latent_order, k, rounding_mode="floor")
        counts = torch.bincount(flat, minlength=d_latent)
        self.crow_by_latent = torch.zeros(d_latent + 1, dtype=torch.long, device=device)
        self.crow_by_latent[1:] = counts.cumsum(0)
        self.shape = (n, k)

    def by_row(self, values: Tensor) -> Tensor:
        """CSR ``[N, d_latent]`` with ``values [N, k]`` at the selected entries."""
        n, _ = self.shape
        return torch.sparse_csr_tensor(
            self.crow,
            self.flat,
            values.reshape(-1),
            size=(n, self.d_latent),
            check_invariants=False,
        )

    def by_latent(self, values: Tensor) -> Tensor:
        """CSR ``[d_latent, N]``: the transpose of :meth:`by_row`, built directly."""
        n, _ = self.shape
        return torch.sparse_csr_tensor(
            self.crow_by_latent,
            self.by_latent_rows,
            values.reshape(-1)[self.by_latent_order],
            size=(self.d_latent, n),
            check_invariants=False,  # valid by construction; checking costs a pass
        )


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
        return pre.gather(-1, pattern.indices)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        x_in, w_enc = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        x_dtype, b_dec_dtype, b_enc_dtype = ctx.dtypes
        grad = grad.to(w_enc.dtype)
        grad_x = grad_b_dec = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # Sum of the k selected encoder columns, weighted by their gradients.
            grad_x = F.embedding_bag(
                pattern.indices, w_enc.T.contiguous(), per_sample_weights=grad, mode="sum"
            ).to(x_dtype)
        if ctx.needs_input_grad[2]:
            grad_w = (pattern.by_latent(grad) @ x_in.to(w_enc.dtype)).T
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
            per_latent = torch.zeros(pattern.d_latent, dtype=w_enc.dtype, device=grad.device)
            per_latent.index_add_(0, pattern.flat, grad.reshape(-1))
            if ctx.needs_input_grad[3]:
                grad_b = per_latent.to(b_enc_dtype)
            if ctx.needs_input_grad[1]:
                grad_b_dec = -(w_enc @ per_latent).to(b_dec_dtype)
        return grad_x, grad_b_dec, grad_w, grad_b, None, None


class _SparseDecode(torch.autograd.Function):
    """``sum_j values[n, j] * W_dec[indices[n, j]]`` with sparse gradients."""

    @staticmethod
    def forward(ctx, values, w_dec, pattern):  # noqa: D102
        values = values.to(w_dec.dtype)
        ctx.save_for_backward(values, w_dec)
        ctx.pattern = pattern
        return F.embedding_bag(pattern.indices, w_dec, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        values, w_dec = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        grad = grad.to(w_dec.dtype).contiguous()
        grad_values = grad_w = None
        if ctx.needs_input_grad[0]:
            # (grad @ W_dec.T) at the selected entries only.
            sampled = torch.sparse.sampled_addmm(
                pattern.by_row(torch.zeros_like(values)), grad, w_dec.T
            )
            grad_values = sampled.values().view(pattern.shape)
        if ctx.needs_input_grad[1]:
            grad_w = pattern.by_latent(values) @ grad
        return grad_values, grad_w, None


def gather_encoder(
    x: Tensor,
    b_dec: Tensor | None,
    w_enc: Tensor,
    b_enc: Tensor,
    pre: Tensor,
    pattern: SparsePattern,
) -> Tensor:
    """Selected pre-activations ``[N, k]``, differentiable w.r.t. every encoder input.

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
    """``[N, d_out]`` decoded from ``values [N, k]`` at ``pattern``, without ``b_dec``."""
    return _SparseDecode.apply(values, w_dec, pattern)
