"""The one batch shape of activation sources, and the one place it becomes (inputs, targets).

Every activation source of this package (:class:`~lightning_interp.data.ActivationStream`,
:class:`~lightning_interp.data.CachedActivations`, the image stream, and the data modules
serving them) yields a mapping ``{site: rows}`` keyed by canonical site name, in the order of
its ``sites``. Which rows a dictionary reads is decided here only:

- a dictionary whose provenance names its ``site`` (and ``site_out`` for a transcoder)
  reads those;
- otherwise data with one site is an autoencoder's input and target, and data with two
  sites is a transcoder's (input, target) pair, in the order the sites were given;
- with more sites, each dictionary must name its site.

Plain tensors, ``(inputs, targets)`` pairs and ``{"activations"|"inputs", "targets"}``
dicts, as any ``DataLoader`` of a user's own activations yields, are read by
:func:`split_batch`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from lightning_interp.errors import ConfigError, ShapeMismatchError

#: Keys of a plain dict batch that does not come keyed by site.
PLAIN_KEYS = ("activations", "inputs")


def sites_read(
    site: str | None, site_out: str | None, sites: Sequence[str], who: str = "a dictionary"
) -> tuple[str, str | None]:
    """``(site, site_out)`` a dictionary reads from data serving ``sites``.

    Args:
        site: The dictionary's ``provenance.site`` (``None``: not named).
        site_out: Its ``provenance.site_out`` (a transcoder's target site), or ``None``.
        sites: The sites the data serves, in order.
        who: Names the dictionary in the error message.

    Returns:
        ``(site, site_out)`` as named, else decided by the number of sites (see the module
        docstring).

    Raises:
        ConfigError: The dictionary names no site and the data serves none, or more than two.

    Example:
        >>> sites_read(None, None, ["layers.3.mlp_in", "layers.3.mlp_out"])
        ('layers.3.mlp_in', 'layers.3.mlp_out')
    """
    if site is not None:
        return site, site_out
    if len(sites) == 1:
        return sites[0], None
    if len(sites) == 2:
        return sites[0], sites[1]
    raise ConfigError(
        f"{who} names no site but the data serves {list(sites)}; set its "
        f"config.provenance.site (and site_out for a transcoder) to the site it reads"
    )


def _rows(inputs: Tensor, targets: Tensor | None) -> tuple[Tensor, Tensor | None]:
    inputs = inputs.reshape(-1, inputs.shape[-1])
    if targets is not None:
        targets = targets.reshape(-1, targets.shape[-1])
        if targets.shape[0] != inputs.shape[0]:
            raise ShapeMismatchError(
                f"inputs have {inputs.shape[0]} rows but targets have {targets.shape[0]}"
            )
    return inputs, targets


def split_batch(batch: Any) -> tuple[Tensor, Tensor | None]:
    """Return ``(inputs, targets)`` from a batch that is not keyed by site.

    Accepted: a tensor ``[..., d_in]``; a tuple/list ``(inputs,)`` or ``(inputs, targets)``
    (a transcoder's two sites); a mapping with ``"activations"`` or ``"inputs"`` and an
    optional ``"targets"``. Leading dimensions are flattened to rows.
    """
    if isinstance(batch, Tensor):
        inputs, targets = batch, None
    elif isinstance(batch, Mapping):
        key = "activations" if "activations" in batch else "inputs"
        if key not in batch:
            raise ConfigError(
                f"a dict batch needs an 'activations' or 'inputs' key, got keys {sorted(batch)}"
            )
        inputs, targets = batch[key], batch.get("targets")
    elif isinstance(batch, Sequence) and 1 <= len(batch) <= 2:
        inputs, targets = batch[0], batch[1] if len(batch) == 2 else None
    else:
        raise ConfigError(
            f"cannot read activations from a batch of type {type(batch).__name__}; yield "
            f"tensors, (inputs, targets) pairs or dicts with an 'activations' key"
        )
    return _rows(inputs, targets)


def is_site_batch(batch: Any) -> bool:
    """Whether ``batch`` is keyed by site (the shape every activation source yields)."""
    return isinstance(batch, Mapping) and not any(key in batch for key in PLAIN_KEYS)


def inputs_and_targets(
    batch: Any, site: str | None = None, site_out: str | None = None, who: str = "a dictionary"
) -> tuple[Tensor, Tensor | None]:
    """The ``(inputs, targets)`` rows a dictionary reading ``site`` -> ``site_out`` trains on.

    Args:
        batch: ``{site: rows}`` from an activation source, or any shape
            :func:`split_batch` reads (then ``site`` and ``site_out`` are not used).
        site: The dictionary's ``provenance.site`` (``None``: decided by the batch's sites).
        site_out: Its ``provenance.site_out``, or ``None``.
        who: Names the dictionary in error messages.

    Returns:
        Inputs ``[N, d_in]`` and targets ``[N, d_out]`` (``None``: reconstruct the inputs).

    Raises:
        ConfigError: The batch lacks a site the dictionary reads.
        ShapeMismatchError: Inputs and targets have different numbers of rows.
    """
    if not is_site_batch(batch):
        return split_batch(batch)
    site, site_out = sites_read(site, site_out, list(batch), who)
    wanted = [site] + ([site_out] if site_out is not None else [])
    if any(name not in batch for name in wanted):
        raise ConfigError(
            f"{who} reads site {site!r}"
            + (f" -> {site_out!r}" if site_out is not None else "")
            + f" but the batch holds {sorted(batch)}; set config.provenance.site (and "
            f"site_out for a transcoder) to one of them, and list every site in the data "
            f"module's sites"
        )
    return _rows(batch[site], batch[site_out] if site_out is not None else None)
