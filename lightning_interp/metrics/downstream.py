"""Downstream metrics: what a dictionary keeps of the model's next-token predictions.

The dictionary's reconstruction is spliced into the frozen backbone at its site and the
model's next-token cross-entropy (CE) and its KL divergence from the clean model are
measured, against a baseline with the site zeroed. Only causal language models have the
next-token head these metrics need; for encoders (BERT, CLIP) report the reconstruction
metrics (FVU, L0) instead.

By default every choice follows SAELens's own evaluation (``sae_lens/evals.py`` in SAELens
6.54.12: ``run_evals`` with its default ``exclude_special_tokens=True``, which calls
``get_downstream_reconstruction_metrics`` and ``get_recons_loss``), so a CE loss recovered
computed here means what it means on Neuronpedia and in papers that use SAELens. See
:data:`CONVENTIONS` and ``docs/downstream_metrics.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_interp.backbones.backbone import CAUSAL_SUFFIXES, Backbone
from lightning_interp.backbones.special_tokens import special_token_ids as _all_special_ids
from lightning_interp.errors import ConfigError, ShapeMismatchError
from lightning_interp.metrics.next_token import CrossEntropyLossRecovered, SplicedKLDivergence

__all__ = [
    "CONVENTIONS",
    "Convention",
    "CrossEntropyLossRecovered",
    "SpliceTarget",
    "SplicedKLDivergence",
    "has_lm_head",
    "splice_evaluation",
    "splice_evaluation_many",
]

Convention = Literal["saelens", "special_tokens_clean"]

#: Which tokens are spliced, zeroed and counted (with ``exclude_special_tokens=True``).
#:
#: ``"saelens"`` (the default), as SAELens 6.54.12's ``get_recons_loss`` and
#: ``get_downstream_reconstruction_metrics``: the special tokens are the tokenizer's
#: structural ones (BOS, EOS, pad, SEP, decoder start: ``sae_lens.util.get_special_token_ids``;
#: chat markers are ordinary text); the reconstruction replaces the activation at every
#: ordinary position and special positions keep theirs; the zero-ablation baseline zeroes
#: the site at *every* position, special ones included; a prediction is dropped when its
#: *input* token is special (predicting an EOS from a word counts); the KL divergence is
#: averaged over the same positions, the last one of each context included (it has no
#: target, so CE leaves it out). Padding, which SAELens's packed contexts never have, is
#: never spliced and never counted, and neither is a prediction whose target is padding.
#:
#: ``"special_tokens_clean"`` (this library's convention before SAELens's became the
#: default): every special id of the tokenizer (chat markers too) keeps its clean activation
#: in *both* the spliced and the zero-ablated run, and a prediction counts only when its
#: input and its target are both ordinary (KL over the same predictions). Its baseline
#: leaves the BOS attention sink intact, which changes the zero-ablation CE (on SmolLM2,
#: 15.6 nats against SAELens's 10.8) and so the recovered share: its numbers are not
#: comparable with SAELens's (docs/downstream_metrics.md has the two side by side).
CONVENTIONS: tuple[str, ...] = ("saelens", "special_tokens_clean")

# SAELens's structural special tokens (sae_lens.util._SPECIAL_TOKEN_ATTRS).
_STRUCTURAL_IDS = (
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sep_token_id",
    "decoder_start_token_id",
)


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


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ConfigError(
            f"unknown downstream-metrics convention {convention!r}; use one of {CONVENTIONS} "
            f"('saelens' gives numbers comparable with SAELens and Neuronpedia)"
        )


def _ids_from(holder: Any, attributes: Sequence[str]) -> set[int]:
    ids: set[int] = set()
    for which in attributes:
        value = getattr(holder, which, None)
        if value is not None:
            ids.update(int(i) for i in (value if isinstance(value, list | tuple) else [value]))
    return ids


def _special_ids(backbone: Backbone, convention: str) -> list[int]:
    """Default special ids: SAELens's structural set, or every special id of the tokenizer."""
    tokenizer = backbone.tokenizer
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps its tokenizer
    if tokenizer is None:
        # A model built from a config: its BOS / EOS / pad ids (SEP for the structural set).
        attributes = _STRUCTURAL_IDS if convention == "saelens" else _STRUCTURAL_IDS[:3]
        return sorted(_ids_from(backbone.model.config, attributes))
    if convention == "saelens":
        return sorted(_ids_from(tokenizer, _STRUCTURAL_IDS))
    return _all_special_ids(tokenizer)


@dataclass(frozen=True)
class _TokenPlan:
    """Which positions of a ``[B, T]`` batch are spliced, zeroed and counted."""

    spliced: Tensor  # [B, T] bool: the reconstruction replaces the activation here
    zeroed: Tensor | None  # [B, T] bool, or None for every position
    ce_keep: Tensor  # [B, T - 1] bool: predictions of token t + 1 that count
    kl_keep: Tensor  # [B, T] or [B, T - 1] bool over the positions KL averages
    kl_positions: int  # how many leading positions of the logits KL sees (T or T - 1)


