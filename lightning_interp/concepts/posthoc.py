"""Post-hoc concept bottleneck models (Yuksekgonul et al., ICLR 2023).

PCBM projects an embedding onto concept boundaries (the concept *margins*,
``(w . x + b) / |w|``, intercept included) and classifies the margins with a sparse
(elastic-net) linear layer. PCBM-h adds a residual linear layer on the raw embedding,
trained with the bottleneck frozen, to recover the accuracy the concepts miss.

Reference code: ``mertyg/post-hoc-cbm``: ``models/pcbm_utils.py`` (margins, the hybrid
layer), ``train_pcbm.py`` (scikit-learn ``SGDClassifier(loss="log_loss",
penalty="elasticnet", alpha=lam, l1_ratio=alpha)`` on the margins) and ``train_pcbm_h.py``
(Adam, ``CE + l2_penalty * mean(W_res ** 2)``, default ``nn.Linear`` initialisation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_interp.concepts.bank import ConceptBank
from lightning_interp.concepts.base import ConceptHead, HeadOutput
from lightning_interp.concepts.config import HeadConfig
from lightning_interp.concepts.registry import register_head
from lightning_interp.concepts.solver import elastic_net_objective, fit_sparse_linear
from lightning_interp.errors import ConfigError


@dataclass
class PosthocCBMConfig(HeadConfig):
    """Options of :class:`PosthocCBM` (described there)."""

    lam: float = 1e-3
    alpha: float = 0.99
    hybrid: bool = False
    residual_penalty: float = 1e-3
    solver_max_iter: int = 3000
    solver_tol: float = 1e-6

    def check(self) -> None:
        """``lam >= 0``, ``alpha`` in (0, 1], ``residual_penalty >= 0``."""
        if not self.lam >= 0 or not 0.0 < self.alpha <= 1.0:
            raise ConfigError(f"need lam >= 0 and alpha in (0, 1], got {self.lam}, {self.alpha}")
        if not self.residual_penalty >= 0:
            raise ConfigError(f"residual_penalty must be >= 0, got {self.residual_penalty}")


@register_head("pcbm")
class PosthocCBM(ConceptHead):
    """PCBM and (with ``hybrid=True``) PCBM-h.

    The elastic-net layer is *solved*, not trained by the optimizer: when training starts,
    :meth:`fit_full_data` minimises, on all training rows,

        ``CE(margins W^T + b, y) + lam * (alpha |W|_1 + (1 - alpha) / 2 |W|_2^2)``

    with the accelerated proximal-gradient solver of
    :func:`~lightning_interp.concepts.solver.fit_sparse_linear` (exact zeros, exact
    all-zero solution where the KKT conditions give it), so the layer reaches the objective
    at ``lam`` whatever optimizer the module has. ``lam`` and ``alpha`` mean what
    scikit-learn's ``SGDClassifier(alpha=lam, l1_ratio=alpha)`` (the reference) and
    ``LogisticRegression(C=1 / (n * lam), l1_ratio=alpha)`` mean. One difference: the
    reference's ``SGDClassifier`` fits one-vs-rest binary logistic regressions; this layer
    is the multinomial (softmax) one, scikit-learn's ``LogisticRegression`` objective.
    The layer is then frozen. PCBM-h's residual layer is what the optimizer trains.

    Args:
        d_in: Embedding width (that of the concept vectors).
        concept_names: Concept names.
        class_names: Class names.
        config: The options below as a :class:`PosthocCBMConfig` (or give them as keywords).
        lam: Elastic-net strength (the reference's ``--lam``, default there 1e-5).
        alpha: L1 share of the elastic net (the reference's ``--alpha``, 0.99).
        hybrid: Add the residual layer (PCBM-h).
        residual_penalty: PCBM-h: weight of ``mean(W_res ** 2)`` (the reference's
            ``--l2-penalty``, 1e-3; a mean over the weights, not a sum).
        solver_max_iter: Proximal steps of the elastic-net solve.
        solver_tol: Relative weight change at which the solve stops.

    Example:
        >>> bank = ConceptBank(["a", "b", "c"], torch.randn(3, 8))
        >>> head = PosthocCBM.from_bank(bank, ["yes", "no"])
        >>> head(torch.randn(4, 8)).concepts.shape
        torch.Size([4, 3])
    """

    full_data_fit = "before"
    config_class = PosthocCBMConfig
    config: PosthocCBMConfig

    def build_layers(self) -> None:
        """Concept boundaries (frozen buffers), the solved layer and PCBM-h's residual."""
        d_in = self.d_in
        self.register_buffer("concept_vectors", torch.zeros(self.num_concepts, d_in))
        self.register_buffer("concept_intercepts", torch.zeros(self.num_concepts))
        self.classifier = nn.Linear(self.num_concepts, self.num_classes)
        # Solved in closed form (fit_full_data), never stepped by the optimizer.
        self.classifier.requires_grad_(False)
        # PCBM-h: nn.Linear's default initialisation, as the reference's residual_classifier.
        self.residual = nn.Linear(d_in, self.num_classes) if self.config.hybrid else None

    @classmethod
    def from_bank(cls, bank: ConceptBank, class_names: Sequence[str], **kwargs) -> PosthocCBM:
        """A head over ``bank``'s concept boundaries (unit normals and intercepts, frozen)."""
        head = cls(bank.width, bank.names, class_names, **kwargs)
        head.concept_vectors.copy_(bank.normalized())
        head.concept_intercepts.copy_(bank.normalized_intercepts())
        return head

    @classmethod
    def upgrade_spec(cls, spec: dict[str, Any]) -> dict[str, Any]:
        """Read configs of heads saved before the layer was solved exactly.

        ``bottleneck_epochs`` (SGD epochs before the residual) has no meaning any more, and
        ``residual_weight_decay`` multiplied a *sum* of squares: on the mean scale of the
        reference it is ``residual_weight_decay * weights``.
        """
        config = dict(spec.get("config") or {})
        config.pop("bottleneck_epochs", None)
        if "residual_weight_decay" in config:
            weights = int(spec.get("d_in", 0)) * len(spec.get("class_names") or ())
            config["residual_penalty"] = float(config.pop("residual_weight_decay")) * weights
        return {**spec, "config": config}

    @classmethod
    def upgrade_state(cls, tensors: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
        """Heads saved before intercepts were kept read text directions: intercepts 0."""
        key = f"{prefix}concept_intercepts"
        vectors = tensors.get(f"{prefix}concept_vectors")
        if key not in tensors and vectors is not None:
            tensors = {**tensors, key: torch.zeros(vectors.shape[0], dtype=vectors.dtype)}
        return tensors

    @property
    def final(self) -> nn.Linear:
        """The sparse concept-to-class layer."""
        return self.classifier

    def margins(self, x: Tensor) -> Tensor:
        """Signed distances of ``x`` to the concept boundaries ``[b, concepts]``."""
        self.check_input(x)
        return x @ self.concept_vectors.to(x.dtype).T + self.concept_intercepts.to(x.dtype)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> HeadOutput:
        """Logits of the bottleneck (plus the residual for PCBM-h)."""
        margins = self.margins(x)
        logits = self.classifier(margins)
        if self.residual is not None:
            logits = logits + self.residual(x)
        return HeadOutput(logits, margins)

    @torch.no_grad()
    def fit_full_data(
        self, x: Tensor, y: Tensor, val: tuple[Tensor, Tensor] | None = None
    ) -> dict[str, Any]:
        """Solve the elastic-net layer on all training rows (``val`` is not used)."""
        margins = self.margins(x.to(self.concept_vectors.dtype)).float()
        lam, alpha = self.config.lam, self.config.alpha
        fit = fit_sparse_linear(
            margins,
            y,
            self.num_classes,
            lam=lam,
            alpha=alpha,
            target_density=None,
            max_iter=self.config.solver_max_iter,
            tol=self.config.solver_tol,
        )
        self.classifier.weight.copy_(fit.weight)
        self.classifier.bias.copy_(fit.bias)
        return {
            "final_density": fit.density,
            "final_lambda": lam,
            "objective": elastic_net_objective(margins, y, fit.weight, fit.bias, lam, alpha),
        }

    def training_loss(
        self, x: Tensor, y: Tensor, concepts: Tensor | None, *, epoch: int, mask: Tensor | None
    ) -> dict[str, Tensor | None]:
        """PCBM-h: CE of bottleneck + residual logits, plus ``residual_penalty * mean(W^2)``.

        Plain PCBM has nothing left to train once its layer is solved: the loss is ``None``
        (Lightning skips the step) and the elastic-net objective of the batch is logged.
        """
        margins = self.margins(x)
        bottleneck = self.classifier(margins).detach()
        if self.residual is None:
            weight = self.classifier.weight.float()
            task = F.cross_entropy(bottleneck.float(), y)
            alpha = self.config.alpha
            penalty = alpha * weight.abs().sum() + 0.5 * (1 - alpha) * weight.square().sum()
            objective = task + self.config.lam * penalty
            return {"loss": None, "task_loss": task, "objective": objective}
        task = F.cross_entropy((bottleneck + self.residual(x)).float(), y)
        penalty = self.residual.weight.float().square().mean()
        loss = task + self.config.residual_penalty * penalty
        return {"loss": loss, "task_loss": task, "residual_penalty": penalty.detach()}
