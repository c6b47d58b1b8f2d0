"""Freeze a transformers model's attention patterns and normalisation scales.

The local replacement model of circuit-tracer (``replacement_model.py``,
``_configure_gradient_flow``: ``stop_gradient`` on ``hook_pattern`` and every
``hook_scale``) is linear in the residual stream once attention patterns and norm scales
are constants. On a transformers model the same is done by

- registering an attention function (transformers' ``AttentionInterface``) that computes
  eager attention with the softmax weights detached, and pointing
  ``config._attn_implementation`` at it for the duration;
- swapping the ``forward`` of each LayerNorm / RMSNorm for one whose scale
  (``rsqrt(var + eps)``) is detached: ``(x - mean) * scale.detach() * w + b`` for
  LayerNorm, ``x * scale.detach() * w`` for RMSNorm.

In ``"record"`` mode patterns and scales are also stored; in ``"replay"`` mode the stored
ones are used instead of recomputed (interventions at frozen attention and norms).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_interp.errors import ConfigError

ATTENTION_NAME = "lightning_interp_frozen"
Mode = Literal["detach", "record", "replay"]


@dataclass
class FreezeState:
    """What one frozen forward records or replays, keyed by module id."""

    mode: Mode = "detach"
    patterns: dict[int, Tensor] = field(default_factory=dict)
    scales: dict[int, Tensor] = field(default_factory=dict)


_ACTIVE: list[FreezeState] = []


def _stored(store: dict[int, Tensor], key: int, compute: Any) -> Tensor:
    state = _ACTIVE[-1]
    if state.mode == "replay":
        if key not in store:
            raise ConfigError("replay of a frozen forward met a module the recording never ran")
        return store[key]
    value = compute().detach()
    if state.mode == "record":
        store[key] = value
    return value


def _frozen_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """Eager attention with the softmax pattern detached (and recorded / replayed)."""
    if kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None:
        raise ConfigError(
            "frozen attention supports plain causal softmax attention (GPT-2, Llama "
            "families); this model uses a soft cap or sliding window"
        )
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` queries
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling

    def pattern() -> Tensor:
        scores = torch.matmul(query, key.transpose(2, 3)) * scale
        if attention_mask is not None:
            scores = scores + attention_mask[..., : key.shape[-2]]
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)

    weights = _stored(_ACTIVE[-1].patterns, id(module), pattern)
    out = torch.matmul(weights.to(value.dtype), value).transpose(1, 2).contiguous()
    return out, weights


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(ATTENTION_NAME, _frozen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, eager_mask)


def _layer_norm_forward(module: nn.LayerNorm) -> Any:
    def forward(x: Tensor) -> Tensor:
        centred = x - x.mean(-1, keepdim=True)
        scale = _stored(
            _ACTIVE[-1].scales,
            id(module),
            lambda: torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + module.eps),
        )
        out = centred * scale
        if module.weight is not None:
            out = out * module.weight
        return out + module.bias if module.bias is not None else out

    return forward


def _rms_norm_forward(module: nn.Module) -> Any:
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))

    def forward(x: Tensor) -> Tensor:
        x32 = x.float()
        scale = _stored(
            _ACTIVE[-1].scales,
            id(module),
            lambda: torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps),
        )
        return module.weight * (x32 * scale).to(x.dtype)

    return forward


def _norm_forward(module: nn.Module) -> Any | None:
    name = type(module).__name__
    if isinstance(module, nn.LayerNorm):
        return _layer_norm_forward(module)
    if name.endswith("RMSNorm") and not name.startswith("Gemma"):
        return _rms_norm_forward(module)
    if "Norm" in name:
        raise ConfigError(
            f"cannot freeze the scale of {name}; frozen attribution supports nn.LayerNorm "
            f"and Llama-style RMSNorm (GPT-2, Llama, Qwen, Mistral families)"
        )
    return None


@contextlib.contextmanager
def frozen(model: nn.Module, state: FreezeState) -> Iterator[FreezeState]:
    """Run ``model``'s forwards inside with frozen attention patterns and norm scales.

    Args:
        model: A transformers model (config with ``_attn_implementation``).
        state: ``mode`` ``"detach"`` (attribution), ``"record"`` (store patterns and
            scales) or ``"replay"`` (use the stored ones).

    Raises:
        ConfigError: a norm module of an unsupported kind (e.g. Gemma's ``1 + w``).
    """
    _register_attention()
    patched = []
    for module in model.modules():
        forward = _norm_forward(module)
        if forward is not None:
            patched.append(module)
            module.forward = forward  # instance attribute shadows the class's forward
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    _ACTIVE.append(state)
    try:
        yield state
    finally:
        _ACTIVE.pop()
        config._attn_implementation = previous
        for module in patched:
            del module.forward
