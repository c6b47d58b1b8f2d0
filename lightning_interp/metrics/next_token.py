r"""Next-token metrics of a spliced model: CE loss recovered and KL divergence (and its score).

Both are torchmetrics ``Metric`` s over logits the caller already has; they know nothing about
backbones or dictionaries (:mod:`lightning_interp.metrics.downstream` runs the forwards and
decides which tokens count). The scores are the ones SAELens reports (``sae_lens/evals.py``,
``get_downstream_reconstruction_metrics``, version 6.54.12):

.. math::
    \text{ce\_loss\_score} = \frac{\mathrm{CE}_{\text{zero}} - \mathrm{CE}_{\text{spliced}}}
        {\mathrm{CE}_{\text{zero}} - \mathrm{CE}_{\text{clean}}}, \qquad
    \text{kl\_div\_score} = \frac{\mathrm{KL}_{\text{zero}} - \mathrm{KL}_{\text{spliced}}}
        {\mathrm{KL}_{\text{zero}}}

with every CE and KL the mean over all tokens seen, pooled over batches (SAELens
concatenates the per-token values of every batch and takes one mean), never a mean of
per-batch ratios. Per-token values are computed in float32 and summed in float64.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from lightning_interp.errors import ShapeMismatchError

__all__ = ["CrossEntropyLossRecovered", "SplicedKLDivergence"]


def _flatten(logits: Tensor, mask: Tensor | None, *others: Tensor) -> tuple[Tensor, ...]:
    """``[..., V]`` logits and ``[...]`` companions to ``[N, V]`` / ``[N]`` kept rows."""
    flat = [logits.detach().reshape(-1, logits.shape[-1])]
    flat += [t.detach().reshape(-1, *t.shape[logits.ndim - 1 :]) for t in others]
    if mask is not None:
        keep = mask.reshape(-1).bool().to(logits.device)
        flat = [t[keep] for t in flat]
    return tuple(flat)


def _added(state: Tensor, values: Tensor) -> Tensor:
    """``state + values.sum()`` in float64 on the state's device.

    The logits may live on another device than the metric (a CUDA model, a metric left
    on the CPU): the per-batch sum moves, the state stays where it is.
    """
    return state + values.double().sum().to(state.device)


class CrossEntropyLossRecovered(Metric):
    r"""Share of the next-token loss a spliced reconstruction recovers (SAELens's score).

    .. math:: \frac{\mathrm{CE}_{\text{zero}} - \mathrm{CE}_{\text{spliced}}}
              {\mathrm{CE}_{\text{zero}} - \mathrm{CE}_{\text{clean}}}

    SAELens's ``ce_loss_score`` (``sae_lens/evals.py`` 6.54.12). Each CE is the mean over
    every predicted token seen, pooled over batches (not a mean of per-batch ratios).
    1 means the reconstruction is as good as the activation, 0 as bad as zeroing it.
    Per-token losses are summed in float64.

    Example:
        >>> import torch
        >>> metric = CrossEntropyLossRecovered()
        >>> logits, targets = torch.randn(10, 5), torch.randint(0, 5, (10,))
        >>> metric.update(logits, logits, torch.zeros(10, 5), targets)
        >>> float(metric.compute())
        1.0
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("ce_clean_sum", "ce_spliced_sum", "ce_zero_ablation_sum", "count"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        clean_logits: Tensor,
        spliced_logits: Tensor,
        zero_ablation_logits: Tensor,
        targets: Tensor,
        mask: Tensor | None = None,
    ) -> None:
        """Add the tokens of one batch.

        Args:
            clean_logits: ``[..., V]`` logits of the unmodified model.
            spliced_logits: ``[..., V]`` logits with the reconstruction spliced in.
            zero_ablation_logits: ``[..., V]`` logits with the site zeroed.
            targets: ``[...]`` the token each position predicts (already shifted).
            mask: ``[...]`` bool, which positions count (default: all).
        """
        if not clean_logits.shape == spliced_logits.shape == zero_ablation_logits.shape:
            raise ShapeMismatchError(
                "clean, spliced and zero-ablation logits differ in shape; pass the three "
                "runs' logits over the same tokens"
            )
        if targets.shape != clean_logits.shape[:-1]:
            raise ShapeMismatchError(
                f"targets {tuple(targets.shape)} must match logits {tuple(clean_logits.shape)} "
                f"without their last (vocabulary) dimension"
            )
        clean, targets_flat = _flatten(clean_logits, mask, targets.to(clean_logits.device))
        spliced, zero = _flatten(spliced_logits, mask)[0], _flatten(zero_ablation_logits, mask)[0]
        for state, logits in (
            ("ce_clean_sum", clean),
            ("ce_spliced_sum", spliced),
            ("ce_zero_ablation_sum", zero),
        ):
            loss = F.cross_entropy(logits.float(), targets_flat, reduction="none")
            setattr(self, state, _added(getattr(self, state), loss))
        self.count += targets_flat.numel()

    def compute_all(self) -> dict[str, Tensor]:
        """Mean CEs (nats per token), the recovered share and the added loss (float32).

        Returns:
            ``ce_clean``, ``ce_spliced``, ``ce_zero_ablation``, ``ce_loss_recovered`` and
            ``delta_lm_loss`` (``ce_spliced - ce_clean``); NaN before any token. SAELens
            names them ``ce_loss_without_sae``, ``ce_loss_with_sae``,
            ``ce_loss_with_ablation`` and ``ce_loss_score``. Under DDP the sums are reduced
            across ranks first, as :meth:`compute` does.
        """
        # compute() arrives here already synced; a direct call syncs itself.
        with self.sync_context(should_sync=not self._is_synced):
            count = self.count
            clean = self.ce_clean_sum / count
            spliced = self.ce_spliced_sum / count
            zero = self.ce_zero_ablation_sum / count
        values = {
            "ce_clean": clean,
            "ce_spliced": spliced,
            "ce_zero_ablation": zero,
            "ce_loss_recovered": (zero - spliced) / (zero - clean),
            "delta_lm_loss": spliced - clean,
        }
        return {name: value.float() for name, value in values.items()}

    def compute(self) -> Tensor:
        """CE loss recovered over every token seen since the last reset."""
        return self.compute_all()["ce_loss_recovered"]


def _kl(clean_logits: Tensor, other_logits: Tensor) -> Tensor:
    """Per-row ``KL(softmax(clean) || softmax(other))`` in float32, ``[N, V] -> [N]``."""
    clean = clean_logits.float().log_softmax(-1)
    other = other_logits.float().log_softmax(-1)
    return F.kl_div(other, clean, log_target=True, reduction="none").sum(-1)


class SplicedKLDivergence(Metric):
    r"""Mean over tokens of :math:`\mathrm{KL}(p_{\text{clean}} \| p_{\text{spliced}})`.

    Unlike CE loss recovered it needs no targets, and it is 0 only when the spliced model
    predicts exactly what the clean one does. Given the zero-ablated logits too, it also
    keeps :math:`\mathrm{KL}(p_{\text{clean}} \| p_{\text{zero}})` and reports SAELens's
    ``kl_div_score`` (``sae_lens/evals.py`` 6.54.12), ``(KL_zero - KL_spliced) / KL_zero``:
    1 for a perfect reconstruction, 0 for one as bad as zeroing the site. Sums are float64.

    Example:
        >>> import torch
        >>> metric = SplicedKLDivergence()
        >>> logits = torch.randn(10, 5)
        >>> float(metric(logits, logits))
        0.0
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("kl_sum", "count", "kl_zero_ablation_sum", "zero_ablation_count"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        clean_logits: Tensor,
        spliced_logits: Tensor,
        mask: Tensor | None = None,
        zero_ablation_logits: Tensor | None = None,
    ) -> None:
        """Add the tokens of one batch.

        Args:
            clean_logits: ``[..., V]`` logits of the unmodified model.
            spliced_logits: ``[..., V]`` logits with the reconstruction spliced in.
            mask: ``[...]`` bool, which positions count (default: all).
            zero_ablation_logits: ``[..., V]`` logits with the site zeroed, for the score.
        """
        if clean_logits.shape != spliced_logits.shape or (
            zero_ablation_logits is not None and zero_ablation_logits.shape != clean_logits.shape
        ):
            raise ShapeMismatchError(
                "clean, spliced (and zero-ablation) logits differ in shape; pass each run's "
                "logits over the same tokens"
            )
        clean = _flatten(clean_logits, mask)[0]
        kl = _kl(clean, _flatten(spliced_logits, mask)[0])
        self.kl_sum = _added(self.kl_sum, kl)
        self.count += kl.numel()
        if zero_ablation_logits is not None:
            zero_kl = _kl(clean, _flatten(zero_ablation_logits, mask)[0])
            self.kl_zero_ablation_sum = _added(self.kl_zero_ablation_sum, zero_kl)
            self.zero_ablation_count += zero_kl.numel()

    def compute_all(self) -> dict[str, Tensor]:
        """Mean KLs (nats per token) and the score (float32).

        Returns:
            ``kl_divergence`` (spliced), ``kl_zero_ablation`` and ``kl_div_score``
            (SAELens's ``kl_div_with_sae``, ``kl_div_with_ablation``, ``kl_div_score``).
            The last two are NaN unless every batch came with its zero-ablated logits,
            and all are NaN before any token.
        """
        with self.sync_context(should_sync=not self._is_synced):
            spliced = self.kl_sum / self.count
            zero = self.kl_zero_ablation_sum / self.zero_ablation_count
            if self.zero_ablation_count != self.count:
                zero = torch.full_like(zero, float("nan"))
        values = {
            "kl_divergence": spliced,
            "kl_zero_ablation": zero,
            "kl_div_score": (zero - spliced) / zero,
        }
        return {name: value.float() for name, value in values.items()}

    def compute(self) -> Tensor:
        """Mean KL (nats per token) since the last reset (float32; NaN before any token)."""
        return self.compute_all()["kl_divergence"]
