"""Record in a dictionary's provenance the scale its training data applied to activations.

A dictionary trained on ``s * x`` (the activation cache's ``apply_normalization=True``, which
multiplies each site by the expected-norm factor in its manifest) computes ``f(s * x)``. If
``provenance.activation_scale`` says so, saving folds ``s`` into the weights
(:meth:`~lightning_interp.dictionaries.Dictionary.with_scale_folded`) and the exported
dictionary takes raw activations, as SAELens does with its ``norm_scaling_factor`` at the
end of training. A transcoder's output site has its own factor
(``provenance.activation_scale_out``).

The training module reads the factors from its data module's
:class:`~lightning_interp.data.source.ActivationSource` (``scales``: site -> factor, empty
when it does not scale; ``sites``), or, trained on a bare dataset, from the same two
attributes of the dataset (as :class:`~lightning_interp.data.ActivationStream` and
:class:`~lightning_interp.data.CachedActivations` announce them). Which sites a dictionary
reads is :func:`~lightning_interp.data.batches.sites_read`'s decision, as for its batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_interp.data.batches import sites_read
from lightning_interp.dictionaries import Dictionary
from lightning_interp.errors import ConfigError


def data_scales(dataset: Any) -> tuple[dict[str, float], list[str]] | None:
    """``(site -> scale, sites in batch order)`` of a dataset that scales, else ``None``."""
    scales, sites = getattr(dataset, "scales", None), getattr(dataset, "sites", None)
    if not isinstance(scales, Mapping) or not sites:
        return None
    return {str(site): float(s) for site, s in scales.items()}, [str(site) for site in sites]


def _merged(recorded: float | None, found: float, field: str, site: str | None) -> float:
    if recorded in (None, 1.0) or recorded == found:
        return found
    raise ConfigError(
        f"the dictionary's provenance.{field} is {recorded} but the training data scales site "
        f"{site!r} by {found}; scale the data once: drop provenance.{field} from the config "
        f"or set apply_normalization: false"
    )


def record_activation_scales(
    dictionary: Dictionary, scales: Mapping[str, float], sites: Sequence[str]
) -> bool:
    """Write the scales the training data applies into ``dictionary.config.provenance``.

    Sets ``activation_scale`` (input site) and, for a transcoder reading a second site,
    ``activation_scale_out``; ``normalization`` becomes ``"expected_norm"`` and empty
    ``site``/``site_out`` take the data's site names. Idempotent (a second fit records
    the same values).

    Args:
        dictionary: The dictionary being trained (its config is replaced).
        scales: Site -> factor the data multiplies rows by (empty: raw activations).
        sites: The sites the data serves, in batch order.

    Returns:
        Whether a scale other than 1 was recorded.

    Raises:
        ConfigError: The provenance already records a different scale for the same site
            (the activations would be scaled twice), or input and output scales differ
            while ``b_dec`` is applied to the input (the export could not fold them).
    """
    if not sites:
        return False
    provenance = dictionary.config.provenance
    site_in, site_out = sites_read(provenance.site, provenance.site_out, sites)
    updates: dict[str, Any] = {}
    if provenance.site is None and site_in is not None:
        updates["site"] = site_in
    if provenance.site_out is None and site_out is not None:
        updates["site_out"] = site_out
    scale_in = scales.get(site_in, 1.0) if site_in is not None else 1.0
    scale_out = scales.get(site_out, 1.0) if site_out is not None else None
    scaled = scale_in != 1.0 or scale_out not in (None, 1.0)
    if scaled:
        updates["activation_scale"] = _merged(
            provenance.activation_scale, scale_in, "activation_scale", site_in
        )
        if scale_out is not None:
            updates["activation_scale_out"] = _merged(
                getattr(provenance, "activation_scale_out", None),
                scale_out,
                "activation_scale_out",
                site_out,
            )
        if provenance.normalization == "none":
            updates["normalization"] = "expected_norm"
        final_out = updates.get("activation_scale_out", updates["activation_scale"])
        if dictionary.config.apply_b_dec_to_input and final_out != updates["activation_scale"]:
            # Folding cannot serve b_dec on both sides with two factors; say so now, not
            # after training, when the export would refuse.
            raise ConfigError(
                f"the training data scales input site {site_in!r} by {scale_in} and output "
                f"site {site_out!r} by {scale_out}, which a dictionary with "
                f"apply_b_dec_to_input=True cannot fold; set apply_b_dec_to_input: false "
                f"(usual for transcoders) or scale both sites alike"
            )
    if updates:
        dictionary.config = dictionary.config.replace(
            provenance=dataclasses.replace(provenance, **updates)
        )
    return scaled
