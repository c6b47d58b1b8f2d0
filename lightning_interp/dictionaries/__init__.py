"""Sparse dictionaries: SAEs of every current kind, sharing one base class and registry."""

from lightning_interp.dictionaries.base import Dictionary, DictionaryOutput
from lightning_interp.dictionaries.config import DictionaryConfig, Provenance
from lightning_interp.dictionaries.gated import GatedConfig, GatedSAE
from lightning_interp.dictionaries.jumprelu import JumpReLUConfig, JumpReLUSAE
from lightning_interp.dictionaries.registry import (
    create_dictionary,
    get_dictionary_class,
    list_architectures,
    register_dictionary,
)
from lightning_interp.dictionaries.sparse_codes import SparseCodes
from lightning_interp.dictionaries.standard import StandardConfig, StandardSAE
from lightning_interp.dictionaries.topk import BatchTopKConfig, BatchTopKSAE, TopKConfig, TopKSAE

__all__ = [
    "SparseCodes",
    "BatchTopKConfig",
    "BatchTopKSAE",
    "Dictionary",
    "DictionaryConfig",
    "DictionaryOutput",
    "GatedConfig",
    "GatedSAE",
    "JumpReLUConfig",
    "JumpReLUSAE",
    "Provenance",
    "StandardConfig",
    "StandardSAE",
    "TopKConfig",
    "TopKSAE",
    "create_dictionary",
    "get_dictionary_class",
    "list_architectures",
    "register_dictionary",
]
