"""A reused output buffer for the encoder GEMM of a training step (CPU).

Every training step of a TopK-style dictionary computes ``[N, d_latent]`` pre-activations,
the largest tensor of the step (100 MB at 4096 x 6144 in fp32). A fresh tensor that size
is a fresh ``mmap`` from glibc (anything over 32 MB is), and the kernel then zero-fills
each 4 KiB page on first touch: on a 2-core Xeon that page faulting cost 28 ms, half as
much again as the 53 ms GEMM writing into it (``benchmarks/train_step.py``: ``mm`` into a
new tensor 81 ms, into a reused one 53 ms). The profile that blamed ``addmm``'s bias copy
for ~28 ms was seeing the same faults: whichever op first writes the new tensor pays them.

So the training path writes the GEMM into a buffer kept across steps. It is handed out
only while nothing else still holds it: a caller that keeps a step's pre-activations (a
view of the buffer) makes the next step allocate a new one, so nobody's tensor is
overwritten under them. CUDA has its own caching allocator, and under autocast the GEMM
picks its own output dtype; both take the ordinary allocating path.

The buffer stays allocated between steps: the step's own largest tensor, which the step's
peak already counted, now also resident while validation or evaluation run in between
(``dictionary._pre_buffer.release()`` frees it).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _held_elsewhere(buffer: Tensor) -> bool:
    """Whether anything besides ``buffer`` itself references its storage."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:  # a torch without the counter: never reuse
        return True
    # One reference is the buffer, one the temporary storage object made to ask.
    return use_count(buffer.untyped_storage()._cdata) > 2


class ReusedBuffer:
    """An ``[rows, cols]`` tensor reused across calls while nobody else holds it."""

    def __init__(self) -> None:
        self._buffer: Tensor | None = None

    def take(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A ``[rows, cols]`` tensor with unspecified contents (a view of the buffer)."""
        buffer = self._buffer
        if (
            buffer is None
            or buffer.dtype != dtype
            or buffer.device != device
            or buffer.shape[1] != cols
            or buffer.shape[0] < rows
            or _held_elsewhere(buffer)
        ):
            buffer = torch.empty(rows, cols, dtype=dtype, device=device)
            self._buffer = buffer
        return buffer[:rows]  # a view, so a holder shows up in the storage's use count

    def release(self) -> None:
        """Drop the buffer (its memory is freed once no view of it is left)."""
        self._buffer = None


def encoder_gemm(x: Tensor, weight: Tensor, buffer: ReusedBuffer) -> Tensor:
    """``x @ weight`` (no bias), into ``buffer`` on CPU outside autocast.

    Args:
        x: ``[N, d_in]`` in ``weight``'s dtype (outside autocast).
        weight: ``[d_in, d_latent]``.
        buffer: Where the output lives between steps.
    """
    device = x.device
    if device.type != "cpu" or torch.is_autocast_enabled(device.type) or x.dtype != weight.dtype:
        return torch.mm(x, weight)
    out = buffer.take(x.shape[0], weight.shape[1], weight.dtype, device)
    return torch.mm(x, weight, out=out)