def _token_plan(
    input_ids: Tensor,
    attention_mask: Tensor | None,
    special_ids: Collection[int] | None,
    convention: str,
) -> _TokenPlan:
    real = (
        torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask is None
        else attention_mask.bool().to(input_ids.device)
    )
    ordinary = real
    if special_ids is not None:
        ids = torch.tensor(list(special_ids), dtype=input_ids.dtype, device=input_ids.device)
        ordinary = real & ~torch.isin(input_ids, ids)
    seq = input_ids.shape[1]
    if convention == "saelens":
        # SAELens drops a prediction where its *input* is special; padding (which its packed
        # contexts never have) is neither a prediction's input nor its target.
        ce_keep = ordinary[:, :-1] & real[:, 1:]
        return _TokenPlan(ordinary, None, ce_keep, ordinary, seq)
    ce_keep = ordinary[:, :-1] & ordinary[:, 1:]
    return _TokenPlan(ordinary, ordinary, ce_keep, ce_keep, seq - 1)


def _placement(dictionary: Callable[[Tensor], Tensor]) -> tuple[torch.device, torch.dtype] | None:
    """Where and in which dtype a dictionary computes, or None for a plain function.

    A :class:`~lightning_interp.dictionaries.Dictionary` says so itself (``device`` and
    ``dtype``); any other module by its first floating-point parameter or buffer.
    """
    device, dtype = getattr(dictionary, "device", None), getattr(dictionary, "dtype", None)
    if isinstance(device, torch.device) and isinstance(dtype, torch.dtype):
        return device, dtype
    if isinstance(dictionary, nn.Module):
        for tensor in chain(dictionary.parameters(), dictionary.buffers()):
            if tensor.is_floating_point():
                return tensor.device, tensor.dtype
    return None


def _run_dictionary(dictionary: Callable[[Tensor], Tensor], rows: Tensor) -> Tensor:
    """``dictionary(rows)`` with the rows moved to the dictionary's device and dtype.

    The backbone may run on the CPU in float32 while the dictionary sits on a GPU, or in
    float64; the caller moves the output back.
    """
    placement = _placement(dictionary)
    if placement is not None:
        rows = rows.to(device=placement[0], dtype=placement[1])
    return dictionary(rows)


def _replace(activation: Tensor, new_rows: Tensor, positions: Tensor) -> Tensor:
    """``activation`` with its rows at ``positions`` (``[B, T]`` bool) taken from ``new_rows``.

    ``new_rows`` is ``[B * T, d]`` on any device and dtype; the result has the activation's
    shape, device and dtype.
    """
    if activation.shape[:2] == positions.shape:
        where = positions[..., None]
    elif activation.ndim == 2 and activation.shape[0] == positions.numel():
        # Some modules see tokens flattened to rows (transformers 5's GPT-2 MLP).
        where = positions.reshape(-1, 1)
    else:
        raise ShapeMismatchError(
            f"activation {tuple(activation.shape)} does not start with the batch's "
            f"[batch, seq] {tuple(positions.shape)}; downstream metrics need a per-token site"
        )
    new = new_rows.to(device=activation.device, dtype=activation.dtype).reshape(activation.shape)
    return torch.where(where.to(activation.device), new, activation)


