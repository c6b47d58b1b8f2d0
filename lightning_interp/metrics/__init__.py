"""torchmetrics ``Metric`` classes for dictionaries, correct under DDP (sum reductions).

Reconstruction and sparsity metrics need only tensors; the downstream ones splice a
dictionary into a frozen :class:`~lightning_interp.backbones.Backbone`.
"""

from torchmetrics import MeanSquaredError

from lightning_interp.metrics.concepts import (
    ConceptAccuracy,
    ConceptAUROC,
    FinalLayerSparsity,
    InterventionAUC,
    InterventionCurve,
)
from lightning_interp.metrics.downstream import (
    CrossEntropyLossRecovered,
    SplicedKLDivergence,
    has_lm_head,
    splice_evaluation,
)
from lightning_interp.metrics.reconstruction import (
    FractionOfVarianceUnexplained,
    ReconstructionExplainedVariance,
)
from lightning_interp.metrics.sparsity import L0, DeadLatentFraction, DenseLatentFraction

__all__ = [
    "ConceptAUROC",
    "ConceptAccuracy",
    "FinalLayerSparsity",
    "InterventionAUC",
    "InterventionCurve",
    "CrossEntropyLossRecovered",
    "L0",
    "DeadLatentFraction",
    "DenseLatentFraction",
    "FractionOfVarianceUnexplained",
    "MeanSquaredError",
    "ReconstructionExplainedVariance",
    "SplicedKLDivergence",
    "has_lm_head",
    "splice_evaluation",
]
