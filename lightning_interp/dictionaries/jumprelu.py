"""JumpReLU SAE with straight-through estimators (Rajamanoharan et al. 2024, Gemma Scope)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_interp.dictionaries.base import Dictionary, DictionaryOutput
from lightning_interp.dictionaries.config import DictionaryConfig, check_non_negative
from lightning_interp.dictionaries.jumprelu_losses import (
    SparsityLossMode,
    check_sparsity_loss_config,
    pre_act_penalty,
    quadratic_l0_penalty,
    rectangle,
    step_l0,
    tanh_penalty,
)
from lightning_interp.dictionaries.registry import register_dictionary
from lightning_interp.errors import ConfigError


@dataclass(kw_only=True)
class JumpReLUConfig(DictionaryConfig):
    """Config of a JumpReLU SAE.

    The sparsity-loss fields are SAELens's ``JumpReLUTrainingSAEConfig`` fields without
    their ``jumprelu_`` prefix; see :mod:`~lightning_interp.dictionaries.jumprelu_losses`.

    Attributes:
        sparsity_coefficient: Weight of the sparsity penalty (SAELens ``l0_coefficient``).
        bandwidth: Width of the rectangle kernel in the straight-through pseudo-derivative
            (epsilon in the paper); on the scale of the pre-activations.
        initial_threshold: Threshold every latent starts with.
        sparsity_loss_mode: ``"step"`` (the L0 through a straight-through estimator;
            DeepMind), ``"tanh"`` (Anthropic's ``sum tanh(c f ||W_dec||)``) or
            ``"quadratic"`` (Gemma Scope 2's ``(2/T)(L0 - T)^2`` around ``target_l0``).
        tanh_scale: ``c`` of the tanh penalty (4.0, Anthropic's value).
        target_l0: ``T``, the active latents per row the quadratic penalty aims for;
            required by ``"quadratic"`` and refused by the other modes.
        pre_act_loss_coefficient: Weight of Anthropic's pre-activation loss on dead
            latents (3e-6 in Anthropic's setup); ``None`` turns it off.
    """

    sparsity_coefficient: float = 1.0
    bandwidth: float = 0.001
    initial_threshold: float = 0.001
    sparsity_loss_mode: SparsityLossMode = "step"
    tanh_scale: float = 4.0
    target_l0: float | None = None
    pre_act_loss_coefficient: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_non_negative(self.sparsity_coefficient, "sparsity_coefficient")
        for name in ("bandwidth", "initial_threshold"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        check_sparsity_loss_config(self)


class _JumpReLU(torch.autograd.Function):
    """``pre * H(pre - t)``; the threshold's pseudo-derivative is ``-(t/eps) K((pre-t)/eps)``."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:  # noqa: D102
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:  # noqa: D102
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > threshold).to(grad.dtype)
        kernel = rectangle((pre - threshold) / eps)
        grad_threshold = -(threshold / eps) * kernel * grad
        return grad_pre, grad_threshold.reshape(-1, threshold.shape[-1]).sum(0), None


@register_dictionary(
    "jumprelu",
    example_kwargs={"sparsity_coefficient": 0.1, "bandwidth": 0.05, "initial_threshold": 0.1},
    recovery_fvu=0.15,
)
class JumpReLUSAE(Dictionary):
    """JumpReLU SAE: ``f_i = pre_i`` where ``pre_i > threshold_i``, else 0.

    The threshold is trained through straight-through estimators of the JumpReLU and of
    the L0 penalty. It is stored as ``log_threshold`` (so it stays positive) and written
    to files as ``threshold``, the name SAELens and Gemma Scope use.
    """

    config_class = JumpReLUConfig
    config: JumpReLUConfig

    def __init__(self, config: JumpReLUConfig) -> None:
        super().__init__(config)
        self.log_threshold = nn.Parameter(
            torch.full((config.d_latent,), math.log(config.initial_threshold), dtype=self.dtype)
        )

    @property
    def threshold(self) -> Tensor:
        """Per-latent threshold, ``[d_latent]``."""
        return self.log_threshold.exp()

    def activation(self, pre: Tensor) -> Tensor:
        """JumpReLU with straight-through gradients for the threshold."""
        return _JumpReLU.apply(pre, self.threshold.to(pre.dtype), self.config.bandwidth)

    def sparsity_losses(
        self,
        x: Tensor,
        out: DictionaryOutput,
        *,
        target: Tensor,
        sparsity_scale: float,
        dead_mask: Tensor | None,
    ) -> dict[str, Tensor]:
        """The configured sparsity penalty (``"l0_loss"``) and the pre-activation loss.

        ``"l0"`` logs the mean number of active latents whatever the mode; with
        ``pre_act_loss_coefficient`` set, ``"pre_act_loss"`` is added (not warmed up).
        """
        cfg = self.config
        pre = out.pre_activations
        threshold = self.threshold.to(pre.dtype)
        l0 = step_l0(pre, threshold, cfg.bandwidth)
        if cfg.sparsity_loss_mode == "tanh":
            penalty = tanh_penalty(out.codes, self.decoder_norms(), cfg.tanh_scale)
        elif cfg.sparsity_loss_mode == "quadratic":
            penalty = quadratic_l0_penalty(l0, cfg.target_l0)
        else:
            penalty = l0
        terms = {
            "l0": l0.mean().detach(),
            "l0_loss": cfg.sparsity_coefficient * sparsity_scale * penalty.mean(),
        }
        if cfg.pre_act_loss_coefficient is not None:
            pre_act = pre_act_penalty(pre, threshold, dead_mask, self.decoder_norms())
            terms["pre_act_loss"] = cfg.pre_act_loss_coefficient * pre_act
        return terms

    def export_tensors(self) -> dict[str, Tensor]:
        """Weights with ``threshold`` in place of ``log_threshold``."""
        tensors = super().export_tensors()
        tensors["threshold"] = tensors.pop("log_threshold").exp()
        return tensors

    def import_tensors(self, tensors: dict[str, Tensor], *, assign: bool = False) -> None:
        """Load weights carrying ``threshold``."""
        tensors = dict(tensors)
        threshold = tensors.pop("threshold", None)
        if threshold is not None:
            tensors["log_threshold"] = threshold.clamp_min(torch.finfo(threshold.dtype).tiny).log()
        super().import_tensors(tensors, assign=assign)
