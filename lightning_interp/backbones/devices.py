"""Moving tensors and calls across devices without hidden synchronisation.

Two rules keep GPU code both right and fast:

- A host-to-device copy is asynchronous (``non_blocking=True``) only from pinned memory;
  from pageable memory CUDA synchronises the stream first, so pageable tensors are pinned
  on the way (a host-side copy that never waits for the GPU).
- A device-to-host copy is always blocking: an asynchronous copy into pageable memory
  could be read before it lands.

:func:`follow_module` wraps a module (a dictionary) so that it can be called on
activations living elsewhere: its inputs go to the module's device and dtype, its outputs
come back to the caller's. That is what splicing a dictionary into a backbone needs when
the two do not share a device or a dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


def to_device(tensor: Tensor, device: torch.device | str) -> Tensor:
    """``tensor`` on ``device``: no copy if it is already there, async from pinned host memory.

    Example:
        >>> to_device(torch.ones(2), "cpu").device
        device(type='cpu')
    """
    device = torch.device(device)
    if tensor.device == device:
        return tensor
    if tensor.device.type == "cpu" and device.type == "cuda":
        pinned = tensor if tensor.is_pinned() else tensor.pin_memory()
        # The caching host allocator keeps the pinned block alive until the copy is done.
        return pinned.to(device, non_blocking=True)
    return tensor.to(device)


def module_placement(module: nn.Module) -> tuple[torch.device, torch.dtype] | None:
    """Device and floating dtype of a module's first floating parameter (``None``: none)."""
    for parameter in module.parameters():
        if parameter.is_floating_point():
            return parameter.device, parameter.dtype
    return None


def follow_module(
    fn: Callable[[Tensor], Any], module: nn.Module | None = None
) -> Callable[[Tensor], Any]:
    """``fn`` taking inputs on any device and dtype, answering on the caller's.

    The input is moved to the device of ``module`` (default: ``fn`` itself, when it is a
    module) and cast to its parameters' dtype; a tensor output is moved back to the
    input's device and cast to the input's dtype. A model output with a ``reconstruction``
    is not converted (only the splice contract, a tensor, is). When the module is already
    where the input is, and in its dtype, no copy is made.

    Args:
        fn: A callable of one tensor, usually a dictionary.
        module: The module whose placement decides (default ``fn``).

    Example:
        >>> sae = torch.nn.Linear(4, 4).double()
        >>> out = follow_module(sae)(torch.ones(2, 4))  # a float64 module on float32 input
        >>> out.dtype
        torch.float32
    """
    owner = module if module is not None else fn
    if not isinstance(owner, nn.Module):
        return fn

    def call(activation: Tensor) -> Any:
        placement = module_placement(owner)
        if placement is None:
            return fn(activation)
        device, dtype = placement
        moved = to_device(activation, device)
        if activation.is_floating_point() and moved.dtype != dtype:
            moved = moved.to(dtype)
        out = fn(moved)
        if not isinstance(out, Tensor):
            return out
        back = to_device(out, activation.device)
        return back.to(activation.dtype) if back.dtype != activation.dtype else back

    return call
