"""Concept banks and concept-bottleneck heads over frozen backbone embeddings.

Usable without Lightning: heads are plain ``nn.Module``s;
:class:`~lightning_interp.modules.ConceptBottleneckModule` trains them. Heads register by
name (:func:`register_head`, :func:`list_heads`, :func:`create_head`) and carry a typed
config dataclass (:class:`HeadConfig`), as dictionaries do.
"""

from lightning_interp.concepts.bank import ConceptBank
from lightning_interp.concepts.base import ConceptHead, HeadOutput
from lightning_interp.concepts.build import load_phrases
from lightning_interp.concepts.cav import CAV, fit_cav, learn_cav
from lightning_interp.concepts.cem import CEMConfig, ConceptEmbeddingModel
from lightning_interp.concepts.config import HeadConfig
from lightning_interp.concepts.description import (
    DescriptionClassifier,
    DescriptionClassifierConfig,
)
from lightning_interp.concepts.discover_name import SAENamedCBM, SAENamedCBMConfig
from lightning_interp.concepts.explain import (
    EditReport,
    evaluate_removal,
    remove_concept,
    top_concepts_per_class,
    top_concepts_per_example,
)
from lightning_interp.concepts.filters import FilterReport, filter_concepts
from lightning_interp.concepts.label_free import LabelFreeCBM, LabelFreeCBMConfig, cos_cubed
from lightning_interp.concepts.posthoc import PosthocCBM, PosthocCBMConfig
from lightning_interp.concepts.prototype import ProtoPNet, ProtoPNetConfig
from lightning_interp.concepts.rbf_prototype import RobustRBF, RobustRBFConfig
from lightning_interp.concepts.registry import create_head, head_class, list_heads, register_head
from lightning_interp.concepts.slots import ConceptSlotAttention, ConceptSlotAttentionConfig
from lightning_interp.concepts.solver import SparseFit, elastic_net_objective, fit_sparse_linear
from lightning_interp.concepts.supervised import (
    SupervisedCBM,
    SupervisedCBMConfig,
    intervention_logits,
    intervention_order,
)
from lightning_interp.concepts.transformer import ConceptTransformer, ConceptTransformerConfig

__all__ = [
    "CAV",
    "CEMConfig",
    "ConceptBank",
    "ConceptEmbeddingModel",
    "ConceptHead",
    "ConceptSlotAttention",
    "ConceptSlotAttentionConfig",
    "ConceptTransformer",
    "ConceptTransformerConfig",
    "DescriptionClassifier",
    "DescriptionClassifierConfig",
    "EditReport",
    "FilterReport",
    "HeadConfig",
    "HeadOutput",
    "LabelFreeCBM",
    "LabelFreeCBMConfig",
    "PosthocCBM",
    "PosthocCBMConfig",
    "SAENamedCBM",
    "SAENamedCBMConfig",
    "ProtoPNet",
    "ProtoPNetConfig",
    "RobustRBF",
    "RobustRBFConfig",
    "SparseFit",
    "SupervisedCBM",
    "SupervisedCBMConfig",
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
    "list_heads",
    "load_phrases",
    "register_head",
    "remove_concept",
    "top_concepts_per_class",
    "top_concepts_per_example",
]
