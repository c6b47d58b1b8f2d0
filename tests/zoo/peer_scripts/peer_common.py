"""Shared by the peer-side scripts (run with a peer virtualenv's python, not ours)."""

from __future__ import annotations

import torch


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Seeded random weights: biases non-zero, decoder vectors of uneven norm, thresholds > 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name == "threshold":
                param.copy_(torch.rand(param.shape, generator=gen) * 0.6 + 0.05)
            elif name == "r_mag":
                param.copy_(noise * 0.1)
            else:
                param.copy_(noise * 0.3)
