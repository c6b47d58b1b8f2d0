"""The evaluation registry: one module per eval, registered by name.

An eval is a function ``run(context: EvalContext) -> dict`` decorated with
:func:`register_eval`; ``lightning-interp evaluate --evals a,b`` runs the named ones in
order. Adding an eval is one new module under ``lightning_interp/evals/`` plus one import
line in the package ``__init__``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lightning_interp.errors import ConfigError

EvalFunction = Callable[["EvalContext"], dict[str, Any]]
_EVALS: dict[str, EvalFunction] = {}


@dataclass
class EvalContext:
    """What every eval receives: the dictionary, the backbone, where and what to read.

    Attributes:
        dictionary: The dictionary under test (a
            :class:`~lightning_interp.dictionaries.Dictionary`).
        backbone: The frozen model it reads (a :class:`~lightning_interp.backbones.Backbone`).
        site: The site the dictionary reads.
        text: The text source for token-level evals (``offline:wikipedia``, a file, ``hf:...``).
        context_size: Tokens per context.
        tokens: Token window of the core eval (kept tokens read).
        seed: Seed of every random choice (splits, subsamples, probe initialisation).
        options: Eval-specific settings from the command line (e.g. the autointerp eval's
            ``explainer``); each eval checks the names it reads.
    """

    dictionary: Any
    backbone: Any
    site: str
    text: str
    context_size: int = 128
    tokens: int = 4096
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)


def register_eval(name: str) -> Callable[[EvalFunction], EvalFunction]:
    """Register ``run(context) -> results`` under ``name``.

    Raises:
        ConfigError: ``name`` is already registered.
    """

    def add(function: EvalFunction) -> EvalFunction:
        if name in _EVALS:
            raise ConfigError(f"eval {name!r} is registered twice; give the new one another name")
        _EVALS[name] = function
        return function

    return add


def available_evals() -> list[str]:
    """Names of the registered evals, in registration order."""
    return list(_EVALS)


def get_eval(name: str) -> EvalFunction:
    """The eval registered as ``name``.

    Raises:
        ConfigError: no eval has that name (the message lists those that do).
    """
    if name not in _EVALS:
        raise ConfigError(f"unknown eval {name!r}; choose from {', '.join(available_evals())}")
    return _EVALS[name]


def parse_eval_names(spec: str) -> list[str]:
    """``"core,absorption"`` -> ``["core", "absorption"]``, each checked, duplicates refused.

    Raises:
        ConfigError: an empty list, a duplicate, or an unknown name.
    """
    names = [part.strip() for part in spec.split(",") if part.strip()]
    if not names:
        raise ConfigError(f"--evals lists no eval; choose from {', '.join(available_evals())}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--evals names an eval twice ({spec!r}); list each once")
    for name in names:
        get_eval(name)
    return names
