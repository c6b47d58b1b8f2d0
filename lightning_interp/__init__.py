"""lightning-interp: sparse dictionaries and concept heads on frozen transformers."""

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from lightning_interp.zoo import load_dictionary

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The zoo (and with it huggingface_hub and concept-head support) loads on first use, so
    # that importing any subpackage (which runs this file) does not pull it in.
    if name == "load_dictionary":
        from lightning_interp.zoo import load_dictionary

        return load_dictionary
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
