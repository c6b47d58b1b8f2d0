"""The concept transformer of Rigotti et al. (ICLR 2022), over frozen token embeddings.

"Attention-based Interpretability with Concept Transformers"; reference code
``IBM/concept_transformer`` (``ctc/ctc.py``: ``CrossAttention``, ``ConceptTransformer``,
``concepts_cost``; ``ctc/ctc_model.py``: the loss). This is its non-spatial (global)
concept stream:

1. the tokens are pooled by a learned softmax over tokens (the reference's sequence
   pooling, ``token_attention_pool``; or the first token, the ViT variant's CLS token);
2. the pooled token *queries* learned concept embeddings (keys and values are
   projections of the concepts): the attention is a softmax *over concepts*;
3. the logits are a linear layer of the attention-weighted concept values,
   ``logits = W_o (sum_k a_k v_k) + b``, so they are linear in the attention ``a``;
4. with concept annotations, the explanation loss ``n_concepts * MSE(a, c / sum(c))``
   pulls the attention (averaged over heads) towards the annotated concepts.

The attention ``[b, concepts]`` is the explanation: which concepts the decision used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_interp.concepts.attention import key_bias
from lightning_interp.concepts.base import ConceptHead, HeadOutput
from lightning_interp.concepts.config import HeadConfig
from lightning_interp.concepts.registry import register_head
from lightning_interp.errors import ConfigError, ShapeMismatchError


def explanation_loss(attention: Tensor, concepts: Tensor) -> Tensor:
    """``n_concepts * MSE(attention, concepts / concepts.sum(-1))`` (the reference's cost).

    Rows without a present concept (all zero) or with a missing annotation (NaN) carry no
    target, as NaN rows are skipped in the reference; the loss is 0 when no row has one.

    Args:
        attention: Attention over concepts ``[b, concepts]`` (rows sum to 1).
        concepts: Concept annotations ``[b, concepts]`` (0/1, or non-negative weights).
    """
    totals = concepts.float().sum(-1, keepdim=True)
    usable = (totals.squeeze(-1) > 0) & torch.isfinite(totals.squeeze(-1))
    if not usable.any():
        return attention.float().sum() * 0.0  # keeps the graph, adds nothing
    targets = concepts.float()[usable] / totals[usable]
    return concepts.shape[-1] * F.mse_loss(attention.float()[usable], targets)


def attention_entropy(attention: Tensor) -> Tensor:
    """Mean of ``-a log a``: the reference's sparsity cost on the concept attention."""
    return -(attention.float() * torch.log(attention.float() + 1e-8)).mean()


@dataclass
class ConceptTransformerConfig(HeadConfig):
    """Options of :class:`ConceptTransformer` (described there)."""

    heads: int = 2
    explanation_weight: float = 5.0
    attention_sparsity: float = 0.0
    pooling: Literal["attention", "first"] = "attention"
    attention_dropout: float = 0.1
    projection_dropout: float = 0.1

    def check(self) -> None:
        """Non-negative loss weights."""
        if self.explanation_weight < 0 or self.attention_sparsity < 0:
            raise ConfigError(
                f"explanation_weight and attention_sparsity must be >= 0, got "
                f"{self.explanation_weight}, {self.attention_sparsity}"
            )


@register_head("concept_transformer")
class ConceptTransformer(ConceptHead):
    """Rigotti et al.'s concept transformer (global concepts) over token embeddings.

    Args:
        d_in: Token embedding width (the attention works at this width, as the reference's
            ``embedding_dim``).
        concept_names: Concept names (one learned concept embedding each).
        class_names: Class names.
        config: The options below as a :class:`ConceptTransformerConfig` (or give them as
            keywords).
        heads: Attention heads (``d_in`` must divide by it; reference 2).
        explanation_weight: Weight of the explanation loss when batches carry concept
            annotations (the reference's ``expl_lambda``, 5.0).
        attention_sparsity: Weight of the attention's entropy (reference default 0).
        pooling: ``"attention"`` (learned softmax over tokens, ``ctc.py``) or ``"first"``
            (the first token: CLS of a ViT, as ``vit.py``).
        attention_dropout: Dropout on the concept attention (reference 0.1).
        projection_dropout: Dropout on the output logits (reference 0.1).

    Example:
        >>> head = ConceptTransformer(8, ["ear", "tail", "fur"], ["cat", "dog"], heads=2)
        >>> out = head(torch.randn(4, 5, 8))
        >>> out.logits.shape, out.attention.shape, out.token_attention.shape
        (torch.Size([4, 2]), torch.Size([4, 3]), torch.Size([4, 5]))
        >>> bool(torch.allclose(out.attention.sum(-1), torch.ones(4)))
        True
    """

    config_class = ConceptTransformerConfig
    config: ConceptTransformerConfig
    reads_tokens = learns_concepts = True  # token embeddings in; concepts learned

    def build_layers(self) -> None:
        """Token pooling, concept embeddings, attention projections and the output layer."""
        d_in = self.d_in
        heads = self.config.heads
        if heads <= 0 or d_in % heads:
            raise ConfigError(f"d_in={d_in} must be divisible by heads={heads} (heads >= 1)")
        self.heads = heads
        # The reference normalises the tokens (CTC.norm) before its concept transformer.
        self.norm = nn.LayerNorm(d_in)
        self.token_pool = nn.Linear(d_in, 1)
        self.concept_embeddings = nn.Parameter(torch.empty(self.num_concepts, d_in))
        nn.init.trunc_normal_(self.concept_embeddings, std=1.0 / math.sqrt(d_in))
        self.query = nn.Linear(d_in, d_in, bias=False)
        self.key_value = nn.Linear(d_in, 2 * d_in, bias=False)
        self.output = nn.Linear(d_in, self.num_classes)
        self.attention_dropout = nn.Dropout(self.config.attention_dropout)
        self.projection_dropout = nn.Dropout(self.config.projection_dropout)

    @classmethod
    def upgrade_spec(cls, spec: dict) -> dict:
        """Heads saved as "concept_transformer" before this model were concept-slot heads."""
        if "d_attn" in (spec.get("config") or {}):
            return {**spec, "head_type": "concept_slots"}
        return spec

    def _check_tokens(self, tokens: Tensor) -> None:
        if tokens.ndim != 3:
            raise ShapeMismatchError(
                f"the concept transformer reads token embeddings [batch, tokens, {self.d_in}], "
                f"got {tuple(tokens.shape)}; embed with pooling='tokens'"
            )
        self.check_input(tokens)

    def pool(self, h: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """The pooled token ``[b, d]`` and the pooling weights over tokens ``[b, tokens]``."""
        if self.config.pooling == "first":
            weights = torch.zeros(h.shape[:2], dtype=torch.float32, device=h.device)
            weights[:, 0] = 1.0
        else:
            scores = self.token_pool(h).squeeze(-1).float()
            bias = key_bias(mask, scores.dtype)
            if bias is not None:
                scores = scores + bias[:, 0, 0, :]
            weights = scores.softmax(dim=-1)
        return (weights.unsqueeze(1) @ h.float()).squeeze(1).to(h.dtype), weights

    def _split(self, t: Tensor) -> Tensor:
        """``[..., d] -> [..., heads, d / heads]``."""
        return t.unflatten(-1, (self.heads, -1))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> HeadOutput:
        """Logits, the concept attention ``[b, concepts]`` and the token pooling weights."""
        self._check_tokens(x)
        h = self.norm(x)
        pooled, token_weights = self.pool(h, mask)
        q = self._split(self.query(pooled)).float()  # [b, heads, hd]
        k, v = self.key_value(self.concept_embeddings.to(h.dtype)).chunk(2, dim=-1)
        k, v = self._split(k).transpose(0, 1).float(), self._split(v).transpose(0, 1).float()
        scale = 1.0 / math.sqrt(q.shape[-1])
        scores = torch.einsum("bhd,hkd->bhk", q, k) * scale  # [b, heads, concepts]
        weights = scores.softmax(dim=-1)
        mixed = torch.einsum("bhk,hkd->bhd", self.attention_dropout(weights), v)
        logits = self.projection_dropout(self.output(mixed.flatten(1).to(h.dtype)))
        attention = weights.mean(1)  # averaged over heads, as the reference
        return HeadOutput(logits, attention, attention=attention, token_attention=token_weights)

    def concept_class_weights(self) -> Tensor:
        """``[heads, classes, concepts]``: head ``h``'s logits are this times its attention.

        ``logits = sum_h M_h a_h + b``, with ``a_h`` head ``h``'s attention over concepts;
        with one head, ``M`` is the concept-to-class weight of the decision.
        """
        v = self._split(self.key_value(self.concept_embeddings).chunk(2, dim=-1)[1])
        w = self.output.weight.unflatten(1, (self.heads, -1))  # [classes, heads, hd]
        return torch.einsum("chd,khd->hck", w, v)

    def training_loss(
        self, x: Tensor, y: Tensor, concepts: Tensor | None, *, epoch: int, mask: Tensor | None
    ) -> dict[str, Tensor | None]:
        """Cross-entropy, plus the explanation loss with annotations and the sparsity term."""
        out = self(x, mask)
        task = F.cross_entropy(out.logits.float(), y)
        terms: dict[str, Tensor | None] = {"task_loss": task}
        loss = task
        if concepts is not None:
            if concepts.shape != out.attention.shape:
                raise ShapeMismatchError(
                    f"concept annotations must be [{x.shape[0]}, {self.num_concepts}], got "
                    f"{tuple(concepts.shape)}"
                )
            terms["explanation_loss"] = explanation_loss(out.attention, concepts)
            loss = loss + self.config.explanation_weight * terms["explanation_loss"]
        if self.config.attention_sparsity > 0:
            terms["attention_entropy"] = attention_entropy(out.attention)
            loss = loss + self.config.attention_sparsity * terms["attention_entropy"]
        terms["loss"] = loss
        return terms
