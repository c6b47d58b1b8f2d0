"""Normalising streamed activations by one fixed factor per site, estimated before training.

Every site's rows are multiplied by a scalar ``s`` chosen on a sample of the training text,
so that hyper-parameters given for normalised inputs (a JumpReLU bandwidth, an L1 or L0
coefficient) mean the same at any layer of any model. The dictionary trains on ``s * x``;
its provenance records ``s`` and the export folds it into the weights, so the saved
dictionary takes raw activations (see :mod:`~lightning_interp.modules.scales`). Two
conventions are in use, and they differ by about ``sqrt(d)``:

- ``"sqrt_d"``: the mean L2 norm becomes ``sqrt(d)``, ``s = sqrt(d) / E||x||``. SAELens's
  ``normalize_activations="expected_average_only_in"`` (``ActivationScaler.
  estimate_scaling_factor`` in ``sae_lens/training/activation_scaler.py``), after
  Anthropic's April 2024 circuits update; :func:`~lightning_interp.data.cache.expected_norm_scale`
  computes the same factor for a cache.
- ``"unit"``: the mean *squared* L2 norm becomes 1, ``s = 1 / sqrt(E||x||^2)``. Gemma Scope
  (Lieberum et al. 2024, sec. 3.1) and the JumpReLU paper (Rajamanoharan et al. 2024,
  app. I), whose bandwidth and initial threshold of 0.001 assume it; dictionary_learning's
  ``get_norm_factor`` (``dictionary_learning/training.py``) divides by ``sqrt(E||x||^2)``.
- a number ``t``: the mean L2 norm becomes ``t``, ``s = t / E||x||``.

The sample is the first ``tokens`` positions training keeps (padding and, by default,
special tokens dropped), read in text order: the same rows on every rank and worker,
whatever the seed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from lightning_interp.data import sharding
from lightning_interp.errors import ConfigError

if TYPE_CHECKING:
    from lightning_interp.data.stream import ActivationStream

NormalizeMode = Literal["none", "expected_norm"]
NormalizeTarget = Literal["sqrt_d", "unit"] | float
_TARGETS = {
    "sqrt_d": "mean L2 norm sqrt(d) (SAELens expected_average_only_in)",
    "unit": "mean squared L2 norm 1 (Gemma Scope)",
}


def check_normalization(normalize: object, target: object, tokens: object) -> None:
    """Refuse settings :func:`estimate_scales` cannot use, naming the field and the fix.

    Raises:
        ConfigError: ``normalize`` is not ``"none"``/``"expected_norm"``, ``target`` is
            neither ``"sqrt_d"``, ``"unit"`` nor a finite number > 0, or ``tokens`` is not
            a positive integer.
    """
    if normalize not in ("none", "expected_norm"):
        raise ConfigError(f"normalize must be 'none' or 'expected_norm', got {normalize!r}")
    number = isinstance(target, int | float) and not isinstance(target, bool)
    if not (target in _TARGETS or (number and math.isfinite(target) and target > 0)):
        raise ConfigError(
            f"normalize_target must be 'sqrt_d' (SAELens), 'unit' (Gemma Scope) or a mean "
            f"norm > 0, got {target!r}"
        )
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ConfigError(f"normalize_tokens must be a positive integer, got {tokens!r}")


def describe_target(target: NormalizeTarget) -> str:
    """The statistic a target fixes, in words (for provenance and model cards)."""
    return _TARGETS[target] if isinstance(target, str) else f"mean L2 norm {target}"


def scale_for(
    width: int, rows: int, sum_norm: float, sum_squared_norm: float, target: NormalizeTarget
) -> float:
    """The factor that gives ``rows`` activations of ``width`` dimensions the target statistic.

    Args:
        width: Activation width ``d``.
        rows: Rows in the sample.
        sum_norm: Sum over the rows of ``||x||``.
        sum_squared_norm: Sum over the rows of ``||x||^2``.
        target: See the module docstring.

    Example:
        >>> scale_for(4, rows=2, sum_norm=2 * 8.0, sum_squared_norm=2 * 64.0, target="sqrt_d")
        0.25
        >>> scale_for(4, rows=2, sum_norm=2 * 8.0, sum_squared_norm=2 * 64.0, target="unit")
        0.125
    """
    if target == "unit":
        scale = 1.0 / math.sqrt(sum_squared_norm / rows)
    else:
        wanted = math.sqrt(width) if target == "sqrt_d" else float(target)
        scale = wanted / (sum_norm / rows)
    if not (math.isfinite(scale) and scale > 0):
        raise ConfigError(
            f"cannot normalise activations whose mean norm is {sum_norm / rows} (scale "
            f"{scale}); the site is constant zero or overflows: pick another site"
        )
    return scale


@torch.no_grad()
def estimate_scales(
    stream: ActivationStream, tokens: int, target: NormalizeTarget
) -> dict[str, float]:
    """One factor per site of ``stream``, from its first ``tokens`` kept positions.

    Under DDP every rank reads the same rows; rank 0's factors are broadcast so that every
    rank scales by bitwise the same numbers whatever its GPU's kernels did.

    Args:
        stream: The training stream (its current ``scales`` are ignored: raw rows are read).
        tokens: Positions to read (fewer if the text ends first).
        target: ``"sqrt_d"``, ``"unit"`` or a mean norm (see the module docstring).

    Returns:
        ``{site: factor}`` for every site of the stream.

    Raises:
        ConfigError: The text holds no kept position, or a site's activations are zero.
    """
    sums: dict[str, list[float]] = {site: [0.0, 0.0] for site in stream.sites}
    widths: dict[str, int] = {}
    rows = 0
    for batch in stream.rows_in_text_order(tokens):
        for site, tensor in batch.items():
            squared = tensor.double().pow(2).sum(-1)  # fp64: sums over millions of rows
            sums[site][0] += float(squared.sqrt().sum())
            sums[site][1] += float(squared.sum())
            widths[site] = tensor.shape[-1]
        rows += next(iter(batch.values())).shape[0]
    if rows == 0:
        raise ConfigError(
            "the training text holds no kept token to estimate the normalisation from; "
            "give more text or set normalize: none"
        )
    scales = {site: scale_for(widths[site], rows, *sums[site], target) for site in stream.sites}
    return _from_rank_zero(scales)


def _from_rank_zero(scales: dict[str, float]) -> dict[str, float]:
    if sharding.world()[1] == 1:
        return scales
    box: list[object] = [scales]
    torch.distributed.broadcast_object_list(box, src=0)
    return dict(box[0])  # type: ignore[call-overload]


def scale_rows(rows: Mapping[str, Tensor], scales: Mapping[str, float]) -> dict[str, Tensor]:
    """``rows`` with each scaled site multiplied by its factor, in the rows' own dtype.

    The product is taken in at least float32 and rounded once, so bfloat16 activations lose
    no more than one rounding.
    """
    scaled = dict(rows)
    for site, scale in scales.items():
        if site in scaled:
            tensor = scaled[site]
            wide = torch.promote_types(tensor.dtype, torch.float32)
            scaled[site] = (tensor.to(wide) * scale).to(tensor.dtype)
    return scaled