def _spliced_at(fn: Callable[[Tensor], Tensor], positions: Tensor) -> Callable[[Tensor], Tensor]:
    """A splice function: ``fn`` applied at ``positions``; other positions keep ``a``."""

    def splice(a: Tensor) -> Tensor:
        return _replace(a, _run_dictionary(fn, a.reshape(-1, a.shape[-1])), positions)

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
    convention: Convention = "saelens",
    ce_metric: CrossEntropyLossRecovered | None = None,
    kl_metric: SplicedKLDivergence | None = None,
    site_out: str | None = None,
) -> int:
    """Run one batch clean, zero-ablated and spliced, and update the metrics.

    Three forwards run: the clean model, the model with the site's activation zeroed, and
    the model with it replaced by ``dictionary(activation)``. The dictionary sees
    ``[batch * seq, d]`` rows on its own device and in its own dtype (a
    :class:`~lightning_interp.dictionaries.Dictionary`'s ``device``/``dtype``, or any
    module's parameters), and its output goes back to the backbone's device and dtype.
    Position ``t`` predicts token ``t + 1``.

    Which tokens are spliced, zeroed and counted is SAELens's choice by default (see
    :data:`CONVENTIONS`): with ``exclude_special_tokens``, special positions keep their
    activation in the spliced run, the baseline zeroes every position, and predictions
    made *from* a special token are dropped. BOS is the reason this matters: it is an
    attention sink with an outsized norm that training streams drop, so a dictionary never
    saw it. Padding (``attention_mask`` 0; pad on the right) is never spliced or counted.

    Args:
        backbone: A causal LM backbone (see :func:`has_lm_head`).
        dictionary: Maps ``[N, d]`` activations to ``[N, d]`` reconstructions, e.g. a
            :class:`~lightning_interp.dictionaries.Dictionary`.
        site: The site the dictionary was trained on, e.g. ``"layers.5.resid_post"``.
        inputs: ``{"input_ids": [B, T], "attention_mask": [B, T]}`` (mask optional).
        exclude_special_tokens: Treat special tokens as described above; off, every real
            token is spliced and counted (SAELens's ``exclude_special_tokens=False``).
        special_token_ids: Which ids are special. Default: with ``"saelens"``, the
            tokenizer's BOS / EOS / pad / SEP ids (as SAELens); with
            ``"special_tokens_clean"``, every special id of the tokenizer; without a
            tokenizer, the model config's ids of the same kinds.
        convention: ``"saelens"`` (default) or ``"special_tokens_clean"``, see
            :data:`CONVENTIONS`.
        ce_metric: Updated with the three runs' logits, if given.
        kl_metric: Updated with the clean, spliced and zero-ablated logits, if given.
        site_out: For a transcoder, the site its output replaces (``site`` is the one it
            reads): the spliced run writes ``dictionary(activation at site)`` at
            ``site_out``, and the zero-ablation baseline zeroes ``site_out``.

    Returns:
        The number of predicted tokens counted for CE in this batch.

    Raises:
        ConfigError: If the backbone has no causal LM head (encoders, CLIP), or the
            convention is unknown.
    """
    target = SpliceTarget(dictionary, site, site_out, ce_metric, kl_metric)
    return splice_evaluation_many(
        backbone,
        [target],
        inputs,
        exclude_special_tokens=exclude_special_tokens,
        special_token_ids=special_token_ids,
        convention=convention,
    )


@dataclass
class SpliceTarget:
    """One dictionary to evaluate by splicing, and the metrics it updates.

    Args:
        dictionary: Maps ``[N, d_in]`` rows to ``[N, d_out]`` reconstructions.
        site: The site it reads (and, without ``site_out``, replaces).
        site_out: For a transcoder, the later site its output replaces.
        ce_metric: Updated with the clean, zero-ablated and spliced logits, if given.
        kl_metric: Updated with the clean, spliced and zero-ablated logits, if given.
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
    convention: Convention = "saelens",
) -> int:
    """:func:`splice_evaluation` for several dictionaries on one batch.

    The clean forward runs once, the zero-ablated one once per replaced site, and one
    spliced forward per dictionary: ``1 + sites + N`` forwards rather than ``3N``.

    Returns:
        The number of predicted tokens counted for CE in this batch.
    """
    _require_lm_head(backbone)
    _check_convention(convention)
    encoded = backbone.encode(dict(inputs))
    input_ids = encoded["input_ids"]
    special: Collection[int] | None = None
    if exclude_special_tokens:
        special = (
            _special_ids(backbone, convention) if special_token_ids is None else special_token_ids
        )
    plan = _token_plan(input_ids, encoded.get("attention_mask"), special, convention)
    next_tokens = input_ids[:, 1:]
    zero_fn = (
        torch.zeros_like if plan.zeroed is None else _spliced_at(torch.zeros_like, plan.zeroed)
    )

    def logits() -> Tensor:
        return backbone(encoded).logits

    clean = logits()
    zero_by_site: dict[str, Tensor] = {}
    for target in targets:
        replaced = target.site if target.site_out is None else target.site_out
        if replaced not in zero_by_site:
            with backbone.splice(replaced, zero_fn):
                zero_by_site[replaced] = logits()
        zero = zero_by_site[replaced]
        spliced = _spliced_logits(backbone, target, plan.spliced, logits)
        if target.ce_metric is not None:
            target.ce_metric.update(
                clean[:, :-1], spliced[:, :-1], zero[:, :-1], next_tokens, plan.ce_keep
            )
        if target.kl_metric is not None:
            upto = plan.kl_positions
            target.kl_metric.update(
                clean[:, :upto], spliced[:, :upto], plan.kl_keep, zero[:, :upto]
            )
    return int(plan.ce_keep.sum())


def _spliced_logits(
    backbone: Backbone,
    target: SpliceTarget,
    positions: Tensor,
    logits: Callable[[], Tensor],
) -> Tensor:
    if target.site_out is None:
        with backbone.splice(target.site, _spliced_at(target.dictionary, positions)):
            return logits()

    def transcode(inputs: Tensor, activation: Tensor) -> Tensor:
        rows = inputs.reshape(-1, inputs.shape[-1])
        return _replace(activation, _run_dictionary(target.dictionary, rows), positions)

    with backbone.transcode(target.site, target.site_out, transcode):
        return logits()
