"""BatchTopK's selection on CPU: the ``k * N`` largest ReLU'd entries of a batch (numba).

BatchTopK (Bussmann et al. 2024; SAELens ``BatchTopK``, dictionary_learning
``batch_top_k.py``) keeps the ``k * N`` largest ReLU'd pre-activations of the whole
``[N, d_latent]`` batch. ``torch.topk`` over the flattened batch (131k of 25M entries at
4096 x 6144, k 32) dominated the step: 517 ms, 6.3x the encoder matmul
(``benchmarks/train_step.py --architecture batchtopk``); its selection alone took 405 ms.
Here (40 ms, the row blocks split between threads):

1. a floor from a strided sample of the batch, placed so that about twice ``k * N``
   entries are expected to reach it (a positive float's bits order like the float, so
   entries are compared as integers; NaN counts as the largest, as in ``torch.topk``);
2. a vectorised count per row block of the entries reaching the floor; if they are fewer
   than ``k * N`` (a misleading sample) a lower floor is tried, and finally every positive
   entry, so the result is always exact;
3. one pass collecting those candidates per block in row-major order, then the exact
   ``k * N`` largest among them by a partition, ties at the threshold to the earliest
   positions.

A radix select (a 16-bit histogram of every positive entry, then the edge bin) was tried
first: its scattered increments made the histogram pass alone 52 ms.

Entries <= 0 are never selected: after the ReLU they are zero and get no gradient, so the
loss, the gradients and the threshold estimate are those of the torch path, which may also
pick zeros when fewer than ``k * N`` entries are positive (tests compare the two).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_interp.dictionaries.cpu_topk import bit_view, kernel_applies, kernel_threads

try:
    import numba
    import numpy as np
except ImportError:  # pragma: no cover - exercised only where numba cannot be installed
    numba = None

#: Entries sampled to place the first threshold (a strided sample over the whole batch).
_SAMPLE = 1 << 16

if numba is not None:

    @numba.njit(inline="always", boundscheck=False)
    def _key(v, magnitude, inf_bits):  # pragma: no cover - compiled
        # A positive float's bits order like the float; NaN (either sign) ranks above +inf;
        # -1 for entries that are zero after the ReLU. Branch-free, so loops vectorise.
        key = v if v > 0 else -1
        return magnitude if (v & magnitude) > inf_bits else key

    @numba.njit(parallel=True, nogil=True, cache=True, boundscheck=False)
    def _count_kernel(bits, magnitude, inf_bits, floor, n_blocks, counts):  # pragma: no cover
        n = bits.shape[0]
        block = (n + n_blocks - 1) // n_blocks
        for b in numba.prange(n_blocks):
            total = 0
            for r in range(b * block, min(n, (b + 1) * block)):
                row = bits[r]
                for j in range(row.shape[0]):
                    total += _key(row[j], magnitude, inf_bits) >= floor
            counts[b] = total

    @numba.njit(parallel=True, nogil=True, cache=True, boundscheck=False)
    def _collect_kernel(
        bits, magnitude, inf_bits, floor, n_blocks, at, keys, positions
    ):  # pragma: no cover - compiled
        # Keys and flat positions of the entries reaching ``floor``, each block from its
        # own offset, in row-major order.
        n, f = bits.shape
        block = (n + n_blocks - 1) // n_blocks
        for b in numba.prange(n_blocks):
            e = at[b]
            for r in range(b * block, min(n, (b + 1) * block)):
                row = bits[r]
                for j in range(f):
                    key = _key(row[j], magnitude, inf_bits)
                    if key >= floor:
                        keys[e] = key
                        positions[e] = r * f + j
                        e += 1


def _floors(bits, magnitude, inf_bits, count: int):
    """Thresholds to try, highest first.

    ~2x and ~8x ``count`` entries are expected above the first two (read off a strided
    sample of the batch); the last, key 1, admits every positive entry and always suffices.
    """
    flat = bits.reshape(-1)
    sample = flat[:: max(1, flat.size // _SAMPLE)].astype(np.int64)
    nan = (sample & magnitude) > inf_bits
    keys = np.where(nan, magnitude, np.where(sample > 0, sample, -1))
    floors = []
    for factor in (2, 8):
        expected = int(np.ceil(factor * count * keys.size / flat.size))
        if expected < keys.size:
            floors.append(int(np.partition(keys, keys.size - expected)[keys.size - expected]))
    return [f for f in floors if f > 0] + [1]  # key 1: the smallest positive float


def batch_topk_positions(pre: Tensor, count: int) -> Tensor | None:
    """Flat positions of the ``count`` largest positive entries of ``pre``, ascending.

    Args:
        pre: ``[N, F]`` pre-activations (before the ReLU).
        count: How many to keep (``k * N``); fewer when fewer entries are positive.

    Returns:
        ``[<= count]`` int64 positions ``row * F + col`` in ascending order, or ``None``
        where the kernel cannot run (the caller uses ``torch.topk``).
    """
    if not kernel_applies(pre) or pre.numel() == 0:
        return None
    n_blocks = 4 * kernel_threads()
    bits, _, magnitude, inf_bits = bit_view(pre.numpy())
    counts = np.empty(n_blocks, np.int64)
    for floor in _floors(bits, magnitude, inf_bits, count):
        floor = bits.dtype.type(floor)
        _count_kernel(bits, magnitude, inf_bits, floor, n_blocks, counts)
        if counts.sum() >= count:
            break  # enough candidates (the last floor, every positive entry, always ends)
    at = np.concatenate(([0], np.cumsum(counts)[:-1]))
    keys = np.empty(int(counts.sum()), bits.dtype)
    positions = np.empty(int(counts.sum()), np.int64)
    _collect_kernel(bits, magnitude, inf_bits, floor, n_blocks, at, keys, positions)
    if len(keys) > count:
        # The largest ``count``, ties at the threshold to the earliest positions.
        threshold = np.partition(keys, len(keys) - count)[len(keys) - count]
        keep = keys > threshold
        ties = np.flatnonzero(keys == threshold)[: count - int(keep.sum())]
        keep[ties] = True
        positions = positions[keep]
    return torch.from_numpy(positions)
