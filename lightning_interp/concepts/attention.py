"""Attention for the concept-slot head: xformers on CUDA, SDPA elsewhere, same numbers.

Inputs are ``[batch, heads, length, head_dim]`` (SDPA's layout). The reference
:func:`attention_reference` is the plain formula, used in tests and to return the
attention maps (the explanation), which the fused kernels do not expose.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

_XFORMERS: Any = None


def _xformers_ops() -> Any | None:
    """``xformers.ops`` if installed, else ``None`` (imported once, lazily)."""
    global _XFORMERS
    if _XFORMERS is None:
        try:
            import xformers.ops as ops
        except ImportError:
            ops = False
        _XFORMERS = ops
    return _XFORMERS or None


def key_bias(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Additive bias ``[b, 1, 1, keys]``: 0 where ``mask`` (True = real token), -inf elsewhere."""
    if mask is None:
        return None
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill(~mask.bool(), float("-inf"))[:, None, None, :]


def attention_weights(q: Tensor, k: Tensor, mask: Tensor | None = None) -> Tensor:
    """``softmax(q k^T / sqrt(d) + bias)`` ``[b, h, queries, keys]``, computed in fp32."""
    scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])
    bias = key_bias(mask, scores.dtype)
    if bias is not None:
        scores = scores + bias
    return scores.softmax(dim=-1)


def attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """The attention formula, written out (the ground truth the fused paths must match)."""
    return (attention_weights(q, k, mask) @ v.float()).to(v.dtype)


def attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, backend: str = "auto"
) -> Tensor:
    """Scaled dot-product attention of ``q`` over ``k``/``v`` with a key padding ``mask``.

    Args:
        q: Queries ``[b, h, m, d]``.
        k: Keys ``[b, h, n, d]``.
        v: Values ``[b, h, n, d]``.
        mask: ``[b, n]``, True for real tokens.
        backend: ``"auto"`` (xformers on CUDA when installed, else SDPA), ``"sdpa"``,
            ``"xformers"`` or ``"reference"``.

    Example:
        >>> q, k, v = torch.randn(2, 1, 3, 4), torch.randn(2, 1, 5, 4), torch.randn(2, 1, 5, 4)
        >>> torch.allclose(attention(q, k, v), attention_reference(q, k, v), atol=1e-6)
        True
    """
    if backend == "reference":
        return attention_reference(q, k, v, mask)
    ops = _xformers_ops() if backend in ("auto", "xformers") else None
    if backend == "xformers" and (ops is None or not q.is_cuda):
        raise RuntimeError("backend='xformers' needs xformers installed and CUDA tensors")
    bias = key_bias(mask, q.dtype)
    if ops is not None and q.is_cuda:
        # xformers wants [b, length, heads, d] and a bias already broadcast to full shape.
        if bias is not None:
            bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2]).contiguous()
        out = ops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias
        )
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
