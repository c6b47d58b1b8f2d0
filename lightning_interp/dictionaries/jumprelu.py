"""JumpReLU SAE with straight-through estimators (Rajamanoharan et al. 2024, Gemma Scope)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_interp.dictionaries.base import Dictionary, DictionaryOutput
from lightning_interp.dictionaries.config import DictionaryConfig, check_non_negative
from lightning_interp.dictionaries.registry import register_dictionary
from lightning_interp.errors import ConfigError


@dataclass(kw_only=True)
class JumpReLUConfig(DictionaryConfig):
    """Config of a JumpReLU SAE.

    Attributes:
        sparsity_coefficient: Weight of the L0 penalty.
        bandwidth: Width of the rectangle kernel in the straight-through pseudo-derivative
            (epsilon in the paper); on the scale of the pre-activations.
        initial_threshold: Threshold every latent starts with.
    """

    sparsity_coefficient: float = 1.0
    bandwidth: float = 0.001
    initial_threshold: float = 0.001

    def __post_init__(self) -> None:
        super().__post_init__()
        check_non_negative(self.sparsity_coefficient, "sparsity_coefficient")
        for name in ("bandwidth", "initial_threshold"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


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
        kernel = _rectangle((pre - threshold) / eps)
        grad_threshold = -(threshold / eps) * kernel * grad
        return grad_pre, grad_threshold.reshape(-1, threshold.shape[-1]).sum(0), None


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
        grad_threshold = -(1.0 / eps) * _rectangle((pre - threshold) / eps) * grad
        return (
            torch.zeros_like(pre),
            grad_threshold.reshape(-1, threshold.shape[-1]).sum(0),
            None,
        )


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
        """L0 penalty with a straight-through estimator for the threshold."""
        pre = out.pre_activations
        l0 = _Step.apply(pre, self.threshold.to(pre.dtype), self.config.bandwidth).sum(-1).mean()
        return {
            "l0": l0.detach(),
            "l0_loss": self.config.sparsity_coefficient * sparsity_scale * l0,
        }

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
