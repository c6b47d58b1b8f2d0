"""Typed reads of the values in a foreign config, with one-line errors naming the field.

Other libraries' configs are JSON (or a ``.pt`` dict) written by code we do not control.
Plain ``int(...)``/``bool(...)`` conversions turn bad values into silent wrong ones
(``int(2.9) == 2``, ``bool("false") is True``) or raw tracebacks (``int("four")``). Every
format reader takes its values through :class:`ConfigFields` instead, so each bad value
becomes a :class:`~lightning_interp.errors.CorruptFileError` naming the file, the field, the
value and the fix.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch import Tensor

from lightning_interp.errors import CorruptFileError

#: Marks a field as required (no default).
REQUIRED: Any = object()


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _plain(value: Any) -> Any:
    # A one-element tensor in a .pt state dict (dictionary_learning's k, OpenAI's k) stands
    # for its number.
    if isinstance(value, Tensor) and value.numel() == 1:
        return value.item()
    return value


class ConfigFields:
    """A JSON object of a foreign config, handing out values of the expected types.

    ``None`` (JSON ``null``) counts as absent, as the libraries writing these files mean it.

    Args:
        values: The parsed object.
        source: The file it came from (named in errors).
        prefix: The object's path inside the file (``"trainer."``), for messages.

    Raises:
        CorruptFileError: ``values`` is not a JSON object.

    Example:
        >>> fields = ConfigFields({"k": 2.0, "normalize_decoder": True}, "cfg.json")
        >>> fields.integer("k"), fields.boolean("normalize_decoder")
        (2, True)
    """

    def __init__(self, values: Any, source: Path | str, prefix: str = "") -> None:
        if not isinstance(values, dict):
            what = prefix.rstrip(".") or "the file"
            raise CorruptFileError(
                f"{source}: {what} must be a JSON object, got {type(values).__name__} "
                f"{_short(values)}; fix that field or re-download the file"
            )
        self.values: dict[str, Any] = values
        self.source = source
        self.prefix = prefix

    def __contains__(self, key: str) -> bool:
        return self.values.get(key) is not None

    def _fail(self, key: str, expected: str, value: Any) -> CorruptFileError:
        return CorruptFileError(
            f"{self.source}: {self.prefix}{key} must be {expected}, got {_short(value)}; fix "
            f"that field or re-download the file"
        )

    def _get(self, key: str, default: Any) -> Any:
        value = _plain(self.values.get(key))
        if value is None and default is REQUIRED:
            raise CorruptFileError(
                f"{self.source} lacks the required field {self.prefix}{key} (has "
                f"{sorted(self.values)}); re-download the file or add it"
            )
        return value

    def integer(self, key: str, default: Any = REQUIRED) -> Any:
        """An integer (``2`` or ``2.0``; not ``2.9``, ``"2"`` or ``true``), else ``default``."""
        value = self._get(key, default)
        if value is None:
            return default
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self._fail(key, "an integer", value)
        return value

    def number(self, key: str, default: Any = REQUIRED, *, positive: bool = False) -> Any:
        """A finite number (strictly positive if asked), else ``default``."""
        value = self._get(key, default)
        if value is None:
            return default
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or (positive and value <= 0):
            raise self._fail(key, "a finite number" + (" > 0" if positive else ""), value)
        return value

    def boolean(self, key: str, default: Any = REQUIRED) -> Any:
        """``true`` or ``false`` (not the strings ``"false"``/``"true"``), else ``default``."""
        value = self._get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._fail(key, "true or false", value)
        return value

    def string(self, key: str, default: Any = REQUIRED) -> Any:
        """A string, else ``default``."""
        value = self._get(key, default)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self._fail(key, "a string", value)
        return value

    def section(self, key: str) -> ConfigFields:
        """The nested object ``key`` (empty when absent)."""
        value = self.values.get(key)
        return ConfigFields({} if value is None else value, self.source, f"{self.prefix}{key}.")
