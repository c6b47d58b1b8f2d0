"""Row-wise top-k selection on CPU, compiled with numba.

``torch.topk`` on CPU copies each row into a vector of (value, index) pairs and
partially sorts it: at 4096 x 6144 with k = 32 that took 36 ms on a 2-core Xeon, a
third of a whole TopK training step (``benchmarks/train_step.py``). A TopK step only needs
the *indices* of each row's ``k`` largest entries, in ascending order (what
:class:`~lightning_interp.dictionaries.sparse_ops.SparsePattern` stores). Per row, while
it is in the L1 cache, the kernel here adds the encoder bias (instead of a separate
full-width ``add_``), maps the floats to integer keys that sort like them (integer max and
compare vectorise; float ones do not without fast-math), takes the maxima of 32-entry
chunks, finds by bisection the largest threshold that at least ``k`` chunk maxima reach,
scans only the chunks whose maximum reaches it, and keeps the ``k`` largest of those
candidates: 13 ms at that shape. (A running ``k``-entry min-heap was as slow as torch:
one dependent compare per entry.)

Same selection as ``torch.topk``: the ``k`` largest entries, NaN ranked above everything
(as torch does), ties broken towards the lower index (torch leaves ties unspecified).
Where numba is missing, or for other devices and dtypes (CUDA, bf16), the functions fall
back to torch ops with the same results; ``tests/dictionaries/test_cpu_topk.py`` checks the
kernels against ``torch.topk`` on random, tied, NaN and infinite rows.

Reference: the selection is Gao et al. (2024)'s TopK activation (openai/sparse_autoencoder
``TopK``); the kernels only change how it is computed.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from lightning_interp.errors import ShapeMismatchError

try:  # numba is a dependency, but a platform without its wheels still gets the torch path
    import numba
    import numpy as np
except ImportError:  # pragma: no cover - exercised only where numba cannot be installed
    numba = None

#: Environment switch to force the torch fallback (e.g. to compare the two paths).
DISABLE_ENV = "LIGHTNING_INTERP_NO_NUMBA"

#: The dtypes the compiled kernels take (others use the torch ops).
KERNEL_DTYPES = (torch.float32, torch.float64)
_CHUNK = 32  # entries per chunk maximum in the top-k kernel


def kernels_available() -> bool:
    """Whether the compiled kernels can run here (numba importable and not disabled)."""
    return numba is not None and os.environ.get(DISABLE_ENV, "") in ("", "0")


def kernel_applies(pre: Tensor) -> bool:
    """Whether the kernels take ``pre`` (CPU, fp32/fp64, 2-D, contiguous, no grad)."""
    return (
        kernels_available()
        and pre.device.type == "cpu"
        and pre.dtype in KERNEL_DTYPES
        and pre.dim() == 2
        and pre.is_contiguous()
        and not pre.requires_grad
    )


if numba is not None:

    @numba.njit(inline="always", boundscheck=False)
    def _kth_largest(keys, n, k):  # pragma: no cover - compiled
        # Largest t with at least k of keys[:n] >= t, by bisection on the key range: each
        # probe is one vectorised count, no data-dependent branches (a quickselect's
        # mispredictions cost more at these sizes).
        lo = np.int64(keys[0])
        hi = lo
        for j in range(n):
            v = np.int64(keys[j])
            lo = min(lo, v)
            hi = max(hi, v)
        zero = keys[0] - keys[0]  # the keys' own integer type, so the count vectorises
        while lo < hi:
            # ceil((lo + hi) / 2) without overflow (fp64 keys span all of int64)
            mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1) + ((lo ^ hi) & 1)
            probe = zero + mid
            count = zero
            for j in range(n):
                count += keys[j] >= probe
            if count >= k:
                lo = mid
            else:
                hi = mid - 1
        return lo

    @numba.njit(inline="always", boundscheck=False)
    def _emit_largest(keys, positions, n, k, out):  # pragma: no cover - compiled
        # The k largest of keys[:n], written to ``out`` in listed order (ties at the
        # threshold go to the earliest listed).
        threshold = _kth_largest(keys, n, k)
        above = 0
        for j in range(n):
            above += keys[j] > threshold
        ties = k - above
        written = 0
        for j in range(n):
            key = keys[j]
            if key > threshold or (key == threshold and ties > 0):
                if key == threshold:
                    ties -= 1
                out[written] = positions[j]
                written += 1

    @numba.njit(inline="always", boundscheck=False)
    def _chunk_keys(row_bits, keys, start, size, shift, magnitude, inf_bits):  # pragma: no cover
        # Keys of row_bits[start:start + size] into ``keys``; returns their maximum.
        m = -magnitude
        for j in range(start, start + size):
            v = row_bits[j]
            key = v ^ ((v >> shift) & magnitude)
            key = magnitude if (v & magnitude) > inf_bits else key  # NaN: above everything
            keys[j] = key
            m = max(m, key)
        return m

    @numba.njit(parallel=True, nogil=True, cache=True, boundscheck=False)
    def _topk_rows_kernel(
        pre, bits, bias, add_bias, k, chunk, shift, magnitude, inf_bits, out_idx, n_blocks
    ):  # pragma: no cover - compiled
        # ``bits`` is ``pre`` viewed as same-width integers. Floats map to integer keys
        # that sort like the floats (flip the magnitude bits of negatives), NaN to the
        # largest key: integer max and compare vectorise, float ones do not without
        # fast-math. Per row: chunk maxima; the k-th largest of them is a threshold that
        # at least k entries reach; only chunks whose maximum reaches it are scanned for
        # candidates, and the k largest candidates are the row's top k.
        n, f = pre.shape
        n_chunks = (f + chunk - 1) // chunk
        block = (n + n_blocks - 1) // n_blocks
        for b in numba.prange(n_blocks):
            keys = np.empty(f, bits.dtype)
            maxima = np.empty(n_chunks, bits.dtype)
            cand_keys = np.empty(f, bits.dtype)
            cand_pos = np.empty(f, np.int64)
            for r in range(b * block, min(n, (b + 1) * block)):
                if add_bias:
                    row = pre[r]
                    for j in range(f):
                        row[j] += bias[j]
                row_bits = bits[r]
                # Whole chunks of _CHUNK have a constant trip count: unrolled, vectorised.
                full = f // _CHUNK if chunk == _CHUNK else 0
                for c in range(full):
                    maxima[c] = _chunk_keys(
                        row_bits, keys, c * _CHUNK, _CHUNK, shift, magnitude, inf_bits
                    )
                for c in range(full, n_chunks):
                    start = c * chunk
                    size = min(chunk, f - start)
                    maxima[c] = _chunk_keys(row_bits, keys, start, size, shift, magnitude, inf_bits)
                threshold = _kth_largest(maxima, n_chunks, k)
                n_cand = 0
                for c in range(n_chunks):
                    if maxima[c] < threshold:
                        continue
                    for j in range(c * chunk, min(f, (c + 1) * chunk)):
                        if keys[j] >= threshold:
                            cand_keys[n_cand] = keys[j]
                            cand_pos[n_cand] = j
                            n_cand += 1
                _emit_largest(cand_keys, cand_pos, n_cand, k, out_idx[r])

    @numba.njit(parallel=True, nogil=True, cache=True, boundscheck=False)
    def _top_positive_kernel(
        bits, inf_bits, candidates, k, out_cols, out_count, n_blocks
    ):  # pragma: no cover - compiled
        # A positive float's bits order like the float: the keys are the bits themselves.
        n = bits.shape[0]
        c = candidates.shape[0]
        block = (n + n_blocks - 1) // n_blocks
        for b in numba.prange(n_blocks):
            keys = np.empty(c, bits.dtype)
            cols = np.empty(c, np.int64)
            for r in range(b * block, min(n, (b + 1) * block)):
                row_bits = bits[r]
                size = 0
                for p in range(c):
                    v = row_bits[candidates[p]]
                    # Branch-free compaction (about half the entries pass, unpredictably):
                    # keep > +0 and not NaN; the rest is zero after the ReLU, no gradient.
                    keys[size] = v
                    cols[size] = candidates[p]
                    size += (v > 0) & (v <= inf_bits)
                if size > k:
                    _emit_largest(keys, cols, size, k, out_cols[r])
                    size = k
                else:
                    out_cols[r, :size] = cols[:size]
                out_count[r] = size


def bit_view(values):
    """``values`` as same-width signed integers, with the constants the kernels need."""
    if values.dtype == np.float32:
        i = np.int32
        return values.view(i), i(31), i(0x7FFFFFFF), i(0x7F800000)
    i = np.int64
    return values.view(i), i(63), i(0x7FFFFFFFFFFFFFFF), i(0x7FF0000000000000)


def kernel_threads() -> int:
    """Set numba's thread count to torch's (both pools share the same cores); return it."""
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    return threads


def _blocks() -> int:
    # A few row blocks per thread even out rows of different cost.
    return 4 * kernel_threads()


def topk_indices(pre: Tensor, k: int, bias: Tensor | None = None) -> Tensor:
    """Indices of the ``k`` largest entries of each row, ascending within the row.

    Args:
        pre: ``[N, F]`` scores, not requiring grad. If ``bias`` is given it is added to
            ``pre`` **in place** first (in the same pass on CPU).
        k: Entries per row (``1 <= k <= F``).
        bias: Optional ``[F]`` added to every row before selecting.

    Returns:
        ``[N, k]`` int64 column indices, ascending within each row.
    """
    if not 1 <= k <= pre.shape[-1]:
        raise ShapeMismatchError(
            f"cannot select k={k} entries from rows of {pre.shape[-1]}; k must be in [1, width]"
        )
    if not kernel_applies(pre):
        if bias is not None:
            pre.add_(bias.detach().to(pre.dtype))
        return pre.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values
    n, f = pre.shape
    out = torch.empty(n, k, dtype=torch.long)
    if n == 0:
        return out
    has_bias = bias is not None
    bias_np = (bias.detach().to(pre.dtype).contiguous() if has_bias else pre.new_zeros(1)).numpy()
    values = pre.numpy()
    bits, shift, magnitude, inf_bits = bit_view(values)
    # Chunks of 32 keep the chunk maxima vectorised; at least k chunks are needed.
    chunk = max(1, min(_CHUNK, f // k))
    consts = (shift, magnitude, inf_bits)
    _topk_rows_kernel(values, bits, bias_np, has_bias, k, chunk, *consts, out.numpy(), _blocks())
    return out


def top_positive_lists(pre: Tensor, candidates: Tensor, k: int) -> tuple[Tensor, Tensor] | None:
    """Per row, the up to ``k`` largest positive entries among ``candidates`` columns.

    Args:
        pre: ``[N, F]`` pre-activations.
        candidates: Ascending column ids ``[c]``.
        k: At most this many per row.

    Returns:
        ``(cols [N, k], counts [N])``: row ``r``'s chosen columns ascending in
        ``cols[r, :counts[r]]`` (the rest is unspecified); ``None`` where the kernel cannot
        run (the caller uses torch ops).
    """
    if not kernel_applies(pre):
        return None
    n = pre.shape[0]
    cols = torch.empty(n, k, dtype=torch.long)
    counts = torch.empty(n, dtype=torch.long)
    if n:
        cands = candidates.to(torch.long).contiguous().numpy()
        bits, _, _, inf_bits = bit_view(pre.numpy())
        _top_positive_kernel(bits, inf_bits, cands, k, cols.numpy(), counts.numpy(), _blocks())
    return cols, counts
