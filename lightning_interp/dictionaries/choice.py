"""Mutual Choice and Feature Choice SAEs, with the aux_zipf loss (Ayonrinde 2024).

Kola Ayonrinde, "Adaptive Sparse Allocation with Mutual Choice & Feature Choice Sparse
Autoencoders", arXiv 2411.02124 (ICLR 2025 submission, OpenReview ``TIjBKgLyPN``). The paper
frames a sparse activation as a matching between the ``N`` tokens of a batch and the ``F``
latents, under a total budget of ``M = k * N`` matches:

- TopK caps each token at ``k`` latents;
- **Feature Choice** caps each latent at ``m`` tokens: every latent chooses its top tokens,
  so tokens get as many latents as chose them (an adaptive ``L0``), and no latent is dead
  while it has a positive pre-activation;
- **Mutual Choice** has no cap but the budget: the ``k * N`` largest entries of the whole
  ``[N, F]`` matrix. This is BatchTopK (Bussmann et al. 2024, found concurrently), and
  :class:`MutualChoiceSAE` reuses :class:`~lightning_interp.dictionaries.BatchTopKSAE`'s
  selection and sparse training path.

Both train with **aux_zipf**, the paper's generalisation of AuxK (Gao et al. 2024) from dead
latents to *underused* ones. The paper observes that SAE feature densities follow a Zipf law
except at the low end; here a latent's underuse is how far its density falls below a Zipf
law fitted to the densities, and the underused latents predict the residual as AuxK's dead
latents do (see :func:`zipf_underuse` and :meth:`MutualChoiceSAE.sparsity_losses`).

No reference code was released (the reviewers note it), and the paper's body was not
available to us beyond its abstract and reviews; what follows is our reading, stated here
so it can be checked against the paper:

- aux_zipf: the law is fitted by least squares in log-density / log-rank on the upper half
  of the live latents; a latent's weight is ``u = clamp(1 - density / zipf_fit, 0, 1)`` (1
  for a dead one); the latents with ``u > 0`` feed AuxK's residual prediction, scaled by
  ``min(sum u / aux_k, 1)`` where AuxK uses ``min(num_dead / aux_k, 1)``. With ``u`` in
  {0, 1} on dead latents it *is* AuxK; at an exact Zipf law it is 0.
- Feature Choice's cap: ``m = ceil(k * N / F)`` and exactly ``k * N`` matches per batch
  (:func:`feature_choice`); ``capacity_exponent > 0`` gives latent ``i`` a Zipf share
  ``(i + 1) ** -capacity_exponent`` of the budget instead, as the reviewers say the paper
  sets the Feature Choice constraints from a Zipf law.
- Inference, one token at a time: as BatchTopK, an EMA of the smallest selected activation
  during training becomes a JumpReLU threshold, one per latent for Feature Choice (its
  latents each fire on their own share of tokens); :meth:`to_inference` exports a
  :class:`~lightning_interp.dictionaries.JumpReLUSAE`, which SAELens reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_interp.dictionaries import cpu_sparse
from lightning_interp.dictionaries.base import Dictionary, DictionaryOutput
from lightning_interp.dictionaries.cpu_topk import kernel_applies, topk_indices
from lightning_interp.dictionaries.registry import register_dictionary
from lightning_interp.dictionaries.sparse_ops import SparsePattern
from lightning_interp.dictionaries.topk import BatchTopKConfig, BatchTopKSAE
from lightning_interp.errors import ConfigError


@dataclass(kw_only=True)
class _ChoiceConfig(BatchTopKConfig):
    """Fields shared by the Mutual and Feature Choice configs.

    Attributes:
        density_momentum: EMA momentum of each latent's firing density (the fraction of
            training rows it is active on), which aux_zipf compares with a Zipf law.
    """

    density_momentum: float = 0.99

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.density_momentum < 1.0:
            raise ConfigError(
                f"density_momentum must be in [0, 1), got {self.density_momentum!r}; 0.99 "
                f"averages the firing densities over about 100 batches"
            )


@dataclass(kw_only=True)
class MutualChoiceConfig(_ChoiceConfig):
    """Config of a Mutual Choice SAE.

    Attributes:
        k: Average active latents per row: the batch holds ``k * N`` matches.
        aux_k: Underused latents per row that predict the residual in aux_zipf;
            ``None`` means ``d_in // 2`` (AuxK's default).
        aux_coefficient: Weight of the aux_zipf loss.
        threshold_momentum: EMA momentum of the inference threshold.
        density_momentum: EMA momentum of the firing densities aux_zipf reads.
    """


@dataclass(kw_only=True)
class FeatureChoiceConfig(_ChoiceConfig):
    """Config of a Feature Choice SAE.

    Attributes:
        k: Target average active latents per row: the batch holds ``k * N`` matches,
            each latent at most ``ceil(k * N / F)`` of them.
        capacity_exponent: 0 shares the budget equally between latents; ``s > 0`` gives
            latent ``i`` a share proportional to ``(i + 1) ** -s`` (a Zipf law; latents are
            exchangeable at initialisation, so assigning shares by index loses nothing).
        aux_k: See :class:`MutualChoiceConfig`.
        aux_coefficient: Weight of the aux_zipf loss.
        threshold_momentum: EMA momentum of the per-latent inference thresholds.
        density_momentum: EMA momentum of the firing densities aux_zipf reads.
    """

    capacity_exponent: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.capacity_exponent < 0:  # validate_fields already refused inf and NaN
            raise ConfigError(
                f"capacity_exponent must be a finite number >= 0, got "
                f"{self.capacity_exponent!r}; use 0 for equal capacities, about 1 for Zipf"
            )


# Densities are float32 (relative precision 6e-8): an underuse below this is rounding in
# the fit, not a latent below the law, and must not put it among aux_zipf's latents.
_ROUNDING = 1e-6


def zipf_underuse(density: Tensor) -> Tensor:
    """How far each latent's firing density falls below a Zipf law fitted to the densities.

    Densities are ranked (largest first, ties by index) and ``log d = a - s log rank`` is
    fitted by least squares over the upper half of the live latents (``d > 0``; the paper
    finds the law holds except at the low end). Returns ``clamp(1 - d / fit, 0, 1)`` per
    latent: 0 on or above the law (or within float32 rounding of it), 1 for a dead latent.

    Args:
        density: Firing densities ``[d_latent]`` (fractions of rows, ``>= 0``).

    Example:
        >>> zipf_underuse(torch.tensor([0.5, 0.0, 0.25]))  # 0.5 / r: an exact Zipf law
        tensor([0., 1., 0.])
    """
    d, order = density.double().sort(descending=True, stable=True)
    live = int((d > 0).sum())
    if live < 2:  # no law to fit: only the dead count, as in AuxK
        return (density <= 0).to(density.dtype)
    log_rank = torch.arange(1, d.numel() + 1, dtype=d.dtype, device=d.device).log()
    # The law is fitted on the upper half of the live latents: the low end is what should
    # fall below it, and fitted too it would tilt the line and flag the most used latents.
    fitted = max(2, (live + 1) // 2)
    x, y = log_rank[:fitted], d[:fitted].log()
    slope = ((x - x.mean()) * (y - y.mean())).sum() / (x - x.mean()).pow(2).sum()
    fit = (y.mean() + slope * (log_rank - x.mean())).exp()
    underuse = (1 - d / fit).clamp(0, 1)
    underuse = underuse.masked_fill(underuse < _ROUNDING, 0.0)
    return torch.empty_like(underuse).scatter_(0, order, underuse).to(density.dtype)


def feature_capacities(k: int, num_rows: int, d_latent: int, exponent: float = 0.0) -> Tensor:
    """Each latent's share of a batch's ``k * num_rows`` matches, ``[d_latent]`` float64.

    Equal shares for ``exponent == 0``, else proportional to ``(i + 1) ** -exponent``;
    never more than ``num_rows`` (a share above it is lost, not passed on).
    """
    weights = torch.arange(1, d_latent + 1, dtype=torch.float64).pow(-exponent)
    return (k * num_rows * weights / weights.sum()).clamp(max=num_rows)


@torch.no_grad()
def feature_choice(pre: Tensor, capacities: Tensor) -> Tensor:
    """The matches each latent chooses, as flat positions ``row * d_latent + latent``.

    Latent ``j`` takes its ``floor(c_j)`` highest ReLU'd pre-activations. The slots the
    floors leave (``round(sum c) - sum floor(c)``) go one each to latents with a
    fractional share, highest next token first; so each latent takes at most ``ceil(c_j)``
    tokens and the batch ``round(sum c)``. With equal shares of ``k * N`` that is ``k * N``
    matches, at most ``ceil(k * N / F)`` per latent; on a single row it is TopK.

    Args:
        pre: Pre-activations ``[N, d_latent]``.
        capacities: Shares ``[d_latent]`` (:func:`feature_capacities`).
    """
    n, f = pre.shape
    capacities = capacities.to(pre.device)
    take = capacities.floor().long()
    spare = round(float(capacities.sum())) - int(take.sum())
    depth = min(int(take.max()) + (spare > 0), n)
    values, rows = column_top(pre, depth)  # sorted: row r holds each latent's r-th best
    if spare > 0:
        room = (capacities > take) & (take < n)
        following = values.gather(0, take.clamp(max=depth - 1)[None]).squeeze(0)
        following = following.masked_fill(~room, float("-inf"))
        chosen = following.topk(min(spare, int(room.sum()))).indices
        take = take.index_add(0, chosen, torch.ones_like(chosen))
    keep = torch.arange(depth, device=pre.device)[:, None] < take
    return rows[keep] * f + torch.arange(f, device=pre.device).expand(depth, f)[keep]


def column_top(pre: Tensor, depth: int) -> tuple[Tensor, Tensor]:
    """Each latent's ``depth`` highest ReLU'd pre-activations over the batch, best first.

    ``torch.relu(pre).topk(depth, dim=0)``: ``(values, rows)``, each ``[depth, d_latent]``.
    On CPU in fp32/fp64 the columns are transposed into rows by a tiled kernel and each
    takes the row top-k kernel (``cpu_topk.py``), then its ``depth`` winners are sorted.
    Where a latent has fewer than ``depth`` positive entries, the zeros after the ReLU may
    come from other rows than torch's pick (any is a valid pick; none gets a gradient).

    Args:
        pre: ``[N, d_latent]`` pre-activations.
        depth: Rows per latent, ``<= N``.
    """
    if not kernel_applies(pre):
        return torch.relu(pre).topk(depth, dim=0)
    by_latent = cpu_sparse.transposed(pre)  # [d_latent, N]
    rows = topk_indices(by_latent, depth)  # ascending rows
    values = torch.relu(by_latent.gather(1, rows))
    order = values.argsort(dim=1, descending=True, stable=True)
    return values.gather(1, order).T, rows.gather(1, order).T


class _ChoiceSAE(BatchTopKSAE):
    """Density tracking, the aux_zipf loss and export shared by both choice SAEs."""

    config: _ChoiceConfig

    def __init__(self, config: _ChoiceConfig) -> None:
        super().__init__(config)
        # -1 marks "no training batch seen yet": aux_zipf then falls back to AuxK.
        self.register_buffer("feature_density", torch.full((config.d_latent,), -1.0))

    @torch.no_grad()
    def _update_density(self, out: DictionaryOutput) -> None:
        if out.pattern is None:
            fired = (out.codes > 0).sum(0)
        else:
            active = out.values.reshape(-1) > 0
            fired = torch.bincount(out.pattern.cols[active], minlength=self.d_latent)
        density = fired.float() / out.reconstruction.shape[0]
        if bool((self.feature_density < 0).any()):
            self.feature_density.copy_(density)
        else:
            m = self.config.density_momentum
            self.feature_density.mul_(m).add_((1 - m) * density)

    def underuse(self, dead_mask: Tensor | None = None) -> Tensor:
        """Each latent's aux_zipf weight in [0, 1]: :func:`zipf_underuse`, 1 if dead.

        Args:
            dead_mask: Latents the trainer counts as dead (always weighted 1), or ``None``.
        """
        density = self.feature_density
        if bool((density < 0).any()):
            underuse = torch.zeros_like(density)
        else:
            underuse = zipf_underuse(density)
        if dead_mask is not None:
            underuse = torch.maximum(underuse, dead_mask.to(underuse))
        return underuse

    def sparsity_losses(
        self,
        x: Tensor,
        out: DictionaryOutput,
        *,
        target: Tensor,
        sparsity_scale: float,
        dead_mask: Tensor | None,
    ) -> dict[str, Tensor]:
        """aux_zipf: AuxK over the underused latents, scaled by their total underuse.

        The latents with a positive :meth:`underuse` predict the residual through their
        top ``aux_k`` pre-activations per row, normalised by the residual's variance, as
        AuxK's dead latents do; the term is weighted by ``aux_coefficient * min(sum
        underuse / aux_k, 1)``. Also logs ``underused_fraction``.
        """
        underuse = self.underuse(dead_mask)
        candidates = underuse > 0
        auxk = super().sparsity_losses(
            x, out, target=target, sparsity_scale=sparsity_scale, dead_mask=candidates
        )["auxk_loss"]
        # The inherited AuxK scales by min(count / aux_k, 1): trade it for the underuse mass.
        aux_k, count = self.config.effective_aux_k, int(candidates.sum())
        if count > 0:
            auxk = auxk * (min(float(underuse.sum()) / aux_k, 1.0) / min(count / aux_k, 1.0))
        return {"aux_zipf_loss": auxk, "underused_fraction": candidates.float().mean()}

    def to_inference(self) -> Dictionary:
        """A JumpReLU SAE at the learned threshold(s); ``self`` until one is estimated.

        Before any training batch there is no threshold, and the training form (which
        codes a batch by its own choice rule) is what can be saved and loaded back.
        """
        if bool((self.threshold < 0).any()):
            return self
        return super().to_inference()


@register_dictionary("mutual_choice", example_kwargs={"k": 3}, recovery_fvu=0.12)
class MutualChoiceSAE(_ChoiceSAE):
    """Mutual Choice SAE: the ``k * N`` largest token-latent matches of a batch.

    Training selects as :class:`~lightning_interp.dictionaries.BatchTopKSAE` does (sparse
    path included) and adds aux_zipf; inference uses the EMA threshold, exported as a
    JumpReLU SAE. See the module docstring for the paper and our reading of it.

    Example:
        >>> from lightning_interp import create_dictionary
        >>> sae = create_dictionary("mutual_choice", d_in=16, d_latent=64, k=4)
        >>> out = sae.forward_train(torch.randn(32, 16))
        >>> int((out.codes != 0).sum()) <= 4 * 32
        True
    """

    config_class = MutualChoiceConfig
    config: MutualChoiceConfig

    def forward_train(self, x: Tensor) -> DictionaryOutput:
        """Batch-level selection; in training mode updates the threshold and densities."""
        out = super().forward_train(x)
        if self.training:
            self._update_density(out)
        return out


# The planted problem has 64 equally frequent atoms for 128 latents: with equal shares, half
# the budget goes to latents with nothing to find, so k is twice the planted L0 of 3.
@register_dictionary("feature_choice", example_kwargs={"k": 6}, recovery_fvu=0.12)
class FeatureChoiceSAE(_ChoiceSAE):
    """Feature Choice SAE: each latent chooses its top tokens of the batch.

    Training gives latent ``j`` at most ``ceil(c_j)`` tokens (:func:`feature_choice`),
    through the sparse kernels unless ``sparse_training`` is off; rows end up with
    different numbers of active latents. Each latent keeps an EMA of the smallest
    activation it chose, its inference threshold; :meth:`to_inference` exports a JumpReLU
    SAE with those per-latent thresholds.

    Example:
        >>> from lightning_interp import create_dictionary
        >>> sae = create_dictionary("feature_choice", d_in=16, d_latent=64, k=4)
        >>> out = sae.forward_train(torch.randn(32, 16) + 1)
        >>> int((out.codes != 0).sum(0).max()) <= 2  # ceil(4 * 32 / 64) tokens per latent
        True
    """

    config_class = FeatureChoiceConfig
    config: FeatureChoiceConfig

    def __init__(self, config: FeatureChoiceConfig) -> None:
        super().__init__(config)
        self.register_buffer("threshold", torch.full((config.d_latent,), -1.0))

    def capacities(self, num_rows: int) -> Tensor:
        """Each latent's share of a batch of ``num_rows`` (:func:`feature_capacities`)."""
        cfg = self.config
        return feature_capacities(cfg.k, num_rows, cfg.d_latent, cfg.capacity_exponent)

    def _choose(self, pre: Tensor) -> Tensor:
        """Dense codes of ``[N, d_latent]`` pre-activations under the choice rule."""
        mask = torch.zeros(pre.numel(), dtype=torch.bool, device=pre.device)
        mask[feature_choice(pre, self.capacities(pre.shape[0]))] = True
        return torch.relu(pre) * mask.view_as(pre)

    def activation(self, pre: Tensor) -> Tensor:
        """JumpReLU at the per-latent thresholds, or the batch's choice before they exist."""
        if bool((self.threshold < 0).any()):
            return self._choose(pre.reshape(-1, self.d_latent)).view_as(pre)
        return pre * (pre > self.threshold.to(pre.dtype))

    def forward_train(self, x: Tensor) -> DictionaryOutput:
        """Feature choice on the batch; updates thresholds and densities in training mode.

        Sparse unless ``sparse_training`` is off: the pattern carries each row's own
        number of latents as CSR offsets.
        """
        if not self._use_sparse_path():
            pre = self.encode_pre(x).reshape(-1, self.d_latent)
            codes = self._choose(pre)
            out = DictionaryOutput(self.with_skip(x, self.decode(codes)), codes, pre)
        else:
            with torch.no_grad():
                pre = self._training_gemm(x, add_bias=True)
                chosen = feature_choice(pre, self.capacities(pre.shape[0]))
                pattern = SparsePattern.from_flat(chosen, pre.shape[0], self.d_latent)
            values, reconstruction = self._sparse_forward(x, pre, pattern)
            out = DictionaryOutput(
                reconstruction, pre_activations=pre, pattern=pattern, values=values
            )
        if self.training:
            self._update_latent_thresholds(out)
            self._update_density(out)
        return out

    @torch.no_grad()
    def _update_latent_thresholds(self, out: DictionaryOutput) -> None:
        inf = torch.tensor(float("inf"), device=self.threshold.device)
        if out.pattern is None:
            codes = out.codes.float()
            smallest = torch.where(codes > 0, codes, inf).amin(0)
        else:
            values = out.values.reshape(-1).float()
            active = values > 0
            smallest = torch.full_like(self.threshold, float("inf")).scatter_reduce(
                0, out.pattern.cols[active], values[active], "amin"
            )
        chosen = torch.isfinite(smallest)
        if not bool(chosen.any()):
            return
        if bool((self.threshold < 0).any()):
            # First batch: a latent that chose nothing starts at the batch's smallest choice.
            self.threshold.copy_(torch.where(chosen, smallest, smallest[chosen].min()))
        else:
            m = self.config.threshold_momentum
            ema = m * self.threshold + (1 - m) * smallest
            self.threshold.copy_(torch.where(chosen, ema, self.threshold))
