"""One streaming pass of a dictionary over a corpus: the feature store of its latents.

Contexts come in text order from the same packing as the activation stream
(:func:`~lightning_interp.data.tokens.iter_contexts`, grouped as capture batches by
:func:`~lightning_interp.data.tokens.batch_contexts`), with the positions training keeps
(no padding; no special tokens unless ``exclude_special_tokens=False``). No shuffling: a
feature pass needs each row's context and position to cut windows. Per capture batch:
``backbone.capture(site)`` -> kept rows -> ``dictionary.encode_sparse`` ->
:meth:`~lightning_interp.features.store.FeatureAccumulator.update`.

Every ``checkpoint_every`` batches the accumulators and the text position of the last batch
are saved to ``<out>.partial/``; a new call with the same settings resumes from there
without re-reading the text before it and gives the same store as an uninterrupted pass.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from lightning_interp.backbones.special_tokens import special_token_ids
from lightning_interp.data.tokens import Separator, TextPosition, batch_contexts, iter_contexts
from lightning_interp.errors import ConfigError, OutputExistsError
from lightning_interp.features.layout import (
    json_ready,  # noqa: F401 (importable from here, as before)
    partial_folder,
    resume_progress,
    save_progress,
    store_meta,
    write_store,
)
from lightning_interp.features.lens import logit_lens
from lightning_interp.features.store import FeatureAccumulator, FeatureSettings
from lightning_interp.features.summary import correlation_kind, quantiles_kind, summarize


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The text a pass reads and how it is cut into contexts (as :class:`ActivationStream`).

    Attributes:
        texts: Documents (or conversations when ``chat``); re-iterable or a callable
            returning a fresh iterator.
        name: How store.json names it (e.g. ``offline:news``).
        context_size: Tokens per context, BOS included.
        contexts_per_capture: Contexts per backbone forward.
        max_tokens: Stop after this many kept tokens (``None``: the whole text).
        chat: One chat-templated conversation per context.
        column: Key of the text when items are records.
        prepend_bos: Start every packed context with BOS.
        separator: Token between packed documents.
        exclude_special_tokens: Leave special tokens out of the statistics.
    """

    texts: Iterable[Any] | Callable[[], Iterable[Any]]
    name: str = "texts"
    context_size: int = 128
    contexts_per_capture: int = 8
    max_tokens: int | None = None
    chat: bool = False
    column: str | None = None
    prepend_bos: bool = True
    separator: Separator = "eos"
    exclude_special_tokens: bool = True

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed pass must share (everything but the texts)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "texts"}

    def documents(self) -> Iterable[Any]:
        """A fresh iterator over the documents (the text column when ``column``)."""
        docs = self.texts() if callable(self.texts) else self.texts
        return docs if self.column is None else (item[self.column] for item in docs)


class TokenProgress:
    """Tokens read and tokens/s: Lightning's progress bar on a terminal, plain lines in a log.

    On a terminal the bar is Lightning's own (``lightning.pytorch``'s ``Tqdm``, the bar
    ``fit`` draws), counting tokens; off a terminal (a log file, CI) a plain line at most
    every 10 s and one at the end, so logs hold no carriage returns.

    Args:
        total: Tokens expected (``None``: unknown).
        stream: Where to print (default stderr).
        enabled: Print nothing when False.
        unit: What is counted (``"tokens"``, or ``"patches"`` for images).
    """

    def __init__(
        self, total: int | None, stream: Any = None, enabled: bool = True, unit: str = "tokens"
    ) -> None:
        self.total, self.enabled, self.unit = total, enabled, unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.monotonic()
        self._last_line = self.start
        self._bar: Any = None
        if enabled and self.tty:
            from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

            self._bar = Tqdm(
                total=total, desc="features", unit=f" {unit}", unit_scale=True, file=self.stream
            )
        #: Seconds from the start to the last update (the pass alone, without the finish).
        self.seconds = 0.0

    def update(self, tokens: int, done: bool = False) -> None:
        """Report ``tokens`` read so far."""
        now = time.monotonic()
        self.seconds = now - self.start
        if self._bar is not None:
            self._bar.update(tokens - self._bar.n)
            if done:
                self._bar.close()
            return
        if not self.enabled or (not done and now - self._last_line < 10):
            return
        self._last_line = now
        rate = tokens / max(self.seconds, 1e-9)
        of = f"/{self.total:,}" if self.total else ""
        line = f"features: {tokens:,}{of} {self.unit}, {rate:,.0f} {self.unit}/s"
        print(line, file=self.stream, flush=True)


