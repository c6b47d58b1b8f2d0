"""Sparsity losses of JumpReLU SAEs, selectable by ``JumpReLUConfig.sparsity_loss_mode``.

- ``"step"``: the L0 of each row through a straight-through estimator whose gradient
  reaches only the thresholds (Rajamanoharan et al. 2024; Gemma Scope). The default.
- ``"tanh"``: ``sum_i tanh(c * f_i * ||W_dec,i||)``, Anthropic's smooth stand-in for L0
  ("Circuits Updates, January 2025", dictionary learning optimisation techniques). ``f`` are
  the codes, so the gradient reaches the encoder through the active latents, the decoder
  norms, and the thresholds through the JumpReLU's straight-through estimator.
- ``"quadratic"``: ``(2 / T) * (L0 - T)^2`` per row around a target ``T`` (Gemma Scope 2):
  sparser than the target is pushed back up as denser is pushed down. Through the same
  estimator as ``"step"``, so only the thresholds learn from it.

And, with any mode, Anthropic's pre-activation loss ``sum_i relu(t_i - pre_i) ||W_dec,i||``,
which pulls a latent's pre-activations (and its threshold) towards firing. As in SAELens it
applies to dead latents only (Anthropic applies it to every latent on the rows where it does
not fire), and no sparsity warm-up scales it.

Reference: SAELens ``sae_lens/saes/jumprelu_sae.py`` (``JumpReLUTrainingSAEConfig``:
``jumprelu_sparsity_loss_mode``, ``jumprelu_tanh_scale``, ``pre_act_loss_coefficient``,
``calculate_pre_act_loss``), and SAELens PR #732 for the quadratic loss (``target_l0``). The
config names here drop SAELens's ``jumprelu_`` prefix, as ``bandwidth`` and
``initial_threshold`` already do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from lightning_interp.dictionaries.config import check_non_negative
from lightning_interp.errors import ConfigError

if TYPE_CHECKING:
    from lightning_interp.dictionaries.jumprelu import JumpReLUConfig

SparsityLossMode = Literal["step", "tanh", "quadratic"]


def rectangle(u: Tensor) -> Tensor:
    """The rectangle kernel ``1[-1/2 < u < 1/2]`` of the straight-through estimators."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _Step(torch.autograd.Function):
    """``H(pre - t)``; gradient only to the threshold: ``-(1/eps) K((pre-t)/eps)``."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:  # noqa: D102
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:  # noqa: D102
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = -(1.0 / eps) * rectangle((pre - threshold) / eps) * grad
        return (
            torch.zeros_like(pre),
            grad_threshold.reshape(-1, threshold.shape[-1]).sum(0),
            None,
        )


def _wide(t: Tensor) -> Tensor:
    """``t`` in at least float32: a bf16 sum over latents loses small terms and counts."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def step_l0(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """Active latents per row, ``[N]``, with the straight-through gradient to ``threshold``."""
    return _wide(_Step.apply(pre, threshold, bandwidth)).sum(-1)


def tanh_penalty(codes: Tensor, decoder_norms: Tensor, scale: float) -> Tensor:
    """``sum_i tanh(scale * f_i * ||W_dec,i||)`` per row, ``[N]`` (Anthropic, Jan 2025).

    Anthropic writes ``|f_i|``; JumpReLU codes are >= 0, so the ``abs`` is dropped (as in
    SAELens): its derivative is 0 at 0 and would block the estimator's gradient to the
    threshold from latents that do not fire.
    """
    return torch.tanh(scale * _wide(codes) * _wide(decoder_norms)).sum(-1)


def quadratic_l0_penalty(l0: Tensor, target: float) -> Tensor:
    """``(2 / target) * (l0 - target)^2`` elementwise (Gemma Scope 2, as SAELens PR #732)."""
    return 2.0 / target * (l0 - target).pow(2)


def pre_act_penalty(
    pre: Tensor, threshold: Tensor, dead_mask: Tensor | None, decoder_norms: Tensor
) -> Tensor:
    """``sum_i relu(t_i - pre_i) ||W_dec,i||`` over dead latents, averaged over rows.

    Zero (a scalar) when no latent is dead or no mask is given.
    """
    if dead_mask is None or not bool(dead_mask.any()):
        return _wide(pre.new_zeros(()))
    weight = dead_mask * _wide(decoder_norms)
    return (torch.relu(_wide(threshold) - _wide(pre)) * weight).sum(-1).mean()


def check_sparsity_loss_config(config: JumpReLUConfig) -> None:
    """Raise :class:`ConfigError` on inconsistent sparsity-loss settings.

    ``tanh_scale`` must be > 0, ``pre_act_loss_coefficient`` >= 0 when given, and
    ``target_l0`` is required by, and only by, ``sparsity_loss_mode="quadratic"``, in
    ``(0, d_latent]``.
    """
    if config.tanh_scale <= 0:
        raise ConfigError(
            f"tanh_scale must be > 0, got {config.tanh_scale!r}; 4.0 is Anthropic's value"
        )
    if config.pre_act_loss_coefficient is not None:
        check_non_negative(config.pre_act_loss_coefficient, "pre_act_loss_coefficient")
    target, mode = config.target_l0, config.sparsity_loss_mode
    if mode == "quadratic" and target is None:
        raise ConfigError(
            "sparsity_loss_mode='quadratic' penalises the distance to a target L0; set "
            "target_l0 to the number of active latents per row to aim for"
        )
    if mode != "quadratic" and target is not None:
        raise ConfigError(
            f"target_l0={target!r} is only read by sparsity_loss_mode='quadratic', not "
            f"{mode!r}; set sparsity_loss_mode='quadratic' or remove target_l0"
        )
    if target is not None and not 0 < target <= config.d_latent:
        raise ConfigError(
            f"target_l0 must be in (0, d_latent={config.d_latent}], got {target!r}; it is "
            f"the number of active latents per row to aim for"
        )
