"""Forward hooks that read or replace a site's activation, and stop a forward early."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_interp.backbones.sites import Site
from lightning_interp.errors import ShapeMismatchError


class StopForward(Exception):
    """Raised from a hook once every requested site is captured, to skip later layers."""


def _first_tensor(value: Any) -> Tensor:
    return value if isinstance(value, Tensor) else value[0]


def _replace_first(value: Any, new: Tensor) -> Any:
    if isinstance(value, Tensor):
        return new
    return (new, *value[1:]) if isinstance(value, tuple) else [new, *value[1:]]


def _input_of(args: tuple, kwargs: dict) -> Tensor:
    # Blocks get hidden states positionally in most families, by keyword in some.
    if args:
        return _first_tensor(args[0]) if not isinstance(args[0], Tensor) else args[0]
    return kwargs["hidden_states"]


def add_reader(
    module: nn.Module, site: Site, store: Callable[[Site, Tensor], None]
) -> RemovableHandle:
    """Register a hook passing the site's activation to ``store(site, activation)``."""
    if site.direction == "input":

        def pre_hook(_module, args, kwargs):
            store(site, _input_of(args, kwargs))

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(_module, _args, output):
        store(site, _first_tensor(output))

    return module.register_forward_hook(hook)


def _checked(site: Site, old: Tensor, new: Tensor) -> Tensor:
    if not isinstance(new, Tensor) or new.shape != old.shape:
        shape = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
        raise ShapeMismatchError(
            f"splice function for {site.name!r} returned {shape}; it must return a tensor "
            f"of the activation's shape {tuple(old.shape)}"
        )
    # A float32 dictionary spliced into a bf16 model must hand back the model's dtype.
    return new.to(dtype=old.dtype, device=old.device)


def add_writer(module: nn.Module, site: Site, fn: Callable[[Tensor], Tensor]) -> RemovableHandle:
    """Register a hook replacing the site's activation by ``fn(activation)``."""
    if site.direction == "input":

        def pre_hook(_module, args, kwargs):
            if args:
                old = _input_of(args, kwargs)
                return (_checked(site, old, fn(old)), *args[1:]), kwargs
            old = kwargs["hidden_states"]
            return args, {**kwargs, "hidden_states": _checked(site, old, fn(old))}

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(_module, _args, output):
        old = _first_tensor(output)
        return _replace_first(output, _checked(site, old, fn(old)))

    return module.register_forward_hook(hook)
