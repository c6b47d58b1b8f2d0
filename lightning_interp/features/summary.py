"""From accumulators to the store's tensors: densities, deciles, co-firing, example arrays."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_interp.features.store import FeatureAccumulator

DECILES = torch.arange(1, 10, dtype=torch.float64) / 10


def sample_quantiles(values: Tensor, keys: Tensor, probs: Tensor = DECILES) -> Tensor:
    """Linear-interpolated quantiles (``torch.quantile``'s default) of each row's sample.

    Args:
        values: ``[F, R]`` sampled values.
        keys: ``[F, R]`` their keys; ``inf`` marks an empty slot.
        probs: Quantile levels.

    Returns:
        ``[F, len(probs)]`` float32; 0 for rows with no sample.
    """
    n = (~keys.isinf()).sum(1)
    ordered = values.double().masked_fill(keys.isinf(), float("inf")).sort(1).values
    pos = probs[None, :] * (n[:, None] - 1).clamp(min=0)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    low, high = ordered.gather(1, lo), ordered.gather(1, hi)
    out = low + (high - low) * (pos - lo)
    out = torch.where(lo == hi, low, out)
    return out.masked_fill(n[:, None] == 0, 0.0).float()


def jaccard_neighbours(row_latents: Tensor, d_latent: int, top: int) -> tuple[Tensor, Tensor]:
    """The ``top`` latents with the largest Jaccard index of firing, per latent.

    Args:
        row_latents: ``[R, m]`` latents firing on each sampled token, -1 padding.
        d_latent: Number of latents.
        top: Neighbours kept per latent.

    Returns:
        ``(ids [F, top] int64 (-1 padding), values [F, top] float32)``; a latent never
        co-firing with another has only padding.
    """
    ids = torch.full((d_latent, top), -1, dtype=torch.long)
    values = torch.zeros(d_latent, top)
    valid = row_latents >= 0
    if top == 0 or not valid.any():
        return ids, values
    fired = torch.bincount(row_latents[valid], minlength=d_latent)
    keys, counts = [], []
    for chunk in row_latents.split(256):
        a, b = chunk[:, :, None], chunk[:, None, :]
        pair = (a >= 0) & (b >= 0) & (a != b)
        key = (a * d_latent + b).expand_as(pair)[pair]
        unique, count = key.unique(return_counts=True)
        keys.append(unique)
        counts.append(count)
    if not keys or not sum(len(k) for k in keys):
        return ids, values
    key, inverse = torch.cat(keys).unique(return_inverse=True)
    co = torch.zeros(len(key), dtype=torch.long).index_add_(0, inverse, torch.cat(counts))
    i, j = key // d_latent, key % d_latent
    jaccard = co.double() / (fired[i] + fired[j] - co).double()
    # Sort by (latent, -jaccard, neighbour id): stable sorts, last key first.
    order = torch.argsort(-jaccard, stable=True)
    order = order[torch.argsort(i[order], stable=True)]
    i, j, jaccard = i[order], j[order], jaccard[order]
    starts = torch.searchsorted(i, i)
    rank = torch.arange(len(i)) - starts
    keep = rank < top
    ids[i[keep], rank[keep]] = j[keep]
    values[i[keep], rank[keep]] = jaccard[keep].float()
    return ids, values


def summarize(acc: FeatureAccumulator, tokens: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(stats, contexts)`` tensors of the store layout from a finished pass.

    Args:
        acc: The accumulators after the last batch.
        tokens: Kept tokens read.
    """
    s = acc.settings
    count = acc.count
    fired = count > 0
    mean = torch.where(fired, acc.act_sum / count.clamp(min=1), 0.0).float()
    ids, values = jaccard_neighbours(acc.row_latents, acc.d_latent, s.correlated)
    stats = {
        "count": count.clone(),
        "density": (count.double() / max(tokens, 1)).float(),
        "mean_activation": mean,
        "max_activation": acc.act_max.clone(),
        "quantiles": sample_quantiles(acc.sample_values, acc.sample_keys),
        "histogram": acc.histogram.clone(),
        "correlated_ids": ids,
        "correlated_values": values,
    }
    contexts: dict[str, Tensor] = {}
    for prefix in ("top", "quantile"):
        examples = acc.ordered(prefix)
        for name, tensor in examples.items():
            contexts[f"{prefix}_{name}"] = tensor
        contexts[f"{prefix}_center"] = torch.full(
            examples["source"].shape, s.center, dtype=torch.int16
        )
    return stats, contexts


def quantiles_kind(acc: FeatureAccumulator) -> str:
    """``"exact"`` when every latent's firings fit its sample, else ``"estimated"``."""
    return "exact" if bool((acc.count <= acc.settings.value_sample).all()) else "estimated"


def correlation_kind(acc: FeatureAccumulator, tokens: int) -> str:
    """How ``correlated_values`` were measured, for store.json."""
    sample = (
        "all kept tokens"
        if tokens <= acc.settings.token_sample
        else (f"a seeded sample of {acc.settings.token_sample} kept tokens")
    )
    return f"jaccard of firing over {sample}"
