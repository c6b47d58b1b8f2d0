"""What an activation cache folder holds: names, the manifest's format, normalisation scales.

Shared by the writer (:mod:`~lightning_interp.data.cache_writer`) and the reader
(:mod:`~lightning_interp.data.cache`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_interp.errors import ConfigError

MANIFEST_NAME = "manifest.json"
CACHE_FORMAT = "lightning-interp-activations"
CACHE_VERSION = 1
SHARD_GLOB = "shard-*.safetensors"
# Temporary files of atomic writes: ".<final name>.<random>.tmp".
TEMP_GLOBS = (".shard-*.tmp", f".{MANIFEST_NAME}.*.tmp")
SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float64: "F64",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
}


def expected_norm_scale(sample: Tensor, target_norm: float | None = None) -> float:
    """The factor ``s`` such that rows of ``s * sample`` have mean L2 norm ``target_norm``.

    SAELens's ``"expected_average_only_in"`` normalisation: activations are scaled so their
    average norm is ``sqrt(d)``, which makes hyper-parameters transfer across sites and models.

    Args:
        sample: Activations ``[..., d]`` (leading dimensions are rows).
        target_norm: The mean norm wanted (default ``sqrt(d)``).

    Returns:
        The scale, a positive float.

    Example:
        >>> x = torch.randn(1000, 16) * 5
        >>> s = expected_norm_scale(x)
        >>> round(float((s * x).norm(dim=-1).mean()), 3)
        4.0
    """
    rows = sample.detach().reshape(-1, sample.shape[-1]).double()
    mean_norm = float(rows.norm(dim=-1).mean()) if rows.shape[0] else 0.0
    if not math.isfinite(mean_norm) or mean_norm <= 0:
        raise ConfigError(f"cannot normalise a sample whose mean norm is {mean_norm}")
    target = math.sqrt(rows.shape[-1]) if target_norm is None else float(target_norm)
    return target / mean_norm


def check_scales(scales: Mapping[str, float], sites: Sequence[str], where: str) -> dict:
    """The per-site scales as floats, if every one names a site and is finite and > 0."""
    unknown = sorted(set(scales) - set(sites))
    if unknown:
        raise ConfigError(f"{where}: normalization names unknown sites {unknown}; sites: {sites}")
    bad = {
        k: v
        for k, v in scales.items()
        if isinstance(v, bool) or not (isinstance(v, (int, float)) and v > 0)
    }
    if bad or not all(math.isfinite(v) for v in scales.values()):
        raise ConfigError(f"{where}: normalization scales must be finite and > 0, got {scales}")
    return {site: float(scale) for site, scale in scales.items()}
