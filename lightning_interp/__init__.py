"""lightning-interp: sparse dictionaries and concept heads on frozen transformers."""

from lightning_interp.dictionaries import (
    Dictionary,
    DictionaryConfig,
    create_dictionary,
    list_architectures,
    register_dictionary,
)
from lightning_interp.errors import (
    ConfigError,
    CorruptFileError,
    DictionaryNotFoundError,
    LightningInterpError,
    ShapeMismatchError,
    UnknownArchitectureError,
)
from lightning_interp.zoo import load_dictionary

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "CorruptFileError",
    "Dictionary",
    "DictionaryConfig",
    "DictionaryNotFoundError",
    "LightningInterpError",
    "ShapeMismatchError",
    "UnknownArchitectureError",
    "create_dictionary",
    "list_architectures",
    "load_dictionary",
    "register_dictionary",
]
