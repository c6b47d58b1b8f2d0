"""A small, valid feature store (layout v1) written from a seeded generator.

The dashboard tests use it so they do not depend on the store builder: every file and tensor
named in the layout is written with plausible values (sorted top values, densities from
counts, histograms whose sum is the firing count), plus two hostile vocabulary strings that a
page must show as text. Latent ``i``'s top contexts hold the planted token ``PLANTED_<i>`` at
their centre; the last latent never fires (all padding).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

HOSTILE = ("<script>alert(1)</script>", '"><img src=x onerror=alert(2)>')
FILLER = ("the", " cat", " sat", " on", " a", " mat", ",", " and", "\n", " dog", " ran", ".")


def planted(latent: int) -> str:
    """The token planted at the centre of latent ``latent``'s top contexts."""
    return f"PLANTED_{latent}"


def _vocab(n_latents: int) -> list[str]:
    return [*FILLER, *HOSTILE, *(planted(i) for i in range(n_latents))]


def _contexts(
    gen: torch.Generator,
    prefix: str,
    fires: torch.Tensor,
    centre_ids: torch.Tensor,
    maxima: torch.Tensor,
    window: int,
    n_vocab_filler: int,
    fractions: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The five context tensors per latent (padding where dead).

    Example ``k`` peaks at ``fractions[k]`` times the latent's max activation.
    """
    examples = fractions.numel()
    n_latents = fires.numel()
    centre = window // 2
    tokens = torch.randint(0, n_vocab_filler, (n_latents, examples, window), generator=gen)
    tokens[:, :, centre] = centre_ids[:, None]
    # Sparse activations: the centre fires hardest, a few neighbours fire a little.
    acts = torch.rand(n_latents, examples, window, generator=gen)
    acts = torch.where(acts > 0.7, acts * 0.5, torch.zeros(()))
    values = maxima[:, None] * fractions[None, :]
    acts = acts * values[:, :, None]
    acts[:, :, centre] = values
    source = torch.arange(n_latents * examples).reshape(n_latents, examples) * 7
    dead = ~fires
    tokens[dead] = -1
    acts[dead] = 0
    values[dead] = 0
    source[dead] = -1
    return {
        f"{prefix}tokens": tokens.to(torch.int32),
        f"{prefix}activations": acts.to(torch.float16),
        f"{prefix}values": values.to(torch.float32),
        f"{prefix}center": torch.full((n_latents, examples), centre, dtype=torch.int16),
        f"{prefix}source": source.to(torch.int64),
    }


def write_store(
    folder: Path,
    *,
    n_latents: int = 6,
    window: int = 9,
    top_k: int = 4,
    quantile_bins: int = 3,
    per_quantile: int = 2,
    logit_lens: int = 3,
    correlated: int = 2,
    bins: int = 12,
    explanations: bool = True,
    seed: int = 0,
) -> Path:
    """Write a store folder at ``folder`` and return it.

    Args:
        folder: The store folder (created).
        n_latents: F; the last latent never fires.
        window: W, tokens per context.
        top_k: T, top examples per latent.
        quantile_bins: Q.
        per_quantile: S, examples per quantile bin.
        logit_lens: L (0: no logit-lens tensors, as for a model without an LM head).
        correlated: C.
        bins: B, histogram bins.
        explanations: also write ``explanations.json`` (latent 0's text is hostile).
        seed: seed of the generator.
    """
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = _vocab(n_latents)
    n_filler = len(FILLER)
    hostile_ids = [n_filler + k for k in range(len(HOSTILE))]
    tokens_read = 10_000

    count = torch.randint(5, 500, (n_latents,), generator=gen)
    count[-1] = 0
    fires = count > 0
    maxima = torch.where(fires, 1.0 + 9.0 * torch.rand(n_latents, generator=gen), 0.0)
    mean = maxima * 0.3
    quantiles = maxima[:, None] * torch.linspace(0.1, 0.9, 9)[None, :]
    histogram = torch.zeros(n_latents, bins, dtype=torch.int64)
    for latent in range(n_latents):
        draws = torch.randint(0, bins, (int(count[latent]),), generator=gen)
        histogram[latent] = torch.bincount(draws, minlength=bins)

    stats = {
        "count": count.to(torch.int64),
        "density": (count.double() / tokens_read).to(torch.float32),
        "mean_activation": mean.to(torch.float32),
        "max_activation": maxima.to(torch.float32),
        "quantiles": quantiles.to(torch.float32),
        "histogram": histogram,
    }
    if logit_lens:
        logit_ids = torch.randint(0, len(vocab), (n_latents, 2, logit_lens), generator=gen)
        logit_ids[0, 0, 0] = hostile_ids[0]  # a hostile string in the logit table too
        ramp = torch.linspace(2.0, 1.0, logit_lens)
        stats |= {
            "logit_top_ids": logit_ids[:, 0].contiguous(),
            "logit_top_values": ramp.expand(n_latents, -1).contiguous(),
            "logit_bottom_ids": logit_ids[:, 1].contiguous(),
            "logit_bottom_values": (-ramp).expand(n_latents, -1).contiguous(),
        }
    corr_ids = torch.stack(
        [(torch.arange(n_latents) + k + 1) % n_latents for k in range(correlated)], 1
    )
    corr_ids[-1] = -1
    corr_values = torch.linspace(0.9, 0.5, correlated).expand(n_latents, -1).contiguous()
    stats |= {"correlated_ids": corr_ids.to(torch.int64), "correlated_values": corr_values}
    save_file(stats, str(folder / "stats.safetensors"))

    centre_ids = torch.tensor([n_filler + len(HOSTILE) + i for i in range(n_latents)])
    top = torch.linspace(1.0, 0.8, top_k)
    # Quantile bin b holds examples peaking inside (b/Q, (b+1)/Q] of the max.
    within = torch.linspace(0.2, 0.9, per_quantile)
    sampled = torch.cat([(b + within) / quantile_bins for b in range(quantile_bins)])
    contexts = _contexts(gen, "top_", fires, centre_ids, maxima, window, n_filler, top)
    quantile = _contexts(gen, "quantile_", fires, centre_ids, maxima, window, n_filler, sampled)
    # Latent 0's first top context holds both hostile strings next to its planted token.
    contexts["top_tokens"][0, 0, 0] = hostile_ids[0]
    contexts["top_tokens"][0, 0, 1] = hostile_ids[1]
    contexts["top_activations"][0, 0, 1] = 0.5
    save_file(contexts | quantile, str(folder / "contexts.safetensors"))

    (folder / "vocab.json").write_text(
        json.dumps({str(i): text for i, text in enumerate(vocab)}), encoding="utf-8"
    )
    if explanations:
        scores = torch.rand(n_latents, generator=gen).tolist()
        notes = {
            str(i): {"text": f"fires on {planted(i)}", "score": scores[i]} for i in range(n_latents)
        }
        notes["0"]["text"] = HOSTILE[1]
        (folder / "explanations.json").write_text(json.dumps(notes), encoding="utf-8")
    store = {
        "format": "lightning-interp-feature-store",
        "version": 1,
        "dictionary": {
            "source": "fixture",
            "architecture": "topk",
            "d_latent": n_latents,
            "site": "layers.0.resid_post",
            "backbone": "tiny-random",
            "provenance": {},
        },
        "corpus": {"dataset": "fixture-text", "tokens": tokens_read, "context_size": 32},
        "window": window,
        "top_k": top_k,
        "quantile_bins": quantile_bins,
        "per_quantile": per_quantile,
        "logit_lens": logit_lens,
        "correlated": correlated,
        "correlation": "pearson",
        "quantiles": "exact",
        "histogram": {"bins": bins, "log10_min": -2.0, "log10_max": 1.0},
        "modality": "text",
    }
    (folder / "store.json").write_text(json.dumps(store, indent=2), encoding="utf-8")
    return folder
