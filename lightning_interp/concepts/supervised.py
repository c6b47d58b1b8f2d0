"""Supervised concept bottleneck models (Koh et al., ICML 2020) over frozen embeddings.

``x -> concept predictor -> c_hat -> label predictor -> y``. Three ways to train:
independent (each part on true targets: the label predictor reads the true concepts),
sequential (the concept predictor first, then the label predictor on its frozen
predictions) and joint (both together). The bottleneck is soft (probabilities) or hard
(0/1, with a straight-through gradient in joint training). Test-time interventions replace
chosen predicted concepts by their true values.

The joint loss is Koh et al.'s ``L_Y + lambda * sum_j L_Cj``: one binary cross-entropy per
concept (each a mean over the batch), *summed* over concepts (reference code
``yewsiang/ConceptBottleneck``, ``CUB/train.py``: ``attr_loss_weight`` times each
attribute's loss, added to the task loss). ``concept_weight`` is that ``lambda``; a weight
``w`` of a mean over concepts equals ``lambda = w / n_concepts``. The concept stage of the
independent and sequential modes minimises the mean over concepts, as the reference's
concept-only model (``sum(losses) / n_attributes``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_interp.concepts.base import ConceptHead, HeadOutput
from lightning_interp.concepts.config import HeadConfig
from lightning_interp.concepts.registry import register_head
from lightning_interp.errors import ConfigError, ShapeMismatchError

Training = Literal["independent", "sequential", "joint"]


@dataclass
class SupervisedCBMConfig(HeadConfig):
    """Options of :class:`SupervisedCBM` (described there)."""

    training: Training = "joint"
    bottleneck: Literal["soft", "hard"] = "soft"
    concept_hidden: int = 0
    label_hidden: int = 0
    concept_weight: float = 1.0
    concept_epochs: int = 1


def check_concept_labels(head: ConceptHead, concepts: Tensor, rows: int) -> None:
    """Raise :class:`ShapeMismatchError` unless ``concepts`` is ``[rows, head.num_concepts]``."""
    if concepts.shape != (rows, head.num_concepts):
        raise ShapeMismatchError(
            f"concept labels must be [{rows}, {head.num_concepts}] (one column per "
            f"concept of {head.concept_names[:3]}...), got {tuple(concepts.shape)}"
        )


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Module:
    if hidden <= 0:
        return nn.Linear(d_in, d_out)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


@register_head("supervised_cbm")
class SupervisedCBM(ConceptHead):
    """A concept bottleneck model trained with concept annotations.

    Args:
        d_in: Embedding width.
        concept_names: Names of the annotated binary concepts.
        class_names: Class names.
        config: The options below as a :class:`SupervisedCBMConfig` (or give them as
            keywords).
        training: ``"independent"``, ``"sequential"`` or ``"joint"``.
        bottleneck: ``"soft"`` (probabilities) or ``"hard"`` (thresholded at 0.5).
        concept_hidden: Hidden width of the concept predictor (0: linear).
        label_hidden: Hidden width of the label predictor (0: linear, interpretable).
        concept_weight: Koh et al.'s ``lambda`` in joint training: the weight of the *sum*
            over concepts of the per-concept losses (the reference's ``attr_loss_weight``;
            the paper's CUB joint models use 0.01).
        concept_epochs: Sequential training: epochs of the concept stage before the
            label predictor is trained on frozen predictions.

    Example:
        >>> head = SupervisedCBM(8, ["wings", "beak"], ["bird", "plane"])
        >>> head(torch.randn(3, 8)).logits.shape
        torch.Size([3, 2])
    """

    config_class = SupervisedCBMConfig
    config: SupervisedCBMConfig
    learns_concepts = True

    def build_layers(self) -> None:
        """The concept predictor and the label predictor (MLPs with a hidden width > 0)."""
        self.concept_predictor = _mlp(self.d_in, self.config.concept_hidden, self.num_concepts)
        self.label_predictor = _mlp(self.num_concepts, self.config.label_hidden, self.num_classes)

    @property
    def final(self) -> nn.Linear | None:
        """The label predictor when it is linear."""
        return self.label_predictor if isinstance(self.label_predictor, nn.Linear) else None

    def bottleneck(self, concept_logits: Tensor) -> Tensor:
        """Concept values the label predictor reads (soft, or hard with straight-through)."""
        probs = torch.sigmoid(concept_logits)
        if self.config.bottleneck == "soft":
            return probs
        hard = (probs > 0.5).to(probs.dtype)
        return hard + probs - probs.detach()  # value: hard; gradient: that of probs

    def _check_concepts(self, concepts: Tensor, rows: int) -> None:
        check_concept_labels(self, concepts, rows)

    def predict_concepts(self, x: Tensor) -> Tensor:
        """Concept logits ``[b, concepts]``: what :meth:`_classify` reads."""
        self.check_input(x)
        return self.concept_predictor(x)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        *,
        true_concepts: Tensor | None = None,
        intervene: Tensor | None = None,
    ) -> HeadOutput:
        """Predict concepts, optionally set some to their true values, then classes.

        Args:
            x: Embeddings ``[b, d_in]``.
            mask: Unused (token mask of sequence heads).
            true_concepts: Ground-truth concepts ``[b, concepts]`` in {0, 1}.
            intervene: Boolean ``[b, concepts]`` or ``[concepts]``: where to use the truth.
        """
        return self._classify(self.predict_concepts(x), true_concepts, intervene)

    def _classify(
        self, concept_logits: Tensor, true_concepts: Tensor | None, intervene: Tensor | None
    ) -> HeadOutput:
        """The label predictor over the bottleneck of ``concept_logits``, after interventions."""
        values = self.bottleneck(concept_logits)
        if intervene is not None:
            if true_concepts is None:
                raise ConfigError("interventions need true_concepts")
            self._check_concepts(true_concepts, concept_logits.shape[0])
            where = intervene.to(torch.bool).expand_as(values)
            values = torch.where(where, true_concepts.to(values.dtype), values)
        return HeadOutput(self.label_predictor(values), values, concept_logits)

    def training_loss(
        self, x: Tensor, y: Tensor, concepts: Tensor | None, *, epoch: int, mask: Tensor | None
    ) -> dict[str, Tensor]:
        """Concept BCE and task CE, combined as the training mode prescribes.

        ``concept_loss`` is ``sum_j L_Cj`` (per-concept mean BCE, summed over concepts).
        """
        if concepts is None:
            raise ConfigError(
                "a supervised CBM needs concept labels in each batch; use a data module that "
                "yields (embeddings, labels, concepts), or a post-hoc / label-free head"
            )
        self.check_input(x)
        self._check_concepts(concepts, x.shape[0])
        concept_logits = self.concept_predictor(x)
        per_concept = F.binary_cross_entropy_with_logits(
            concept_logits.float(), concepts.float(), reduction="none"
        ).mean(0)
        concept_loss = per_concept.sum()  # Koh et al.'s sum_j L_Cj
        # The concept stage of independent / sequential training: the mean over concepts.
        concept_stage = concept_loss / self.num_concepts
        mode = self.config.training
        if mode == "independent":
            task_input = concepts.to(concept_logits.dtype)
        elif mode == "sequential":
            if epoch < self.config.concept_epochs:
                return {"loss": concept_stage, "concept_loss": concept_loss.detach()}
            # Stage two: only the label predictor learns, from frozen predictions.
            task_input = self.bottleneck(concept_logits).detach()
            concept_stage = concept_stage.detach()
        else:
            task_input = self.bottleneck(concept_logits)
        task_loss = F.cross_entropy(self.label_predictor(task_input).float(), y)
        if mode == "joint":
            loss = task_loss + self.config.concept_weight * concept_loss
        else:
            loss = task_loss + concept_stage
        return {"loss": loss, "task_loss": task_loss, "concept_loss": concept_loss.detach()}


def intervention_order(
    concept_probs: Tensor, policy: str = "uncertainty", generator: torch.Generator | None = None
) -> Tensor:
    """Per example, the order in which to intervene on concepts ``[b, concepts]``.

    ``"uncertainty"`` takes the concepts whose predicted probability is closest to 0.5
    first; ``"random"`` a random order per example.
    """
    if policy == "uncertainty":
        return (concept_probs - 0.5).abs().argsort(dim=-1)
    if policy == "random":
        noise = torch.rand(concept_probs.shape, generator=generator)
        return noise.argsort(dim=-1).to(concept_probs.device)
    raise ConfigError(f"intervention policy must be 'uncertainty' or 'random', got {policy!r}")


@torch.no_grad()
def intervention_logits(
    head: ConceptHead,
    x: Tensor,
    true_concepts: Tensor,
    policy: str = "uncertainty",
    steps: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Class logits after intervening on the first ``k`` concepts of each example's order.

    ``head`` is a :class:`SupervisedCBM` or any head with the same interface
    (``predict_concepts``, ``_classify``, ``forward(..., true_concepts=, intervene=)``),
    such as the concept embedding model.

    Returns:
        ``[len(steps), b, classes]``; ``steps`` defaults to ``0, 1, ..., concepts``.
    """
    predicted = head.predict_concepts(x)
    out = head._classify(predicted, None, None)
    order = intervention_order(torch.sigmoid(out.concept_logits), policy, generator)
    steps = list(range(head.num_concepts + 1)) if steps is None else list(steps)
    ranks = order.argsort(dim=-1)  # rank of each concept in the example's order
    results = []
    # The concept predictor runs once; each step only swaps in true values and relabels.
    for k in steps:
        chosen = ranks < k
        results.append(head._classify(predicted, true_concepts, chosen).logits)
    return torch.stack(results)
