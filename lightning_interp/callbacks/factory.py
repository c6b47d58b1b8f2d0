"""Lightning ``callbacks_factory`` entry point: a DictionaryProbe on every Trainer, if asked.

Lightning calls every installed ``lightning.pytorch.callbacks_factory`` entry point with
no arguments in every ``Trainer.__init__`` and appends what it returns. So this factory
returns ``[]`` unless the environment variable ``LIGHTNING_INTERP_PROBE`` is set: merely
installing lightning-interp changes no one's run.

The variable holds the probe's sites, optionally followed by ``;key=value`` options
(values parsed as JSON when they parse, else kept as strings). Sites alone are enough: the
probe's defaults (sparsify's, sized to the run) train a useful dictionary::

    LIGHTNING_INTERP_PROBE="net.0,net.2"
    LIGHTNING_INTERP_PROBE="model.transformer.h.*;k=16;d_latent=512;dirpath=runs/probe"

or a JSON object of :class:`~lightning_interp.callbacks.DictionaryProbe` arguments
(``{"sites": ["net.0"], "k": 8}``).
"""

from __future__ import annotations

import json
import os
from typing import Any

from lightning_interp.errors import ConfigError

ENV_VAR = "LIGHTNING_INTERP_PROBE"


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_probe_spec(spec: str) -> dict[str, Any]:
    """Turn the variable's text into DictionaryProbe keyword arguments.

    Example:
        >>> parse_probe_spec("net.0,net.2;k=8;dirpath=runs/p")
        {'sites': ['net.0', 'net.2'], 'k': 8, 'dirpath': 'runs/p'}
    """
    spec = spec.strip()
    if spec.startswith("{"):
        try:
            kwargs = json.loads(spec)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{ENV_VAR} is not valid JSON: {err}") from err
    else:
        items = [item.strip() for item in spec.split(";") if item.strip()]
        kwargs = {}
        if items and "=" not in items[0]:
            kwargs["sites"] = [s.strip() for s in items.pop(0).split(",") if s.strip()]
        for item in items:
            key, sep, text = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(
                    f"{ENV_VAR}: cannot read {item!r}; write 'sites;key=value;...', e.g. "
                    f"'net.0;k=8;d_latent=256'"
                )
            kwargs[key.strip()] = _value(text.strip())
    if not isinstance(kwargs, dict) or not kwargs.get("sites"):
        raise ConfigError(f"{ENV_VAR}={spec!r} names no sites; start it with e.g. 'net.0'")
    if isinstance(kwargs["sites"], str):
        kwargs["sites"] = [s.strip() for s in kwargs["sites"].split(",") if s.strip()]
    return kwargs


def callbacks_factory() -> list[Any]:
    """The callbacks Lightning adds to every Trainer: none unless ``LIGHTNING_INTERP_PROBE``."""
    spec = os.environ.get(ENV_VAR, "").strip()
    if not spec:
        return []
    from lightning_interp.callbacks.probe import DictionaryProbe

    kwargs = parse_probe_spec(spec)
    try:
        return [DictionaryProbe(**kwargs)]
    except TypeError as err:  # an option DictionaryProbe does not take
        raise ConfigError(f"{ENV_VAR}: {err}") from err
