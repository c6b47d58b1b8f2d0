"""torchmetrics ``Metric`` classes for dictionaries, correct under DDP (sum reductions)."""

from torchmetrics import MeanSquaredError

from lightning_interp.metrics.reconstruction import (
    FractionOfVarianceUnexplained,
    ReconstructionExplainedVariance,
)
from lightning_interp.metrics.sparsity import L0, DeadLatentFraction, DenseLatentFraction

__all__ = [
    "L0",
    "DeadLatentFraction",
    "DenseLatentFraction",
    "FractionOfVarianceUnexplained",
    "MeanSquaredError",
    "ReconstructionExplainedVariance",
]
