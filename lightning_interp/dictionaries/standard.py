"""The standard ReLU sparse autoencoder with an L1 penalty (Bricken et al. 2023)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_interp.dictionaries.base import Dictionary, DictionaryOutput
from lightning_interp.dictionaries.config import DictionaryConfig, check_non_negative
from lightning_interp.dictionaries.registry import register_dictionary


@dataclass(kw_only=True)
class StandardConfig(DictionaryConfig):
    """Config of a ReLU SAE.

    Attributes:
        l1_coefficient: Weight of the L1 penalty ``sum_i f_i * ||W_dec[i]||`` (the decoder
            norm factor makes the penalty meaningful without a unit-norm decoder, as in
            Anthropic's April 2024 update).
    """

    l1_coefficient: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_non_negative(self.l1_coefficient, "l1_coefficient")


# L1 shrinks the codes, so its FVU bound is looser than the thresholded architectures'.
@register_dictionary("standard", example_kwargs={"l1_coefficient": 0.5}, recovery_fvu=0.25)
class StandardSAE(Dictionary):
    """ReLU SAE: ``f = relu((x - b_dec) W_enc + b_enc)``, ``x_hat = f W_dec + b_dec``."""

    config_class = StandardConfig
    config: StandardConfig

    def activation(self, pre: Tensor) -> Tensor:
        """ReLU."""
        return torch.relu(pre)

    def sparsity_losses(
        self,
        x: Tensor,
        out: DictionaryOutput,
        *,
        target: Tensor,
        sparsity_scale: float,
        dead_mask: Tensor | None,
    ) -> dict[str, Tensor]:
        """Decoder-norm-weighted L1 of the codes."""
        l1 = (out.codes * self.decoder_norms()).sum(-1).mean()
        return {"l1": l1, "l1_loss": self.config.l1_coefficient * sparsity_scale * l1}
