"""Concept Embedding Models (Espinosa Zarlenga et al., NeurIPS 2022) over frozen embeddings.

Per concept ``j`` a context generator maps the input to a positive and a negative embedding
``c_j^+, c_j^-`` (``embedding_size`` each); a scoring function shared by all concepts reads
``[c_j^+, c_j^-]`` and gives the concept probability ``p_j``; the bottleneck is the mixture
``c_hat_j = p_j c_j^+ + (1 - p_j) c_j^-`` and the label predictor reads all ``c_hat_j``
concatenated. Because the embeddings carry more than ``p_j``, a CEM keeps task accuracy
when the annotated concepts do not capture everything the label depends on (the paper's
incomplete-concept setting), while an intervention still acts: setting ``p_j`` to the true
concept picks ``c_j^+`` or ``c_j^-``.

Training is the reference's: ``CE(y) + concept_weight * BCE(p, c)`` (the BCE a mean over
the batch and the concepts), with RandInt: with probability ``intervention_prob`` (0.25)
each concept's ``p_j`` is replaced by its true value during training, so the label
predictor learns to use interventions. Test-time interventions take the supervised CBM's
interface: ``head(x, true_concepts=c, intervene=mask)``, and
:func:`~lightning_interp.concepts.intervention_logits` /
:func:`~lightning_interp.concepts.intervention_order` work on this head too.

Reference code: ``mateoespinosa/cem``, ``cem/models/cem.py`` (``ConceptEmbeddingModel``:
``concept_context_generators`` Linear + LeakyReLU, the shared ``concept_prob_generators``,
``_after_interventions``, the mixture in ``_forward``) and ``cem/models/cbm.py``
(``_run_step``: the loss). Deviations: the ``n`` context generators are one linear layer of
width ``n * 2 * embedding_size`` (the same function, one matmul); a hidden label predictor
uses ReLU (the reference's ``c2y_layers`` use LeakyReLU); RandInt draws one mask per batch,
shared by its rows, as the reference's ``torch.bernoulli(ones * p)`` tiled over the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_interp.concepts.base import ConceptHead, HeadOutput
from lightning_interp.concepts.config import HeadConfig
from lightning_interp.concepts.registry import register_head
from lightning_interp.concepts.supervised import SupervisedCBM, _mlp, check_concept_labels
from lightning_interp.errors import ConfigError

_ACTIVATIONS = {
    "leakyrelu": nn.LeakyReLU,
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "none": nn.Identity,
}


@dataclass
class CEMConfig(HeadConfig):
    """Options of :class:`ConceptEmbeddingModel` (described there)."""

    embedding_size: int = 16
    intervention_prob: float = 0.25
    concept_weight: float = 1.0
    embedding_activation: Literal["leakyrelu", "relu", "sigmoid", "none"] = "leakyrelu"
    shared_scorer: bool = True
    label_hidden: int = 0

    def check(self) -> None:
        """``embedding_size >= 1``, ``intervention_prob`` in [0, 1], ``concept_weight >= 0``."""
        if self.embedding_size < 1:
            raise ConfigError(f"embedding_size must be >= 1, got {self.embedding_size}")
        if not 0.0 <= self.intervention_prob <= 1.0:
            raise ConfigError(
                f"intervention_prob (RandInt) must be in [0, 1], got {self.intervention_prob}"
            )
        if not self.concept_weight >= 0:
            raise ConfigError(f"concept_weight must be >= 0, got {self.concept_weight}")


@register_head("cem")
class ConceptEmbeddingModel(ConceptHead):
    """A concept embedding model trained with concept annotations and RandInt.

    Args:
        d_in: Embedding width.
        concept_names: Names of the annotated binary concepts.
        class_names: Class names.
        config: The options below as a :class:`CEMConfig` (or give them as keywords).
        embedding_size: Width ``m`` of each positive and negative concept embedding (the
            reference's ``emb_size``, 16).
        intervention_prob: RandInt's probability of replacing a concept's predicted
            probability by its true value during training (0.25; 0 turns RandInt off).
        concept_weight: Weight of the concept BCE (the reference's ``concept_loss_weight``).
        embedding_activation: Non-linearity of the context generators (``leakyrelu`` as
            the reference's default, ``relu``, ``sigmoid`` or ``none``).
        shared_scorer: One scoring function for all concepts (the reference's
            ``shared_prob_gen=True``) or one per concept.
        label_hidden: Hidden width of the label predictor (0: linear, the reference's
            default ``c2y_layers=None``).

    Example:
        >>> head = ConceptEmbeddingModel(8, ["wings", "beak"], ["bird", "plane"])
        >>> out = head(torch.randn(3, 8))
        >>> out.logits.shape, out.concepts.shape
        (torch.Size([3, 2]), torch.Size([3, 2]))
    """

    config_class = CEMConfig
    config: CEMConfig
    learns_concepts = True

    def build_layers(self) -> None:
        """Context generators (one linear layer), the scoring function, the label predictor."""
        n, m = self.num_concepts, self.config.embedding_size
        self.context = nn.Sequential(
            nn.Linear(self.d_in, n * 2 * m), _ACTIVATIONS[self.config.embedding_activation]()
        )
        scorers = 1 if self.config.shared_scorer else n
        # nn.Linear(2m, 1)'s initialisation, one row per scorer.
        bound = 1 / math.sqrt(2 * m)
        self.scorer_weight = nn.Parameter(torch.empty(scorers, 2 * m).uniform_(-bound, bound))
        self.scorer_bias = nn.Parameter(torch.empty(scorers).uniform_(-bound, bound))
        self.label_predictor = _mlp(n * m, self.config.label_hidden, self.num_classes)

    def predict_concepts(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Concept logits ``[b, n]`` and contexts ``[b, n, 2m]`` (positive half first)."""
        self.check_input(x)
        n, m = self.num_concepts, self.config.embedding_size
        contexts = self.context(x).view(x.shape[0], n, 2 * m)
        weight = self.scorer_weight.to(contexts.dtype)
        logits = (contexts * weight).sum(-1) + self.scorer_bias.to(contexts.dtype)
        return logits, contexts

    # The supervised CBM's forward (interventions included) over this head's
    # predict_concepts and _classify.
    forward = SupervisedCBM.forward

    def _classify(
        self,
        predicted: tuple[Tensor, Tensor],
        true_concepts: Tensor | None,
        intervene: Tensor | None,
    ) -> HeadOutput:
        """The label predictor over the mixed embeddings, after interventions."""
        concept_logits, contexts = predicted
        probs = torch.sigmoid(concept_logits)
        if intervene is not None:
            if true_concepts is None:
                raise ConfigError("interventions need true_concepts")
            check_concept_labels(self, true_concepts, concept_logits.shape[0])
            where = intervene.to(torch.bool).expand_as(probs)
            probs = torch.where(where, true_concepts.to(probs.dtype), probs)
        m = self.config.embedding_size
        p = probs.unsqueeze(-1)
        mixed = p * contexts[..., :m] + (1 - p) * contexts[..., m:]  # c_hat = p c+ + (1 - p) c-
        logits = self.label_predictor(mixed.flatten(1))
        return HeadOutput(logits, probs, concept_logits)

    def training_loss(
        self, x: Tensor, y: Tensor, concepts: Tensor | None, *, epoch: int, mask: Tensor | None
    ) -> dict[str, Tensor]:
        """``CE + concept_weight * BCE``, with RandInt interventions on the true concepts."""
        if concepts is None:
            raise ConfigError(
                "a concept embedding model needs concept labels in each batch; use a data "
                "module that yields (embeddings, labels, concepts)"
            )
        check_concept_labels(self, concepts, x.shape[0])
        predicted = self.predict_concepts(x)
        intervene = None
        if self.config.intervention_prob > 0:
            # One draw per concept for the whole batch, as the reference's RandInt.
            p = torch.full((self.num_concepts,), self.config.intervention_prob, device=x.device)
            intervene = torch.bernoulli(p).bool()
        out = self._classify(predicted, concepts, intervene)
        task_loss = F.cross_entropy(out.logits.float(), y)
        concept_loss = F.binary_cross_entropy_with_logits(predicted[0].float(), concepts.float())
        loss = task_loss + self.config.concept_weight * concept_loss
        return {"loss": loss, "task_loss": task_loss, "concept_loss": concept_loss.detach()}
