"""Core eval: reconstruction, sparsity, latent density and next-token metrics.

Follows SAEBench's core eval (``sae_bench/evals/core/main.py``,
``get_sparsity_and_variance_metrics`` and ``calculate_misc_metrics``; adamkarvonen/SAEBench)
and SAELens's downstream metrics (``sae_lens/evals.py``), over one stated window of text:

- ``explained_variance``: ``1 - FVU`` pooled over every token and dimension, with the
  per-dimension means subtracted (the SAELens / sparsify definition,
  :class:`~lightning_interp.metrics.reconstruction.FractionOfVarianceUnexplained`).
  Deviation: SAEBench's ``explained_variance`` subtracts
  the square of the *mean over dimensions* of ``E[x_d^2]`` instead of ``sum_d E[x_d]^2``; we
  keep the textbook pooled variance, which is what FVU means in this library.
- ``mse``: mean squared error per element, ``mean_{n,d} (x - x_hat)^2``. Deviation: SAEBench
  divides each token's summed squared error by the batch's token count, which depends on
  the batch size; a per-element mean does not.
- ``cossim``: mean over tokens of ``cos(x, x_hat)`` (SAEBench ``cossim``).
- ``l2_ratio``: mean over tokens of ``||x_hat|| / ||x||``, with norms below 1e-4 treated
  as 1 (SAEBench ``l2_ratio``).
- ``relative_reconstruction_bias``: ``E||x_hat||^2 / E<x, x_hat>`` (Rajamanoharan et al.
  2024, "Improving Dictionary Learning with Gated Sparse Autoencoders", eq. 10; SAEBench);
  below 1 means shrinkage.
- ``l0`` and ``l1``: mean active latents and mean summed code per token.
- density: each latent's firing frequency over the window; ``frac_alive`` (fired at
  least once), ``dead_fraction`` (never fired in the window), ``dense_fraction_1pct`` /
  ``dense_fraction_10pct`` (SAEBench's ``freq_over_1_percent`` / ``freq_over_10_percent``)
  and a histogram of ``log10`` densities (SAEBench plots the same histogram).
- ``ce_loss_recovered``, ``kl_div_score`` and the raw CE / KL values, in SAELens's
  convention (:func:`~lightning_interp.metrics.downstream.splice_evaluation_many`), over
  the first ``ce_contexts`` contexts of the same window (causal LMs only).

Special tokens (BOS, EOS, chat markers) are left out of the reconstruction statistics, as
SAEBench's ``ignore_tokens`` and training streams do.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_interp.evals.registry import EvalContext, register_eval
from lightning_interp.metrics.downstream import (
    CrossEntropyLossRecovered,
    SplicedKLDivergence,
    SpliceTarget,
    has_lm_head,
    splice_evaluation_many,
)
from lightning_interp.metrics.reconstruction import FractionOfVarianceUnexplained
from lightning_interp.metrics.sparsity import L0, DeadLatentFraction

#: Edges of the log10-density histogram (dead latents are counted apart).
DENSITY_BIN_EDGES = tuple(float(e) for e in range(-8, 1))


class CoreStatistics:
    """Streaming reconstruction and sparsity statistics (the core eval's accumulator).

    Sums are float64, so a long window does not lose precision.

    Args:
        d_latent: Number of latents.
    """

    def __init__(self, d_latent: int) -> None:
        self.fvu = FractionOfVarianceUnexplained()
        self.l0 = L0()
        self.firing = DeadLatentFraction(d_latent)
        self.sums = dict.fromkeys(
            ("squared_error", "elements", "rows", "cossim", "l2_ratio", "l1"), 0.0
        )
        self.recon_sq = 0.0
        self.dot = 0.0

    @torch.no_grad()
    def update(self, target: Tensor, codes: Tensor, reconstruction: Tensor) -> None:
        """Add ``[N, d]`` targets, their ``[N, d_latent]`` codes and ``[N, d]`` reconstructions."""
        x, x_hat = target.double(), reconstruction.double()
        self.fvu.update(x_hat, x)
        self.l0.update(codes)
        self.firing.update(codes)
        norm_in, norm_out = x.norm(dim=-1), x_hat.norm(dim=-1)
        safe_in = torch.where(norm_in.abs() < 1e-4, torch.ones_like(norm_in), norm_in)
        cos = torch.nn.functional.cosine_similarity(x, x_hat, dim=-1)
        self.sums["squared_error"] += float((x - x_hat).pow(2).sum())
        self.sums["elements"] += x.numel()
        self.sums["rows"] += x.shape[0]
        self.sums["cossim"] += float(cos.sum())
        self.sums["l2_ratio"] += float((norm_out / safe_in).sum())
        self.sums["l1"] += float(codes.double().sum())
        self.recon_sq += float(norm_out.pow(2).sum())
        self.dot += float((x * x_hat).sum())

    def compute(self) -> dict[str, Any]:
        """The scalar metrics, the per-latent densities' summary and the histogram."""
        rows = max(self.sums["rows"], 1.0)
        density = self.firing.frequencies()
        alive = density > 0
        counts = torch.histogram(
            density[alive].log10().clamp(min=DENSITY_BIN_EDGES[0], max=0.0),
            bins=torch.tensor(DENSITY_BIN_EDGES, dtype=torch.float64),
        ).hist
        return {
            "explained_variance": float(1.0 - self.fvu.compute()),
            "fvu": float(self.fvu.compute()),
            "mse": self.sums["squared_error"] / max(self.sums["elements"], 1.0),
            "cossim": self.sums["cossim"] / rows,
            "l2_ratio": self.sums["l2_ratio"] / rows,
            "relative_reconstruction_bias": self.recon_sq / self.dot if self.dot else math.nan,
            "l0": float(self.l0.compute()),
            "l1": self.sums["l1"] / rows,
            "frac_alive": float(alive.double().mean()),
            "dead_fraction": float((~alive).double().mean()),
            "dense_fraction_1pct": float((density > 0.01).double().mean()),
            "dense_fraction_10pct": float((density > 0.1).double().mean()),
            "density_histogram": {
                "log10_bin_edges": list(DENSITY_BIN_EDGES),
                "counts": [int(c) for c in counts],
                "dead": int((~alive).sum()),
            },
            "tokens": int(self.sums["rows"]),
        }


def reconstruct(dictionary: Any, rows: Tensor) -> tuple[Tensor, Tensor]:
    """``(codes, reconstruction)`` of ``[N, d_in]`` rows, in the dictionary's dtype."""
    with torch.no_grad():
        rows = rows.to(device=dictionary.device, dtype=dictionary.dtype)
        codes = dictionary.encode(rows)
        return codes, dictionary.with_skip(rows, dictionary.decode(codes))


def _contexts(context: EvalContext, contexts_per_capture: int):
    from lightning_interp.data.lm_datamodule import load_texts
    from lightning_interp.data.tokens import batch_contexts, iter_contexts

    tokenizer = context.backbone.tokenizer
    contexts = iter_contexts(load_texts(context.text), tokenizer, context.context_size)
    return batch_contexts(contexts, contexts_per_capture)


@register_eval("core")
def run(context: EvalContext, *, contexts_per_capture: int = 8, ce_contexts: int = 16) -> dict:
    """Run the core eval over ``context.tokens`` kept tokens of ``context.text``.

    Returns:
        ``{"metrics": {...}, "settings": {...}}``; the settings name the text, the token
        window, the context size and how many contexts the CE / KL numbers cover.
    """
    from lightning_interp.backbones.special_tokens import special_token_ids

    dictionary, backbone = context.dictionary, context.backbone
    site_out = dictionary.config.provenance.site_out
    sites = [context.site] + ([site_out] if site_out else [])
    stats = CoreStatistics(dictionary.d_latent)
    special = torch.tensor(special_token_ids(backbone.tokenizer), dtype=torch.long)
    causal = has_lm_head(backbone)
    ce, kl = CrossEntropyLossRecovered(), SplicedKLDivergence()
    target = SpliceTarget(dictionary, context.site, site_out, ce, kl)
    seen = spliced = 0
    for _, ids, mask in _contexts(context, contexts_per_capture):
        if seen >= context.tokens:
            break
        keep = mask.bool() & ~torch.isin(ids, special)
        keep &= keep.reshape(-1).cumsum(0).view_as(keep) <= context.tokens - seen
        acts = backbone.capture({"input_ids": ids, "attention_mask": mask}, sites)
        flat = keep.reshape(-1)
        rows = acts[context.site].reshape(-1, acts[context.site].shape[-1])[flat]
        goal = acts[sites[-1]].reshape(-1, acts[sites[-1]].shape[-1])[flat]
        codes, recon = reconstruct(dictionary, rows)
        stats.update(goal, codes, recon)
        seen += int(flat.sum())
        if causal and spliced < ce_contexts:
            n = ce_contexts - spliced
            splice_evaluation_many(
                backbone, [target], {"input_ids": ids[:n], "attention_mask": mask[:n]}
            )
            spliced += len(ids[:n])
    metrics = stats.compute()
    if spliced:
        metrics.update({k: float(v) for k, v in ce.compute_all().items()})
        metrics.update({k: float(v) for k, v in kl.compute_all().items()})
    return {
        "metrics": metrics,
        "settings": {
            "text": context.text,
            "context_size": context.context_size,
            "token_window": metrics["tokens"],
            "ce_kl_contexts": spliced,
            "ce_kl_convention": "saelens" if spliced else None,
            "special_tokens_excluded": True,
        },
    }