def build_feature_store(
    dictionary: Any,
    backbone: Any,
    corpus: Corpus,
    out: str | Path,
    *,
    site: str,
    settings: FeatureSettings | None = None,
    source: str = "",
    checkpoint_every: int = 100,
    progress: bool | TokenProgress = True,
) -> Path:
    """Run the feature pass and write the store at ``out`` (resuming ``<out>.partial/``).

    Args:
        dictionary: A :class:`~lightning_interp.dictionaries.Dictionary` reading ``site``.
        backbone: The frozen :class:`~lightning_interp.backbones.Backbone`, with a tokenizer.
        corpus: The text and its packing.
        out: Folder of the store (must not exist).
        site: The site the dictionary reads.
        settings: What to record (default :class:`FeatureSettings`).
        source: How store.json names the dictionary.
        checkpoint_every: Capture batches between checkpoints (0: none).
        progress: Print tokens and tokens/s on stderr; or a :class:`TokenProgress` to use.

    Returns:
        ``out``.

    Raises:
        OutputExistsError: ``out`` exists.
        ConfigError: no tokenizer, or ``<out>.partial`` holds a build with other settings.
    """
    out = Path(out)
    settings = settings or FeatureSettings()
    if out.exists():
        raise OutputExistsError(f"{out} exists; remove it or choose another --out")
    tokenizer = backbone.tokenizer
    if tokenizer is None:
        raise ConfigError("a feature pass needs the backbone's tokenizer: Backbone(model, tok)")
    provenance = dictionary.config.provenance
    if provenance.activation_scale != 1.0:
        dictionary = dictionary.with_scale_folded()  # takes raw activations, same codes
    site = backbone.resolve_sites(site)[0]
    fingerprint = {
        "settings": settings.to_dict(),
        "corpus": corpus.fingerprint(),
        "site": site,
        "d_latent": dictionary.d_latent,
        "source": source,
    }
    acc = FeatureAccumulator(dictionary.d_latent, settings)
    partial = partial_folder(out)
    state = {"position": [0, 0], "batches": 0, "contexts": 0, "tokens": 0}
    saved = resume_progress(partial, fingerprint, acc)
    if saved is not None:
        state = {k: saved[k] for k in state}
    special = torch.tensor(
        special_token_ids(tokenizer) if corpus.exclude_special_tokens else [], dtype=torch.long
    )
    meter = (
        progress
        if isinstance(progress, TokenProgress)
        else TokenProgress(corpus.max_tokens, enabled=progress)
    )
    contexts = iter_contexts(
        corpus.documents(),
        tokenizer,
        corpus.context_size,
        chat=corpus.chat,
        prepend_bos=corpus.prepend_bos,
        separator=corpus.separator,
        start=TextPosition(*state["position"]),
    )
    batches = batch_contexts(contexts, corpus.contexts_per_capture)
    if state["batches"]:
        next(batches, None)  # the checkpoint's position is that of its last (done) batch
    dtype = dictionary.W_dec.dtype
    for position, ids, mask in batches:
        remaining = None if corpus.max_tokens is None else corpus.max_tokens - state["tokens"]
        if remaining is not None and remaining <= 0:
            break
        keep = mask.bool() & ~torch.isin(ids, special)
        order = keep.reshape(-1).cumsum(0).view_as(keep)
        if remaining is not None:
            keep &= order <= remaining
        row_index = torch.where(keep, order - 1, -1)
        acts = backbone.capture({"input_ids": ids, "attention_mask": mask}, site, dtype=dtype)
        flat = acts[site].reshape(-1, acts[site].shape[-1])
        rows = flat.index_select(0, keep.reshape(-1).nonzero().squeeze(1).to(flat.device))
        with torch.no_grad():
            codes = dictionary.encode_sparse(rows)
        acc.update(codes, ids, row_index, state["contexts"])
        state["position"] = list(position)
        state["batches"] += 1
        state["contexts"] += len(ids)
        state["tokens"] += int(keep.sum())
        meter.update(state["tokens"])
        if checkpoint_every and state["batches"] % checkpoint_every == 0:
            save_progress(partial, acc.state(), {"fingerprint": fingerprint, **state})
    meter.update(state["tokens"], done=True)
    _finish(dictionary, backbone, acc, out, state["tokens"], corpus, site, source)
    shutil.rmtree(partial, ignore_errors=True)
    return out


def _finish(
    dictionary: Any,
    backbone: Any,
    acc: FeatureAccumulator,
    out: Path,
    tokens: int,
    corpus: Corpus,
    site: str,
    source: str,
) -> None:
    s = acc.settings
    stats, contexts = summarize(acc, tokens)
    lens = logit_lens(backbone.model, dictionary.W_dec.detach(), s.logit_lens)
    if lens is not None:
        stats.update(lens)
    ids = [t[t >= 0].unique() for t in (contexts["top_tokens"], contexts["quantile_tokens"])]
    if lens is not None:
        ids += [lens["logit_top_ids"].unique(), lens["logit_bottom_ids"].unique()]
    vocab_ids = torch.cat(ids).unique().tolist() if ids else []
    strings = backbone.tokenizer.batch_decode([[i] for i in vocab_ids]) if vocab_ids else []
    meta = {
        **store_meta(dictionary, s, site, source),
        "corpus": {"dataset": corpus.name, "tokens": tokens, "context_size": corpus.context_size},
        "logit_lens": 0 if lens is None else lens["logit_top_ids"].shape[1],
        "modality": "text",
        "quantiles": quantiles_kind(acc),
        "correlation": "jaccard",
        "correlation_sample": correlation_kind(acc, tokens),
    }
    write_store(out, meta, stats, contexts, dict(zip(map(str, vocab_ids), strings, strict=True)))
