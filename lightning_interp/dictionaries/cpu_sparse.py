"""Latent-major ordering of a sparse pattern, and a tiled transpose, on CPU (numba).

The gradients of ``W_enc`` and ``W_dec`` are products of a latent-major CSR matrix with a
dense one, so every :class:`~lightning_interp.dictionaries.sparse_ops.SparsePattern` also
keeps its entries ordered by latent (rows ascending within each latent). In torch ops that
is a stable int32 radix ``argsort``, a gather and a ``bincount``: 15 ms for AuxK's 786k
entries at the benchmark shape (4096 rows x 192 dead latents). Here it is a two-pass
counting sort — count per latent, prefix sum, scatter — with the threads splitting the
entries, 5 ms; the order is the same (the sort is stable either way).

Measured and not kept: numba kernels for the gradients themselves (one pass per latent
computing the codes' gradient and the ``W_dec`` gradient, or the ``W_enc`` column). Each
entry gathers a whole gradient or input row from outside the L2 cache, and those kernels
were 1.3-1.5x slower than MKL's sampled and CSR products on the same entries.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_interp.dictionaries.cpu_topk import kernel_threads, kernels_available

try:
    import numba
    import numpy as np
except ImportError:  # pragma: no cover - exercised only where numba cannot be installed
    numba = None

__all__ = ["kernels_available", "latent_order", "transposed"]

if numba is not None:

    @numba.njit(parallel=True, nogil=True, cache=True, boundscheck=False)
    def _latent_order_kernel(cols, rows, d_latent, n_parts, order, rows_out, crow):
        nnz = cols.shape[0]
        part = (nnz + n_parts - 1) // n_parts
        starts = np.zeros((n_parts, d_latent), np.int64)
        for p in numba.prange(n_parts):
            for e in range(p * part, min(nnz, (p + 1) * part)):
                starts[p, cols[e]] += 1
        total = 0
        for f in range(d_latent):  # exclusive prefix sum in (latent, part) order: stable
            crow[f] = total
            for p in range(n_parts):
                count = starts[p, f]
                starts[p, f] = total
                total += count
        crow[d_latent] = total
        for p in numba.prange(n_parts):
            for e in range(p * part, min(nnz, (p + 1) * part)):
                f = cols[e]
                at = starts[p, f]
                starts[p, f] = at + 1
                order[at] = e
                rows_out[at] = rows[e]

    @numba.njit(parallel=True, nogil=True, cache=True, boundscheck=False)
    def _transpose_kernel(src, dst, tile):  # pragma: no cover - compiled
        n, m = src.shape
        row_tiles, col_tiles = (n + tile - 1) // tile, (m + tile - 1) // tile
        for t in numba.prange(row_tiles * col_tiles):
            i0, j0 = (t // col_tiles) * tile, (t % col_tiles) * tile
            for j in range(j0, min(m, j0 + tile)):
                for i in range(i0, min(n, i0 + tile)):
                    dst[j, i] = src[i, j]


def transposed(matrix: Tensor) -> Tensor:
    """``matrix.T`` as a new contiguous tensor (fp32/fp64 CPU matrices through the kernel).

    The ``W_enc`` gradient comes out of the latent-major product as ``[d_latent, d_in]``;
    the parameter is ``[d_in, d_latent]``, and autograd copies a transposed gradient into
    the parameter's layout. torch's strided copy took 34 ms at 16384 x 768 on a 2-core
    Xeon, this tiled one 10 ms.
    """
    if not (
        kernels_available()
        and matrix.device.type == "cpu"
        and matrix.dtype in (torch.float32, torch.float64)
        and matrix.dim() == 2
        and matrix.is_contiguous()
    ):
        return matrix.T.contiguous()
    out = matrix.new_empty(matrix.shape[1], matrix.shape[0])
    kernel_threads()
    _transpose_kernel(matrix.numpy(), out.numpy(), 64)  # 64 x 64 tiles: fastest measured
    return out


def latent_order(cols: Tensor, rows: Tensor, d_latent: int) -> tuple[Tensor, Tensor, Tensor]:
    """Entries ordered by latent, rows ascending within each latent (a stable sort).

    Args:
        cols: Latent of each entry, ``[nnz]`` int64 on CPU.
        rows: Row of each entry, ``[nnz]`` int64, non-decreasing.
        d_latent: Number of latents.

    Returns:
        ``(order, rows_by_latent, crow_by_latent)``: the permutation, the rows in that
        order, and the ``[d_latent + 1]`` offsets of each latent's entries.
    """
    nnz = cols.numel()
    order = torch.empty(nnz, dtype=torch.long)
    rows_out = torch.empty(nnz, dtype=torch.long)
    crow = torch.empty(d_latent + 1, dtype=torch.long)
    threads = kernel_threads()
    parts = threads if nnz >= 65536 else 1  # small patterns: one pass is cheaper
    _latent_order_kernel(
        cols.numpy(), rows.numpy(), d_latent, parts, order.numpy(), rows_out.numpy(), crow.numpy()
    )
    return order, rows_out, crow
