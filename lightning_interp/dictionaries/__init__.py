"""Sparse dictionaries: SAEs of every current kind, sharing one base class and registry."""

from lightning_interp.dictionaries.base import Dictionary, DictionaryOutput
from lightning_interp.dictionaries.choice import (
    FeatureChoiceConfig,
    FeatureChoiceSAE,
    MutualChoiceConfig,
    MutualChoiceSAE,
)
from lightning_interp.dictionaries.codebook import CodebookConfig, CodebookSAE
from lightning_interp.dictionaries.config import DictionaryConfig, Provenance
from lightning_interp.dictionaries.gated import GatedConfig, GatedSAE
from lightning_interp.dictionaries.jumprelu import JumpReLUConfig, JumpReLUSAE
from lightning_interp.dictionaries.matching_pursuit import MatchingPursuitConfig, MatchingPursuitSAE
from lightning_interp.dictionaries.matryoshka import (
    MatryoshkaBatchTopKConfig,
    MatryoshkaBatchTopKSAE,
    MatryoshkaTopKConfig,
    MatryoshkaTopKSAE,
)
from lightning_interp.dictionaries.registry import (
    create_dictionary,
    get_dictionary_class,
    list_architectures,
    register_dictionary,
)
from lightning_interp.dictionaries.snmf import SemiNMF, SemiNMFConfig
from lightning_interp.dictionaries.sparse_codes import SparseCodes
from lightning_interp.dictionaries.standard import StandardConfig, StandardSAE
from lightning_interp.dictionaries.topk import BatchTopKConfig, BatchTopKSAE, TopKConfig, TopKSAE
from lightning_interp.dictionaries.variational import VariationalTopKConfig, VariationalTopKSAE

__all__ = [
    "SparseCodes",
    "BatchTopKConfig",
    "BatchTopKSAE",
    "CodebookConfig",
    "CodebookSAE",
    "Dictionary",
    "DictionaryConfig",
    "DictionaryOutput",
    "FeatureChoiceConfig",
    "FeatureChoiceSAE",
    "GatedConfig",
    "GatedSAE",
    "JumpReLUConfig",
    "JumpReLUSAE",
    "MatchingPursuitConfig",
    "MatchingPursuitSAE",
    "MatryoshkaBatchTopKConfig",
    "MatryoshkaBatchTopKSAE",
    "MatryoshkaTopKConfig",
    "MatryoshkaTopKSAE",
    "MutualChoiceConfig",
    "MutualChoiceSAE",
    "Provenance",
    "SemiNMF",
    "SemiNMFConfig",
    "StandardConfig",
    "StandardSAE",
    "TopKConfig",
    "TopKSAE",
    "VariationalTopKConfig",
    "VariationalTopKSAE",
    "create_dictionary",
    "get_dictionary_class",
    "list_architectures",
    "register_dictionary",
]
