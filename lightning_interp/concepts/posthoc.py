"""Post-hoc concept bottleneck models (Yuksekgonul et al., ICLR 2023).

PCBM projects an embedding onto normalised concept vectors (the concept margins) and
classifies the margins with a sparse (elastic-net) linear layer. PCBM-h adds a residual
linear layer on the raw embedding, fitted after the bottleneck with the bottleneck frozen,
to recover the accuracy the concepts miss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_interp.concepts.bank import ConceptBank
from lightning_interp.concepts.base import ConceptHead, HeadOutput, register_head
from lightning_interp.concepts.solver import soft_threshold
from lightning_interp.errors import ConfigError


@register_head("pcbm")
class PosthocCBM(ConceptHead):
    """PCBM and (with ``hybrid=True``) PCBM-h.

    The elastic-net layer is trained by proximal SGD: the smooth L2 part is in the loss
    and, after every optimizer step, weights are soft-thresholded by ``lr * lam * alpha``
    (so pruned weights are exactly zero, as the paper's SGDClassifier intends).

    Args:
        d_in: Embedding width (that of the concept vectors).
        concept_names: Concept names.
        class_names: Class names.
        lam: Elastic-net strength.
        alpha: L1 share of the elastic net.
        hybrid: Add the residual layer (PCBM-h).
        bottleneck_epochs: PCBM-h: epochs that fit the bottleneck before the residual.
        residual_weight_decay: L2 penalty of the residual layer.

    Example:
        >>> bank = ConceptBank(["a", "b", "c"], torch.randn(3, 8))
        >>> head = PosthocCBM.from_bank(bank, ["yes", "no"])
        >>> head(torch.randn(4, 8)).concepts.shape
        torch.Size([4, 3])
    """

    def __init__(
        self,
        d_in: int,
        concept_names: Sequence[str],
        class_names: Sequence[str],
        lam: float = 1e-3,
        alpha: float = 0.99,
        hybrid: bool = False,
        bottleneck_epochs: int = 1,
        residual_weight_decay: float = 1e-3,
    ) -> None:
        super().__init__(d_in, concept_names, class_names)
        if lam < 0 or not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"need lam >= 0 and alpha in [0, 1], got {lam}, {alpha}")
        self.config = dict(
            lam=lam,
            alpha=alpha,
            hybrid=hybrid,
            bottleneck_epochs=bottleneck_epochs,
            residual_weight_decay=residual_weight_decay,
        )
        self.register_buffer("concept_vectors", torch.zeros(self.num_concepts, d_in))
        self.classifier = nn.Linear(self.num_concepts, self.num_classes)
        self.residual = nn.Linear(d_in, self.num_classes) if hybrid else None
        if self.residual is not None:
            nn.init.zeros_(self.residual.weight)
            nn.init.zeros_(self.residual.bias)

    @classmethod
    def from_bank(cls, bank: ConceptBank, class_names: Sequence[str], **kwargs) -> PosthocCBM:
        """A head over ``bank``'s concepts (its vectors are normalised and frozen)."""
        head = cls(bank.width, bank.names, class_names, **kwargs)
        head.concept_vectors.copy_(bank.normalized())
        return head

    @property
    def final(self) -> nn.Linear:
        """The sparse concept-to-class layer."""
        return self.classifier

    def margins(self, x: Tensor) -> Tensor:
        """Projections of ``x`` onto the unit concept vectors ``[b, concepts]``."""
        self.check_input(x)
        return x @ self.concept_vectors.to(x.dtype).T

    def forward(self, x: Tensor, mask: Tensor | None = None) -> HeadOutput:
        """Logits of the bottleneck (plus the residual for PCBM-h)."""
        margins = self.margins(x)
        logits = self.classifier(margins)
        if self.residual is not None:
            logits = logits + self.residual(x)
        return HeadOutput(logits, margins)

    def _residual_stage(self, epoch: int) -> bool:
        return self.residual is not None and epoch >= self.config["bottleneck_epochs"]

    def training_loss(
        self, x: Tensor, y: Tensor, concepts: Tensor | None, *, epoch: int, mask: Tensor | None
    ) -> dict[str, Tensor]:
        """Cross-entropy plus the smooth part of the elastic net (stage-wise for PCBM-h)."""
        margins = self.margins(x)
        self._stage_residual = self._residual_stage(epoch)
        if self._stage_residual:
            logits = self.classifier(margins).detach() + self.residual(x)
            task = F.cross_entropy(logits.float(), y)
            decay = self.residual.weight.float().square().sum()
            return {"loss": task + self.config["residual_weight_decay"] * decay, "task_loss": task}
        task = F.cross_entropy(self.classifier(margins).float(), y)
        # Elastic net alpha*|W|_1 + (1 - alpha)/2*|W|_2^2: the L1 part is applied by the
        # proximal step (after_optimizer_step); only the smooth L2 part is differentiated here.
        weight = self.classifier.weight.float()
        smooth = 0.5 * (1 - self.config["alpha"]) * weight.square().sum()
        return {"loss": task + self.config["lam"] * smooth, "task_loss": task}

    @torch.no_grad()
    def after_optimizer_step(self, lr: float) -> None:
        """Soft-threshold the bottleneck layer (the proximal step of the L1 term)."""
        if getattr(self, "_stage_residual", False):
            return
        threshold = lr * self.config["lam"] * self.config["alpha"]
        weight = self.classifier.weight
        weight.copy_(soft_threshold(weight, threshold))
