"""Downstream metrics: what a dictionary keeps of the model's next-token predictions.

The dictionary's reconstruction is spliced into the frozen backbone at its site and the
model's next-token cross-entropy (CE) and its KL divergence from the clean model are
measured. Only causal language models have the next-token head these metrics need; for
encoders (BERT, CLIP) report the reconstruction metrics (FVU, L0) instead.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_interp.backbones.backbone import CAUSAL_SUFFIXES, Backbone
from lightning_interp.errors import ConfigError, ShapeMismatchError

__all__ = [
    "CrossEntropyLossRecovered",
    "SplicedKLDivergence",
    "has_lm_head",
    "splice_evaluation",
]


def _flatten(logits: Tensor, mask: Tensor | None, *others: Tensor) -> tuple[Tensor, ...]:
    """``[..., V]`` logits and ``[...]`` companions to ``[N, V]`` / ``[N]`` kept rows."""
    flat = [logits.detach().reshape(-1, logits.shape[-1])]
    flat += [t.detach().reshape(-1, *t.shape[logits.ndim - 1 :]) for t in others]
    if mask is not None:
        keep = mask.reshape(-1).bool()
        flat = [t[keep] for t in flat]
    return tuple(flat)


class CrossEntropyLossRecovered(Metric):
    r"""Share of the next-token loss a spliced reconstruction recovers (SAELens's score).

    .. math:: \frac{\mathrm{CE}_{\text{zero}} - \mathrm{CE}_{\text{spliced}}}
              {\mathrm{CE}_{\text{zero}} - \mathrm{CE}_{\text{clean}}}

    with each CE the mean over every predicted token seen, pooled over batches (not a
    mean of per-batch ratios). 1 means the reconstruction is as good as the activation,
    0 as bad as zeroing it. Per-token losses are summed in float64.

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
            raise ShapeMismatchError("clean, spliced and zero-ablation logits differ in shape")
        if targets.shape != clean_logits.shape[:-1]:
            raise ShapeMismatchError(
                f"targets {tuple(targets.shape)} must match logits {tuple(clean_logits.shape)} "
                f"without their last (vocabulary) dimension"
            )
        clean, targets_flat = _flatten(clean_logits, mask, targets)
        spliced, zero = _flatten(spliced_logits, mask)[0], _flatten(zero_ablation_logits, mask)[0]
        for state, logits in (
            ("ce_clean_sum", clean),
            ("ce_spliced_sum", spliced),
            ("ce_zero_ablation_sum", zero),
        ):
            loss = F.cross_entropy(logits.float(), targets_flat, reduction="none")
            setattr(self, state, getattr(self, state) + loss.double().sum())
        self.count += targets_flat.numel()

    def compute_all(self) -> dict[str, Tensor]:
        """Mean CEs (nats per token), the recovered share and the added loss (float32).

        Returns:
            ``ce_clean``, ``ce_spliced``, ``ce_zero_ablation``, ``ce_loss_recovered`` and
            ``delta_lm_loss`` (``ce_spliced - ce_clean``); NaN before any token. Under DDP
            the sums are reduced across ranks first, as :meth:`compute` does.
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


class SplicedKLDivergence(Metric):
    r"""Mean over predicted tokens of :math:`\mathrm{KL}(p_{\text{clean}} \| p_{\text{spliced}})`.

    Unlike CE loss recovered it needs no targets and no ablation baseline, and it is 0 only
    when the spliced model predicts exactly what the clean one does. Sums are float64.

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
        self.add_state("kl_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self, clean_logits: Tensor, spliced_logits: Tensor, mask: Tensor | None = None
    ) -> None:
        """Add the tokens of one batch (``[..., V]`` logits, optional ``[...]`` bool mask)."""
        if clean_logits.shape != spliced_logits.shape:
            raise ShapeMismatchError("clean and spliced logits differ in shape")
        clean = _flatten(clean_logits, mask)[0].float().log_softmax(-1)
        spliced = _flatten(spliced_logits, mask)[0].float().log_softmax(-1)
        kl = F.kl_div(spliced, clean, log_target=True, reduction="none").sum(-1)
        self.kl_sum += kl.double().sum()
        self.count += kl.numel()

    def compute(self) -> Tensor:
        """Mean KL (nats per token) since the last reset (float32; NaN before any token)."""
        return (self.kl_sum / self.count).float()


def has_lm_head(backbone: Backbone | nn.Module) -> bool:
    """Whether the model predicts next tokens (a causal LM head), as these metrics need.

    Args:
        backbone: A :class:`Backbone` or a transformers model.
    """
    model = backbone.model if isinstance(backbone, Backbone) else backbone
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return False  # T5-style models need decoder inputs, not a plain next-token forward
    name = type(model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return True
    # Vision-language decoders (Gemma 3, LLaVA) are *ForConditionalGeneration with a head.
    get_head = getattr(model, "get_output_embeddings", None)
    return name.endswith(CAUSAL_SUFFIXES) and callable(get_head) and get_head() is not None


def _require_lm_head(backbone: Backbone) -> None:
    if not has_lm_head(backbone):
        raise ConfigError(
            f"CE loss recovered and spliced KL need a causal language model with an LM head; "
            f"{type(backbone.model).__name__} has none (an encoder such as BERT or CLIP). "
            f"Report reconstruction metrics (FractionOfVarianceUnexplained, L0) for it instead"
        )


def _special_ids(backbone: Backbone) -> list[int]:
    if backbone.tokenizer is not None:
        from lightning_interp.data.tokens import special_token_ids

        return special_token_ids(getattr(backbone.tokenizer, "tokenizer", backbone.tokenizer))
    # No tokenizer (a model built from a config): the config's BOS / EOS / pad ids.
    ids: set[int] = set()
    for which in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(backbone.model.config, which, None)
        if value is not None:
            ids.update(value if isinstance(value, list | tuple) else [value])
    return sorted(int(i) for i in ids)


def _masked_splice(fn: Callable[[Tensor], Tensor], positions: Tensor) -> Callable[[Tensor], Tensor]:
    """``fn`` applied at ``positions`` (``[B, T]`` bool); other positions keep ``a``."""

    def splice(a: Tensor) -> Tensor:
        if a.shape[:2] == positions.shape:
            where = positions[..., None]
        elif a.ndim == 2 and a.shape[0] == positions.numel():
            # Some modules see tokens flattened to rows (transformers 5's GPT-2 MLP).
            where = positions.reshape(-1, 1)
        else:
            raise ShapeMismatchError(
                f"activation {tuple(a.shape)} does not start with the batch's [batch, seq] "
                f"{tuple(positions.shape)}; downstream metrics need a per-token site"
            )
        new = fn(a.reshape(-1, a.shape[-1])).reshape(a.shape).to(a.dtype)
        return torch.where(where, new, a)

    return splice


@torch.no_grad()
def splice_evaluation(
    backbone: Backbone,
    dictionary: Callable[[Tensor], Tensor],
    site: str,
    inputs: Mapping[str, Tensor],
    *,
    exclude_special_tokens: bool = True,
    special_token_ids: Collection[int] | None = None,
    ce_metric: CrossEntropyLossRecovered | None = None,
    kl_metric: SplicedKLDivergence | None = None,
    site_out: str | None = None,
) -> int:
    """Run one batch clean, zero-ablated and spliced, and update the metrics.

    Three forwards run: the clean model, the model with the site's activation zeroed, and
    the model with it replaced by ``dictionary(activation)`` (the dictionary sees
    ``[batch * seq, d]`` rows and its output is cast back to the model's dtype). Position
    ``t`` predicts token ``t + 1``; a prediction counts when both tokens are real
    (``attention_mask`` 1) and, with ``exclude_special_tokens``, neither is special.

    Special tokens (BOS, EOS, pad, chat markers) are excluded because they mislead: BOS is
    an attention sink whose activation has an outsized norm, training streams drop it
    (so a dictionary never saw it), and a prediction from or of a separator says little
    about the text. With ``exclude_special_tokens`` the activation at special positions
    is also left clean in both the ablated and the spliced run, so the metrics measure the
    dictionary on the tokens it was trained on rather than the damage done by replacing
    the sink. Padding positions are never spliced (they cannot affect real tokens).

    Args:
        backbone: A causal LM backbone (see :func:`has_lm_head`).
        dictionary: Maps ``[N, d]`` activations to ``[N, d]`` reconstructions, e.g. a
            :class:`~lightning_interp.dictionaries.Dictionary`.
        site: The site the dictionary was trained on, e.g. ``"layers.5.resid_post"``.
        inputs: ``{"input_ids": [B, T], "attention_mask": [B, T]}`` (mask optional).
            Pad on the right: left padding shifts GPT-2's positions.
        exclude_special_tokens: Leave special tokens out, as described above.
        special_token_ids: Which ids are special (default: the tokenizer's special ids, or
            the config's BOS / EOS / pad ids when the backbone has no tokenizer).
        ce_metric: Updated with the three runs' logits, if given.
        kl_metric: Updated with the clean and spliced logits, if given.
        site_out: For a transcoder, the site its output replaces (``site`` is the one it
            reads): the spliced run writes ``dictionary(activation at site)`` at
            ``site_out``, and the zero-ablation baseline zeroes ``site_out``.

    Returns:
        The number of predicted tokens counted in this batch.

    Raises:
        ConfigError: If the backbone has no causal LM head (encoders, CLIP).
    """
    target = SpliceTarget(dictionary, site, site_out, ce_metric, kl_metric)
    return splice_evaluation_many(
        backbone,
        [target],
        inputs,
        exclude_special_tokens=exclude_special_tokens,
        special_token_ids=special_token_ids,
    )


@dataclass
class SpliceTarget:
    """One dictionary to evaluate by splicing, and the metrics it updates.

    Args:
        dictionary: Maps ``[N, d_in]`` rows to ``[N, d_out]`` reconstructions.
        site: The site it reads (and, without ``site_out``, replaces).
        site_out: For a transcoder, the later site its output replaces.
        ce_metric: Updated with the clean, zero-ablated and spliced logits, if given.
        kl_metric: Updated with the clean and spliced logits, if given.
    """

    dictionary: Callable[[Tensor], Tensor]
    site: str
    site_out: str | None = None
    ce_metric: CrossEntropyLossRecovered | None = None
    kl_metric: SplicedKLDivergence | None = None


@torch.no_grad()
def splice_evaluation_many(
    backbone: Backbone,
    targets: Sequence[SpliceTarget],
    inputs: Mapping[str, Tensor],
    *,
    exclude_special_tokens: bool = True,
    special_token_ids: Collection[int] | None = None,
) -> int:
    """:func:`splice_evaluation` for several dictionaries on one batch.

    The clean forward runs once, the zero-ablated one once per replaced site, and one
    spliced forward per dictionary: ``1 + sites + N`` forwards rather than ``3N``.

    Returns:
        The number of predicted tokens counted in this batch.
    """
    _require_lm_head(backbone)
    encoded = backbone.encode(dict(inputs))
    input_ids = encoded["input_ids"]
    attention = encoded.get("attention_mask")
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention is None else attention.bool()
    spliced_positions = real
    if exclude_special_tokens:
        ids = _special_ids(backbone) if special_token_ids is None else list(special_token_ids)
        ids_tensor = torch.tensor(ids, dtype=input_ids.dtype, device=input_ids.device)
        special = torch.isin(input_ids, ids_tensor)
        spliced_positions = real & ~special
    keep = spliced_positions[:, :-1] & spliced_positions[:, 1:]
    next_tokens = input_ids[:, 1:]

    def logits() -> Tensor:
        output = backbone(encoded)
        return output.logits[:, :-1]

    clean = logits()
    zero_by_site: dict[str, Tensor] = {}
    for target in targets:
        replaced = target.site if target.site_out is None else target.site_out
        if replaced not in zero_by_site:
            with backbone.splice(replaced, _masked_splice(torch.zeros_like, spliced_positions)):
                zero_by_site[replaced] = logits()
        spliced = _spliced_logits(backbone, target, spliced_positions, logits)
        if target.ce_metric is not None:
            target.ce_metric.update(clean, spliced, zero_by_site[replaced], next_tokens, keep)
        if target.kl_metric is not None:
            target.kl_metric.update(clean, spliced, keep)
    return int(keep.sum())


def _spliced_logits(
    backbone: Backbone,
    target: SpliceTarget,
    positions: Tensor,
    logits: Callable[[], Tensor],
) -> Tensor:
    if target.site_out is None:
        with backbone.splice(target.site, _masked_splice(target.dictionary, positions)):
            return logits()

    def transcode(inputs: Tensor, activation: Tensor) -> Tensor:
        rows = inputs.reshape(-1, inputs.shape[-1])
        return _masked_splice(lambda _: target.dictionary(rows), positions)(activation)

    with backbone.transcode(target.site, target.site_out, transcode):
        return logits()
