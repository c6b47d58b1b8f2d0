"""Logit lens of decoder directions: which output tokens a latent promotes and suppresses.

As SAEDashboard (``W_dec @ W_U`` with TransformerLens's ``fold_ln``, which folds the final
norm's scale into ``W_U`` and, for LayerNorm, centres the residual direction) and
Neuronpedia's logit-lens service (``feature_logits = W_dec @ W_U.T``): the direction goes
through the final norm's *linear* part only (centring for LayerNorm, then the elementwise
scale; the division by the norm of a whole residual is left out, as the direction is not
one) and the unembedding. Biases are left out: they shift every latent alike.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_interp.backbones.sites import get_module

# Final norms of the supported decoder families.
_FINAL_NORMS = (
    "model.norm",  # Llama, Qwen, Mistral, Gemma
    "transformer.ln_f",  # GPT-2
    "gpt_neox.final_layer_norm",  # GPT-NeoX / Pythia
    "model.final_layernorm",  # Phi
    "model.decoder.final_layer_norm",  # OPT
)


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm before a causal LM's unembedding, or ``None`` when it has none we know."""
    for path in _FINAL_NORMS:
        module = get_module(model, path)
        if module is not None:
            return module
    return None


def norm_linear_part(norm: nn.Module | None, directions: Tensor) -> Tensor:
    """Apply the linear part of ``norm`` to ``[n, d]`` directions (centring and scale)."""
    if norm is None:
        return directions
    if isinstance(norm, nn.LayerNorm):
        directions = directions - directions.mean(-1, keepdim=True)
    weight = getattr(norm, "weight", None)
    if weight is None:
        return directions
    weight = weight.float()
    # Gemma's RMSNorm scales by (1 + weight).
    if "Gemma" in type(norm).__name__:
        weight = 1.0 + weight
    return directions * weight


def unembedding(model: nn.Module) -> Tensor | None:
    """``[vocab, d_model]`` unembedding of a causal LM, or ``None`` (no LM head)."""
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    weight = getattr(head, "weight", None)
    return None if weight is None or weight.ndim != 2 else weight


@torch.no_grad()
def logit_lens(
    model: nn.Module, decoder: Tensor, top: int, chunk: int = 512
) -> dict[str, Tensor] | None:
    """Top and bottom ``top`` tokens of each decoder direction's logits.

    Args:
        model: The backbone's transformers model.
        decoder: ``[F, d_model]`` decoder directions (``W_dec``).
        top: Tokens per table.
        chunk: Latents per matmul (memory holds ``chunk * vocab`` logits).

    Returns:
        ``logit_top_ids``/``_values`` and ``logit_bottom_ids``/``_values`` (``[F, top]``,
        bottom ascending), or ``None`` when the model has no LM head or the directions do
        not live in its residual stream.
    """
    w_u = unembedding(model)
    if top == 0 or w_u is None or w_u.shape[1] != decoder.shape[1]:
        return None
    norm = final_norm(model)
    w_u = w_u.float()
    top = min(top, w_u.shape[0])
    parts: dict[str, list[Tensor]] = {k: [] for k in ("ti", "tv", "bi", "bv")}
    for directions in decoder.float().split(chunk):
        logits = norm_linear_part(norm, directions.to(w_u.device)) @ w_u.T
        high = logits.topk(top, dim=-1)
        low = logits.topk(top, dim=-1, largest=False)
        parts["ti"].append(high.indices.cpu())
        parts["tv"].append(high.values.cpu())
        parts["bi"].append(low.indices.cpu())
        parts["bv"].append(low.values.cpu())
    return {
        "logit_top_ids": torch.cat(parts["ti"]).long(),
        "logit_top_values": torch.cat(parts["tv"]).float(),
        "logit_bottom_ids": torch.cat(parts["bi"]).long(),
        "logit_bottom_values": torch.cat(parts["bv"]).float(),
    }
