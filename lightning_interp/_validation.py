"""Type checks of config dataclasses, driven by their fields' type hints.

:func:`validate_fields` checks every field of a dataclass against its annotation (``bool``,
``int``, ``float``, ``str``, ``Literal``, ``X | None``, nested dataclasses, ``dict``/``list``)
and normalises lossless cases (an int for a float, a mapping for a nested dataclass). Configs
call it first in ``__post_init__``, so a new architecture's (or concept head's) config is
checked without code of its own: a value read from JSON, YAML or a checkpoint with the wrong
type (``"false"`` for a bool, ``true`` for an int, a string for a nested config) gets a
one-line :class:`~lightning_interp.errors.ConfigTypeError` naming the field and the fix.

A neutral module (it imports nothing of the library but :mod:`errors`): dictionary configs
and concept-head configs both use it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from collections.abc import Mapping
from functools import cache
from typing import Any, Literal

from lightning_interp.errors import ConfigError, ConfigTypeError


def describe(value: Any) -> str:
    """A short, one-line description of a value for an error message."""
    if isinstance(value, str):
        text = repr(value if len(value) <= 40 else value[:37] + "...")
        return f"the string {text}"
    if isinstance(value, bool):
        return f"the boolean {value}"
    text = repr(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"{text} (a {type(value).__name__})"


def _is_dataclass_type(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


@cache
def _field_hints(cls: type) -> dict[str, Any]:
    """Resolved type hints of a dataclass's fields (``Any`` where a hint cannot be resolved)."""
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):
        # A user's config may annotate with names its module cannot resolve at run time;
        # such fields are left unchecked rather than breaking the whole config.
        hints = {}
    return {
        f.name: hints.get(f.name, Any if isinstance(f.type, str) else f.type)
        for f in dataclasses.fields(cls)
    }


def _check_value(where: str, value: Any, hint: Any) -> Any:
    """Return ``value`` checked against ``hint``, normalised where that is lossless.

    An int for a float field becomes a float; a mapping for a dataclass field becomes that
    dataclass (validated in turn).

    Raises:
        ConfigTypeError: the value has the wrong type for the hint.
        ConfigError: a float is NaN or infinite, or a value is not among a Literal's choices.
    """
    if hint is Any or hint is object:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [arg for arg in args if arg is not type(None)]
        errors = []
        for option in options:
            try:
                return _check_value(where, value, option)
            except ConfigTypeError as err:
                errors.append(err)
        if len(errors) == 1:
            nullable = "; null is also accepted" if type(None) in args else ""
            raise ConfigTypeError(f"{errors[0]}{nullable}") from None
        names = ", ".join(getattr(o, "__name__", str(o)) for o in options)
        raise ConfigTypeError(f"{where} must be one of: {names}; got {describe(value)}")
    if origin is Literal:
        if any(type(value) is type(choice) and value == choice for choice in args):
            return value
        error = ConfigError if any(type(value) is type(c) for c in args) else ConfigTypeError
        raise error(f"{where} must be one of {', '.join(map(repr, args))}; got {describe(value)}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigTypeError(
            f"{where} must be true or false, got {describe(value)}; write true or false "
            f"without quotes (a JSON/YAML boolean, not a string or a number)"
        )
    if hint is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        raise ConfigTypeError(
            f"{where} must be a whole number, got {describe(value)}; write an integer "
            f"such as 16 (not a boolean, a string or a decimal)"
        )
    if hint is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            value = float(value)
            if not math.isfinite(value):
                raise ConfigError(
                    f"{where} must be a finite number, got {value}; give a real value"
                )
            return value
        raise ConfigTypeError(
            f"{where} must be a number, got {describe(value)}; write it as a number such as "
            f"0.5 (not a string or a boolean)"
        )
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigTypeError(f"{where} must be a string, got {describe(value)}; quote it")
    if _is_dataclass_type(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, Mapping):
            return dataclass_from_dict(hint, value, where=where)
        raise ConfigTypeError(
            f"{where} must be a mapping of {hint.__name__} fields "
            f"({', '.join(f.name for f in dataclasses.fields(hint))}), got {describe(value)}"
        )
    if origin in (dict, Mapping, typing.Mapping):
        if not isinstance(value, Mapping):
            raise ConfigTypeError(f"{where} must be a mapping, got {describe(value)}")
        key_hint, value_hint = args or (Any, Any)
        return {
            _check_value(f"{where} key", k, key_hint): _check_value(
                f"{where}[{k!r}]", v, value_hint
            )
            for k, v in value.items()
        }
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigTypeError(f"{where} must be a list, got {describe(value)}")
        return [
            _check_value(f"{where}[{i}]", v, args[0] if args else Any) for i, v in enumerate(value)
        ]
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise ConfigTypeError(f"{where} must be a {hint.__name__}, got {describe(value)}")
    return value  # a hint this checker does not understand: accept as before


def validate_fields(instance: Any) -> None:
    """Check (and normalise in place) every field of a dataclass against its type hint.

    Called by each config's ``__post_init__``; range checks come after it.

    Raises:
        ConfigTypeError: a field has the wrong type, naming the field and the fix.
        ConfigError: a float field is not finite, or a Literal field holds another value.
    """
    owner = type(instance).__name__
    for name, hint in _field_hints(type(instance)).items():
        value = getattr(instance, name)
        checked = _check_value(f"{owner}.{name}", value, hint)
        if checked is not value:
            object.__setattr__(instance, name, checked)


def dataclass_from_dict(cls: type, values: Mapping[str, Any], *, where: str | None = None) -> Any:
    """Build dataclass ``cls`` from a mapping, refusing unknown and missing keys by name.

    Args:
        cls: A config dataclass (its ``__post_init__`` validates the values).
        values: Field values, e.g. parsed from JSON.
        where: How to name the mapping in errors (default: the class name).

    Raises:
        ConfigTypeError: ``values`` is not a mapping, or a key is not a string.
        ConfigError: unknown or missing keys, or an invalid value.
    """
    where = where or cls.__name__
    if not isinstance(values, Mapping):
        raise ConfigTypeError(
            f"{where} must be a mapping of {cls.__name__} fields, got {describe(values)}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    bad_keys = [k for k in values if not isinstance(k, str)]
    if bad_keys:
        raise ConfigTypeError(f"{where} has non-string keys {bad_keys!r}; keys are field names")
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown {cls.__name__} field(s) {unknown} in {where}; known fields are "
            f"{sorted(fields)}"
        )
    missing = sorted(
        name
        for name, f in fields.items()
        if name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    )
    if missing:
        raise ConfigError(f"{where} is missing required field(s) {missing}; add them")
    return cls(**values)
