"""Typed configs of concept heads: one dataclass per head, checked against its type hints.

Each head declares a :class:`HeadConfig` subclass (its ``config_class``) whose fields are the
head's options; the shared checks of :mod:`lightning_interp._validation` refuse a value of
the wrong type (``"false"`` for a bool, a string for a number, a ``Literal`` choice that is
not one) with a one-line :class:`~lightning_interp.errors.ConfigTypeError` naming the field,
so a new head's config is checked without code of its own. Range checks go in
:meth:`HeadConfig.check`.

A config also reads like the plain dict heads kept before (``config["lam"]``,
``**config``, ``dict(config)``), which is what ``config.json`` stores.

Example:
    >>> from lightning_interp.concepts import SupervisedCBM
    >>> head = SupervisedCBM(8, ["wings", "beak"], ["bird", "plane"], concept_weight=0.5)
    >>> head.config.concept_weight, head.config["training"]
    (0.5, 'joint')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from lightning_interp._validation import dataclass_from_dict, validate_fields


@dataclass
class HeadConfig(Mapping[str, Any]):
    """Base class of a head's options (the ``config`` of its ``config.json``)."""

    def __post_init__(self) -> None:
        validate_fields(self)
        self.check()

    def check(self) -> None:
        """Range and consistency checks beyond the types (raise ``ConfigError``)."""

    def to_dict(self) -> dict[str, Any]:
        """The options as plain JSON values, in field order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, where: str | None = None) -> HeadConfig:
        """Build from a mapping, refusing unknown keys and wrong types by name.

        Raises:
            ConfigError: unknown keys or an invalid value (a ``ConfigTypeError`` for a
                wrong type).
        """
        return dataclass_from_dict(cls, values, where=where)

    # Mapping: heads kept their options in a dict before, and callers index it so.
    def __getitem__(self, key: str) -> Any:
        if key not in self._names():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def _names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self))
