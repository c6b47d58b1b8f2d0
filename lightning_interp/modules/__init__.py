"""LightningModules: training loops around dictionaries (and, later, concept heads)."""

from lightning_interp.modules.concept_module import ConceptBottleneckModule
from lightning_interp.modules.dictionary_module import DictionaryModule, split_batch
from lightning_interp.modules.multi_module import MultiDictionaryModule

__all__ = ["ConceptBottleneckModule", "DictionaryModule", "MultiDictionaryModule", "split_batch"]
