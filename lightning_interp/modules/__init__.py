"""LightningModules: training loops around dictionaries (and, later, concept heads)."""

from lightning_interp.modules.clt_module import CrossLayerTranscoderModule
from lightning_interp.modules.concept_module import ConceptBottleneckModule
from lightning_interp.modules.dictionary_module import DictionaryModule, split_batch
from lightning_interp.modules.end_to_end import EndToEndDictionaryModule, TokenDataModule
from lightning_interp.modules.multi_module import MultiDictionaryModule

__all__ = [
    "ConceptBottleneckModule",
    "CrossLayerTranscoderModule",
    "DictionaryModule",
    "EndToEndDictionaryModule",
    "MultiDictionaryModule",
    "split_batch",
    "TokenDataModule",
]
