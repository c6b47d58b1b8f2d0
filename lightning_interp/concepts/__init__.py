"""Concept banks and concept-bottleneck heads over frozen backbone embeddings.

Usable without Lightning: heads are plain ``nn.Module``s;
:class:`~lightning_interp.modules.ConceptBottleneckModule` trains them.
"""

from lightning_interp.concepts.bank import ConceptBank
from lightning_interp.concepts.base import ConceptHead, HeadOutput, head_class, register_head
from lightning_interp.concepts.build import create_head, load_phrases
from lightning_interp.concepts.cav import CAV, fit_cav, learn_cav
from lightning_interp.concepts.description import DescriptionClassifier
from lightning_interp.concepts.explain import (
    EditReport,
    evaluate_removal,
    remove_concept,
    top_concepts_per_class,
    top_concepts_per_example,
)
from lightning_interp.concepts.filters import FilterReport, filter_concepts
from lightning_interp.concepts.label_free import LabelFreeCBM, cos_cubed
from lightning_interp.concepts.posthoc import PosthocCBM
from lightning_interp.concepts.slots import ConceptSlotAttention
from lightning_interp.concepts.solver import SparseFit, elastic_net_objective, fit_sparse_linear
from lightning_interp.concepts.supervised import (
    SupervisedCBM,
    intervention_logits,
    intervention_order,
)
from lightning_interp.concepts.transformer import ConceptTransformer

__all__ = [
    "CAV",
    "ConceptBank",
    "ConceptHead",
    "ConceptSlotAttention",
    "ConceptTransformer",
    "DescriptionClassifier",
    "EditReport",
    "FilterReport",
    "HeadOutput",
    "LabelFreeCBM",
    "PosthocCBM",
    "SparseFit",
    "SupervisedCBM",
    "cos_cubed",
    "create_head",
    "elastic_net_objective",
    "evaluate_removal",
    "filter_concepts",
    "fit_cav",
    "fit_sparse_linear",
    "head_class",
    "intervention_logits",
    "intervention_order",
    "learn_cav",
    "load_phrases",
    "register_head",
    "remove_concept",
    "top_concepts_per_class",
    "top_concepts_per_example",
]
