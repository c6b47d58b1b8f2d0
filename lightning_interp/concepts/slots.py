"""Concept-slot attention head: learned concept slots cross-attend to tokens.

Learned concept slots are queries; the backbone's patch or token embeddings are keys and
values. Each slot's attended vector gives that concept's score (a sigmoid, trained with
concept labels when the batches carry them), and a linear layer turns concept scores into
classes. The attention maps ``[b, concepts, tokens]`` show where in the input each concept
was found.

This is *not* Rigotti et al.'s concept transformer (there tokens query the concepts and the
softmax runs over concepts): that model is
:class:`~lightning_interp.concepts.transformer.ConceptTransformer`. This head was called
"concept transformer" before; heads saved under that name with its config still load here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_interp.concepts.attention import attention, attention_weights
from lightning_interp.concepts.base import ConceptHead, HeadOutput
from lightning_interp.concepts.config import HeadConfig
from lightning_interp.concepts.registry import register_head
from lightning_interp.errors import ConfigError, ShapeMismatchError


@dataclass
class ConceptSlotAttentionConfig(HeadConfig):
    """Options of :class:`ConceptSlotAttention` (described there)."""

    d_attn: int = 64
    heads: int = 1
    concept_weight: float = 1.0
    backend: str = "auto"

    def check(self) -> None:
        """``d_attn`` divisible by ``heads``."""
        if self.d_attn % self.heads:
            raise ConfigError(f"d_attn={self.d_attn} must be divisible by heads={self.heads}")


@register_head("concept_slots")
class ConceptSlotAttention(ConceptHead):
    """Cross-attention from learned concept slots to token embeddings.

    Args:
        d_in: Token embedding width.
        concept_names: Concept names (one slot each).
        class_names: Class names.
        config: The options below as a :class:`ConceptSlotAttentionConfig` (or give them as
            keywords).
        d_attn: Width of queries, keys and values.
        heads: Attention heads (``d_attn`` must divide by it).
        concept_weight: Weight of the concept BCE loss when batches carry concept labels.
        backend: Attention backend (see :func:`~lightning_interp.concepts.attention.attention`).

    Example:
        >>> head = ConceptSlotAttention(8, ["ear", "tail"], ["cat", "dog"], d_attn=4)
        >>> out = head(torch.randn(2, 5, 8))
        >>> out.logits.shape, out.attention.shape
        (torch.Size([2, 2]), torch.Size([2, 2, 5]))
    """

    config_class = ConceptSlotAttentionConfig
    config: ConceptSlotAttentionConfig
    reads_tokens = learns_concepts = True  # token embeddings in; concepts learned

    def build_layers(self) -> None:
        """Concept slots, key/value projections, the concept scorer and the classifier."""
        d_in, d_attn = self.d_in, self.config.d_attn
        self.heads = self.config.heads
        self.slots = nn.Parameter(torch.randn(self.num_concepts, d_attn) / d_attn**0.5)
        self.norm = nn.LayerNorm(d_in)
        self.key = nn.Linear(d_in, d_attn)
        self.value = nn.Linear(d_in, d_attn)
        self.score = nn.Linear(d_attn, 1)
        self.classifier = nn.Linear(self.num_concepts, self.num_classes)

    @property
    def final(self) -> nn.Linear:
        """The concept-to-class layer."""
        return self.classifier

    def _split(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, -1).transpose(1, 2)

    def _qkv(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if tokens.ndim != 3:
            raise ShapeMismatchError(
                f"the concept-slot head reads token embeddings [batch, tokens, {self.d_in}], "
                f"got {tuple(tokens.shape)}; embed with pooling='tokens'"
            )
        self.check_input(tokens)
        h = self.norm(tokens)
        k, v = self._split(self.key(h)), self._split(self.value(h))
        q = self.slots.to(k.dtype).expand(tokens.shape[0], -1, -1)
        return self._split(q), k, v

    def forward(
        self, x: Tensor, mask: Tensor | None = None, *, return_attention: bool = True
    ) -> HeadOutput:
        """Concept scores, class logits and head-averaged attention maps.

        With ``return_attention`` the weights are computed once (the plain formula) and the
        output is ``weights @ v``; without it (training) the fused kernel of ``backend``
        runs and ``HeadOutput.attention`` is ``None``.
        """
        q, k, v = self._qkv(x)
        maps = None
        if return_attention:
            weights = attention_weights(q, k, mask)
            out = (weights @ v.float()).to(v.dtype)
            maps = weights.detach().mean(1)
        else:
            out = attention(q, k, v, mask, backend=self.config.backend)
        out = out.transpose(1, 2).reshape(x.shape[0], self.num_concepts, -1)
        concept_logits = self.score(out).squeeze(-1)
        probs = torch.sigmoid(concept_logits)
        return HeadOutput(self.classifier(probs), probs, concept_logits, maps)

    def training_loss(
        self, x: Tensor, y: Tensor, concepts: Tensor | None, *, epoch: int, mask: Tensor | None
    ) -> dict[str, Tensor]:
        """Cross-entropy, plus concept BCE when concept labels are given."""
        out = self(x, mask, return_attention=False)
        task = F.cross_entropy(out.logits.float(), y)
        if concepts is None:
            return {"loss": task, "task_loss": task}
        concept_loss = F.binary_cross_entropy_with_logits(
            out.concept_logits.float(), concepts.float()
        )
        loss = task + self.config.concept_weight * concept_loss
        return {"loss": loss, "task_loss": task, "concept_loss": concept_loss}
