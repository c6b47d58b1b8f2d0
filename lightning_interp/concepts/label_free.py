"""Label-free concept bottleneck models (Oikarinen et al., ICLR 2023).

1. A projection ``W_c`` maps backbone embeddings to one unit per concept, trained so each
   unit's activations over the data match the concept's text-embedding similarities
   (the cos^3 objective: centre each column over the batch, cube, cosine).
2. Concepts whose projected activations match poorly *on the validation rows* (cos^3
   similarity at or below the interpretability cut-off, 0.45) are dropped; the rest are
   standardised with the training rows' mean and standard deviation.
3. A sparse final layer is fitted on all training rows with the elastic-net path solver.

Reference code: ``Trustworthy-ML-Lab/Label-free-CBM``, ``train_cbm.py`` (the cut-off is
computed on ``val_target_features``, the standardisation on the training rows) and
``similarity.py`` (``cos_similarity_cubed_single``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_interp.concepts.bank import ConceptBank
from lightning_interp.concepts.base import ConceptHead, HeadOutput
from lightning_interp.concepts.config import HeadConfig
from lightning_interp.concepts.registry import register_head
from lightning_interp.concepts.solver import fit_sparse_linear
from lightning_interp.errors import ConfigError, EmptyConceptBankError


def cos_cubed(a: Tensor, b: Tensor, power: int = 3, eps: float = 1e-6) -> Tensor:
    """Per column, cosine similarity of centred-then-cubed ``a`` and ``b`` ``[n, k]``.

    Cubing stresses the highly activating rows, the ones a human reads a concept from.
    Each column is also divided by its standard deviation before cubing (for float range
    only: the cosine does not change with a column's scale), so this equals the
    reference's ``cos_similarity_cubed_single``.
    """

    def prep(t: Tensor) -> Tensor:
        t = t.float()
        t = (t - t.mean(0)) / (t.std(0) + eps)
        return torch.nn.functional.normalize(t.pow(power), dim=0, eps=eps)

    return (prep(a) * prep(b)).sum(0)


@dataclass
class LabelFreeCBMConfig(HeadConfig):
    """Options of :class:`LabelFreeCBM` (described there)."""

    cutoff: float = 0.45
    target_density: float = 0.1
    alpha: float = 0.99
    power: int = 3

    def check(self) -> None:
        """``target_density`` in (0, 1]."""
        if not 0.0 < self.target_density <= 1.0:
            raise ConfigError(f"target_density must be in (0, 1], got {self.target_density}")


@register_head("label_free_cbm")
class LabelFreeCBM(ConceptHead):
    """Label-free CBM over a concept bank in the embedding space.

    The concept targets are the cosine similarities of the (same) embeddings to the
    bank's vectors, as with CLIP features and CLIP text embeddings of the phrases.

    Args:
        d_in: Embedding width (that of the bank).
        concept_names: Concept names (bank order).
        class_names: Class names.
        config: The options below as a :class:`LabelFreeCBMConfig` (or give them as
            keywords).
        cutoff: Interpretability cut-off on the validation rows' cos^3 similarity (paper:
            0.45); concepts at or below it are dropped.
        target_density: Share of non-zero final-layer weights the solver aims for.
        alpha: L1 share of the final layer's elastic net (paper: 0.99).
        power: Exponent of the similarity (3: cos^3).

    Example:
        >>> bank = ConceptBank(["a", "b", "c"], torch.randn(3, 8))
        >>> head = LabelFreeCBM.from_bank(bank, ["yes", "no"])
        >>> head(torch.randn(4, 8)).logits.shape
        torch.Size([4, 2])
    """

    full_data_fit = "after"
    full_data_fit_reads_val = True  # the interpretability cut-off
    config_class = LabelFreeCBMConfig
    config: LabelFreeCBMConfig

    def build_layers(self) -> None:
        """Targets, the projection, the cut-off mask, the standardisation and the final layer."""
        d_in = self.d_in
        n = self.num_concepts
        self.register_buffer("concept_targets", torch.zeros(n, d_in))
        self.projection = nn.Linear(d_in, n, bias=False)
        self.register_buffer("active", torch.ones(n, dtype=torch.bool))
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("std", torch.ones(n))
        self.final_layer = nn.Linear(n, self.num_classes)

    @classmethod
    def from_bank(cls, bank: ConceptBank, class_names: Sequence[str], **kwargs) -> LabelFreeCBM:
        """A head whose targets (and initial projection) are ``bank``'s unit vectors."""
        head = cls(bank.width, bank.names, class_names, **kwargs)
        with torch.no_grad():
            head.concept_targets.copy_(bank.normalized())
            head.projection.weight.copy_(bank.normalized())
        return head

    @property
    def final(self) -> nn.Linear:
        """The sparse concept-to-class layer."""
        return self.final_layer

    def concept_targets_of(self, x: Tensor) -> Tensor:
        """Target concept activations: cosine similarity of ``x`` to each concept."""
        unit = torch.nn.functional.normalize(x.float(), dim=-1)
        return unit @ self.concept_targets.float().T

    def concept_activations(self, x: Tensor) -> Tensor:
        """Standardised projected activations, zero for concepts cut off ``[b, concepts]``."""
        self.check_input(x)
        raw = self.projection(x)
        z = (raw - self.mean.to(raw.dtype)) / self.std.to(raw.dtype)
        return z * self.active.to(z.dtype)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> HeadOutput:
        """Logits of the sparse layer over the standardised concept activations."""
        z = self.concept_activations(x)
        return HeadOutput(self.final_layer(z), z)

    def training_loss(
        self, x: Tensor, y: Tensor, concepts: Tensor | None, *, epoch: int, mask: Tensor | None
    ) -> dict[str, Tensor]:
        """Negative mean cos^3 similarity between projected and target activations."""
        self.check_input(x)
        if x.shape[0] < 2:
            raise ConfigError("the cos^3 objective standardises over the batch: batch_size >= 2")
        sims = cos_cubed(self.projection(x), self.concept_targets_of(x), self.config.power)
        return {"loss": -sims.mean(), "similarity": sims.mean().detach()}

    def _projected(self, x: Tensor) -> Tensor:
        return self.projection(x.to(self.projection.weight.dtype)).float()

    @torch.no_grad()
    def interpretability(self, x: Tensor) -> Tensor:
        """Per concept, the cos^3 similarity of projected and target activations on ``x``."""
        self.check_input(x)
        return cos_cubed(self._projected(x), self.concept_targets_of(x), self.config.power)

    @torch.no_grad()
    def fit_full_data(
        self, x: Tensor, y: Tensor, val: tuple[Tensor, Tensor] | None = None
    ) -> dict[str, Any]:
        """Cut off poorly matched concepts, standardise, fit the sparse final layer.

        Args:
            x: All training embeddings (standardisation and the final layer).
            y: Their labels.
            val: Validation embeddings and labels: the interpretability cut-off is measured
                on them, as in the reference. Without them the training rows are used, with
                a warning (the similarity is then optimistic: the projection was fitted
                there) and ``"cutoff_rows": "train"`` in the report.
        """
        self.check_input(x)
        if val is not None and len(val[0]) >= 2:
            sims, rows = self.interpretability(val[0]), "validation"
        else:
            warnings.warn(
                "LabelFreeCBM: no validation rows, so the interpretability cut-off is measured "
                "on the training rows the projection was fitted on (optimistic); give the "
                "Trainer validation data",
                stacklevel=3,  # past torch.no_grad's wrapper: the caller of fit_full_data
            )
            sims, rows = self.interpretability(x), "train"
        active = sims > self.config.cutoff
        if not active.any():
            raise EmptyConceptBankError(
                f"no concept passed the interpretability cut-off {self.config.cutoff} on "
                f"the {rows} rows (best similarity {float(sims.max()):.3f}); lower cutoff or "
                f"train the projection longer"
            )
        raw = self._projected(x)
        mean, std = raw.mean(0), raw.std(0).clamp_min(1e-6)
        z = ((raw - mean) / std)[:, active]
        fit = fit_sparse_linear(
            z,
            y,
            self.num_classes,
            alpha=self.config.alpha,
            target_density=self.config.target_density,
        )
        weight = torch.zeros_like(self.final_layer.weight, dtype=torch.float32)
        weight[:, active] = fit.weight
        self.active.copy_(active)
        self.mean.copy_(mean)
        self.std.copy_(std)
        self.final_layer.weight.copy_(weight)
        self.final_layer.bias.copy_(fit.bias)
        return {
            "active_concepts": float(active.sum()),
            "cutoff_rows": rows,
            "final_density": int((weight != 0).sum()) / weight.numel(),
            "final_lambda": fit.lam,
        }
