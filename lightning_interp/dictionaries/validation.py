"""Type checks of config dataclasses: moved to :mod:`lightning_interp._validation`.

Kept so ``lightning_interp.dictionaries.validation`` imports keep working.
"""

from lightning_interp._validation import (
    dataclass_from_dict,
    describe,
    validate_fields,
)

__all__ = ["dataclass_from_dict", "describe", "validate_fields"]
