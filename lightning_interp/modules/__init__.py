"""LightningModules: training loops around dictionaries (and, later, concept heads)."""

from lightning_interp.modules.dictionary_module import DictionaryModule, split_batch

__all__ = ["DictionaryModule", "split_batch"]
