"""Gated SAE (Rajamanoharan et al. 2024): separate gating and magnitude paths."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_interp.dictionaries.base import Dictionary, DictionaryOutput, squared_error
from lightning_interp.dictionaries.config import DictionaryConfig, check_non_negative
from lightning_interp.dictionaries.registry import register_dictionary


@dataclass(kw_only=True)
class GatedConfig(DictionaryConfig):
    """Config of a Gated SAE.

    Attributes:
        l1_coefficient: Weight of the L1 penalty on the ReLU'd gate pre-activations.
    """

    l1_coefficient: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_non_negative(self.l1_coefficient, "l1_coefficient")


# L1-penalised like the standard SAE: a looser FVU bound than the thresholded architectures'.
@register_dictionary("gated", example_kwargs={"l1_coefficient": 2.0}, recovery_fvu=0.25)
class GatedSAE(Dictionary):
    """Gated SAE: ``f = 1[pi_gate > 0] * relu(pi_mag)``.

    ``pi_gate = x' W_enc + b_gate`` decides which latents fire and carries the L1
    penalty; ``pi_mag = x' (W_enc * exp(r_mag)) + b_mag`` sets their size, free of
    shrinkage. An auxiliary loss reconstructs from the gate path through a frozen
    decoder so the gate still learns what to reconstruct.
    """

    config_class = GatedConfig
    config: GatedConfig
    has_encoder_bias = False

    def __init__(self, config: GatedConfig) -> None:
        super().__init__(config)
        dtype = self.dtype
        self.b_gate = nn.Parameter(torch.zeros(config.d_latent, dtype=dtype))
        self.b_mag = nn.Parameter(torch.zeros(config.d_latent, dtype=dtype))
        self.r_mag = nn.Parameter(torch.zeros(config.d_latent, dtype=dtype))

    def _paths(self, x: Tensor) -> tuple[Tensor, Tensor]:
        centred = self.encoder_input(self._prepare_input(x))
        gate = centred @ self.W_enc + self.b_gate
        magnitude = centred @ (self.W_enc * self.r_mag.exp()) + self.b_mag
        return gate, magnitude

    def encode_pre(self, x: Tensor) -> Tensor:
        """Gate pre-activations (which latents fire)."""
        return self._paths(x)[0]

    @staticmethod
    def _combine(gate: Tensor, magnitude: Tensor) -> Tensor:
        return (gate > 0).to(magnitude.dtype) * torch.relu(magnitude)

    def encode(self, x: Tensor) -> Tensor:
        """Codes: the magnitude path where the gate is open."""
        return self._combine(*self._paths(x))

    def activation(self, pre: Tensor) -> Tensor:
        """Not defined for a Gated SAE, whose codes need both paths; use :meth:`encode`."""
        raise TypeError("GatedSAE codes need the input, not pre-activations; call encode(x)")

    def forward_train(self, x: Tensor) -> DictionaryOutput:
        """Forward pass keeping the magnitude path for inspection."""
        gate, magnitude = self._paths(x)
        codes = self._combine(gate, magnitude)
        return DictionaryOutput(
            self.with_skip(x, self.decode(codes)), codes, gate, {"magnitude": magnitude}
        )

    def sparsity_losses(
        self,
        x: Tensor,
        out: DictionaryOutput,
        *,
        target: Tensor,
        sparsity_scale: float,
        dead_mask: Tensor | None,
    ) -> dict[str, Tensor]:
        """L1 on the gate path and the frozen-decoder auxiliary reconstruction."""
        gate_acts = torch.relu(out.pre_activations)
        l1 = (gate_acts * self.decoder_norms()).sum(-1).mean()
        aux_reconstruction = gate_acts @ self.W_dec.detach() + self.b_dec.detach()
        return {
            "l1": l1,
            "l1_loss": self.config.l1_coefficient * sparsity_scale * l1,
            "aux_loss": squared_error(aux_reconstruction, target),
        }
