"""Activations of a frozen backbone, streamed from text as shuffled batches of rows.

The pipeline: text -> token contexts (:func:`~lightning_interp.data.tokens.iter_packed`,
or one chat conversation a context) -> ``backbone.capture`` on *capture batches* of
``contexts_per_capture`` contexts -> positions of special tokens and padding dropped ->
:class:`~lightning_interp.data.buffer.ShufflingBuffer` (refilled when half empty) ->
batches of ``batch_size`` rows.

**Sharding.** Capture batches are numbered in text order; with ``W`` shards (DDP ranks
times DataLoader workers) shard ``s`` captures batches ``s, s + W, s + 2W, ...`` and has
its own buffer seeded by ``(seed, s)``. Every shard still tokenizes the whole text to find
its batches (cheap next to the forward passes it skips).

**Exact resume.** Every row in a buffer carries an id (its order of arrival on its
shard). :meth:`ActivationStream.state_dict` records the ids of the rows still held, in
storage order, the capture batches they came from (index, text position, first id, row
count), the last capture batch read, and the buffer's RNG state: a few bytes per
buffered row and no activations. Restoring re-runs the backbone on those capture batches
only (whole batches, so every forward has the shape it had, and bitwise the same
result), puts each row back where it was, and skips the text before the oldest of them
without tokenizing it. Rows can outlive many refills (each survives one with probability
about 1/2), so the batches to recapture hold about ``(log2(rows per capture batch) + 1) /
2`` buffer-fulls of tokens (measured: 3.5 for 64-row captures, 6 for 2048), however long
the run so far.

**Devices.** The backbone runs where it is (a data module puts it on the trainer's root
device); buffer and batches stay there by default, and the loop never waits for the GPU
(kept positions come from the CPU token ids; copies are async from pinned memory).
``device="cpu"`` keeps a large buffer in host memory and pins the batches instead.

**Scaling.** ``scales`` (site -> factor) multiplies each batch's rows as it leaves the
buffer (the buffer holds raw activations); the factors are part of the saved state, so a
resumed run scales as the saved one did (see :mod:`~lightning_interp.data.normalize`).

Lightning saves and restores the state when the stream is the train loader. It has no
look-ahead to undo: with ``total_tokens`` set the stream has a length and Lightning does
not prefetch; without one, Lightning fetches a batch ahead and a checkpoint's state is one
batch past the last trained one. With DataLoader workers each worker holds its own state,
which the stream object of the main process does not see.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import IterableDataset

from lightning_interp._dtypes import dtype_from_name
from lightning_interp.backbones.devices import to_device
from lightning_interp.backbones.special_tokens import special_token_ids
from lightning_interp.data import sharding
from lightning_interp.data.cache_format import check_scales
from lightning_interp.data.renamed import warn_ignored
from lightning_interp.data.stream_iterator import STATE_VERSION, Batch, _StreamIterator
from lightning_interp.data.tokens import Separator, TextPosition, iter_batches
from lightning_interp.errors import ConfigError

# Settings a saved state must agree with (besides sites and dtype).
_SETTINGS = (
    "batch_size context_size contexts_per_capture buffer_tokens total_tokens chat column "
    "prepend_bos separator exclude_special_tokens seed"
).split()


class ActivationStream(IterableDataset):
    """Shuffled batches of activation rows captured from a frozen backbone.

    Use it with ``DataLoader(stream, batch_size=None)`` or pass it to ``trainer.fit``
    directly; each item is already a batch. It has ``state_dict`` / ``load_state_dict``
    (Lightning saves and restores them when the stream is the train loader), and a
    length when ``total_tokens`` is set.

    Args:
        backbone: A :class:`~lightning_interp.backbones.Backbone`.
        texts: Documents (strings), or conversations (lists of ``{"role", "content"}``
            messages) when ``chat``. Must be re-iterable (a list, a dataset) or a
            callable returning a fresh iterator.
        sites: The site(s) to read; globs work. Batches are dicts ``{site: [batch_size,
            d]}`` by canonical site name, in this order (two sites are a transcoder's
            (inputs, targets); see :mod:`~lightning_interp.data.batches`).
        batch_size: Rows per batch.
        context_size: Tokens per context (BOS included).
        contexts_per_capture: Contexts per backbone forward.
        buffer_tokens: Rows the shuffling buffer is filled up to when half empty.
        total_tokens: Stop after this many rows over all DDP ranks (rounded down to
            whole batches per rank, the same number on every rank). ``None``: until the
            text runs out.
        chat: Apply the chat template, one conversation per context.
        sequential_chat: FAST (Li et al. 2025; see :mod:`~lightning_interp.data.tokens`):
            each conversation through the chat template as one sequence of its own,
            whole and in order, truncated at ``context_size`` and padded only to the
            longest of its capture batch; implies ``chat``.
        column: Key of the text (or conversation) when items are records.
        prepend_bos: Start every packed context with BOS.
        separator: Token between packed documents (``"eos"``, ``"bos"``, an id, None).
        exclude_special_tokens: Drop rows at special tokens (BOS, EOS, chat markers).
            Padding is always dropped. ``None``: drop them, except with
            ``sequential_chat``, where FAST trains on the template's special tokens too.
        seed: Seed of the shuffling.
        dtype: Dtype of the returned activations (default: the model's).
        device: Where the buffer lives and batches are returned (default: the backbone's
            device, read at each capture, so moving the backbone moves the stream).
        autocast_dtype: Run the backbone under autocast in this dtype.
        tokenizer: Overrides ``backbone.tokenizer``.
        scales: Factor each site's rows are multiplied by (default: none, raw
            activations); see :attr:`scales`.
        batch_format: Deprecated and ignored: batches are always dicts by site.
    """

    def __init__(
        self,
        backbone: Any,
        texts: Iterable[Any] | Callable[[], Iterable[Any]],
        sites: str | Sequence[str],
        *,
        batch_size: int = 4096,
        context_size: int = 128,
        contexts_per_capture: int = 32,
        buffer_tokens: int = 2**17,
        total_tokens: int | None = None,
        chat: bool = False,
        sequential_chat: bool = False,
        column: str | None = None,
        prepend_bos: bool = True,
        separator: Separator = "eos",
        exclude_special_tokens: bool | None = None,
        seed: int = 0,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        autocast_dtype: str | torch.dtype | None = None,
        tokenizer: Any = None,
        scales: Mapping[str, float] | None = None,
        batch_format: str | None = None,
    ) -> None:
        super().__init__()
        if batch_format is not None:
            warn_ignored("ActivationStream's batch_format", "batches are dicts keyed by site")
        for name, value in (
            ("batch_size", batch_size),
            ("context_size", context_size),
            ("contexts_per_capture", contexts_per_capture),
        ):
            if value < 1:
                raise ConfigError(f"{name} must be positive, got {value}")
        if buffer_tokens < batch_size or (total_tokens is not None and total_tokens < batch_size):
            raise ConfigError(
                f"buffer_tokens ({buffer_tokens}) and total_tokens ({total_tokens}) must be at "
                f"least batch_size ({batch_size})"
            )
        if not callable(texts) and iter(texts) is texts:
            raise ConfigError(
                "texts is a one-shot iterator; resuming needs to read it again: pass a list, "
                "a dataset, or a callable returning a fresh iterator"
            )
        self.tokenizer = tokenizer if tokenizer is not None else backbone.tokenizer
        if self.tokenizer is None:
            raise ConfigError("the stream needs a tokenizer: Backbone(model, tokenizer)")
        self.backbone = backbone
        self.texts = texts
        self.sites = backbone.resolve_sites(sites)
        if not self.sites:
            raise ConfigError(f"sites {sites!r} match nothing in the backbone")
        self.batch_size, self.context_size = batch_size, context_size
        self.contexts_per_capture, self.buffer_tokens = contexts_per_capture, buffer_tokens
        self.total_tokens, self.seed = total_tokens, seed
        self.chat, self.column = chat, column
        self.sequential_chat = sequential_chat
        self.prepend_bos, self.separator = prepend_bos, separator
        if exclude_special_tokens is None:
            exclude_special_tokens = not sequential_chat
        self.exclude_special_tokens = exclude_special_tokens
        self.dtype = None if dtype is None else dtype_from_name(dtype)
        self.device = None if device is None else torch.device(device)
        self.autocast_dtype = autocast_dtype
        self._special = torch.tensor(special_token_ids(self.tokenizer), dtype=torch.long)
        # Not "_iterator": Lightning resets that attribute of loaders when fit ends.
        self._active: _StreamIterator | None = None
        self._pending_state: dict[str, Any] | None = None
        self.scales = scales or {}

    @property
    def scales(self) -> dict[str, float]:
        """Site -> factor its rows are multiplied by; empty when batches are raw activations.

        With :attr:`sites`, what :func:`~lightning_interp.modules.scales.record_activation_scales`
        reads from a training dataset, so the trained dictionary's provenance records the
        factors and the export folds them into the weights.
        """
        return dict(self._scales)

    @scales.setter
    def scales(self, scales: Mapping[str, float]) -> None:
        self._scales = check_scales(dict(scales), self.sites, "ActivationStream scales")

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Batch]:
        shard, num_shards, limit = self._shard()
        self._active = _StreamIterator(self, shard, num_shards, limit, self._pending_state)
        return self._active

    def __len__(self) -> int:
        if self.total_tokens is None:
            raise TypeError("an ActivationStream has a length only when total_tokens is set")
        return self._batches_per_rank(sharding.world()[1])

    def _batches_per_rank(self, ranks: int) -> int:
        assert self.total_tokens is not None
        return self.total_tokens // self.batch_size // ranks

    def _shard(self) -> tuple[int, int, int | None]:
        rank, ranks = sharding.world()
        worker, workers = sharding.workers()
        limit = None
        if self.total_tokens is not None:
            per_rank = self._batches_per_rank(ranks)
            limit = per_rank // workers + (worker < per_rank % workers)
        return rank * workers + worker, ranks * workers, limit

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands: after the last batch it yielded (no activations).

        Under DDP every rank must call it (Lightning does, when it saves a checkpoint): the
        ranks' states are gathered, because only rank 0 writes the checkpoint and each
        rank's stream stands somewhere else.
        """
        state = self._local_state_dict()
        rank, ranks = sharding.world()
        if ranks == 1:
            return state
        gathered: list[Any] = [None] * ranks
        torch.distributed.all_gather_object(gathered, state)
        return {"version": STATE_VERSION, "ranks": gathered}

    def _local_state_dict(self) -> dict[str, Any]:
        if self._active is not None:
            return self._active.state_dict()
        if self._pending_state is not None:
            return dict(self._pending_state)
        shard, num_shards, limit = self._shard()
        return _StreamIterator(self, shard, num_shards, limit, None).state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from ``state`` in the next iteration (restored at its first batch).

        Raises:
            ConfigError: When the state comes from a stream with other settings, or from a
                run with another number of DDP ranks.
        """
        if "ranks" in state:
            rank, ranks = sharding.world()
            if len(state["ranks"]) != ranks:
                raise ConfigError(
                    f"the checkpoint holds the stream positions of {len(state['ranks'])} DDP "
                    f"ranks but this run has {ranks}; resume with the same number of devices"
                )
            state = state["ranks"][rank]
        if state.get("version") != STATE_VERSION:
            raise ConfigError(f"unknown ActivationStream state version {state.get('version')}")
        saved, current = state["config"], self._fingerprint()
        changed = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
        if changed:
            raise ConfigError(
                f"the state comes from a stream with other settings: {changed} differ (saved "
                f"{[saved.get(k) for k in changed]}, now {[current.get(k) for k in changed]})"
            )
        saved_scales = dict(state.get("scales", {}))  # states older than scaling hold none
        if self._scales and saved_scales != self._scales:
            raise ConfigError(
                f"the state comes from a stream scaling by {saved_scales}, this one scales by "
                f"{self._scales}; give the same scales, or none to take the saved ones"
            )
        self.scales = saved_scales  # a resumed run must see the activations it trained on
        self._pending_state = dict(state)
        self._active = None

    def _fingerprint(self) -> dict[str, Any]:
        settings = {name: getattr(self, name) for name in _SETTINGS}
        if self.sequential_chat:  # only when on: states saved before the option still resume
            settings["sequential_chat"] = True
        return {**settings, "sites": list(self.sites), "dtype": str(self.dtype)}

    def __getstate__(self) -> dict[str, Any]:
        # A live iterator holds generators, which cannot be sent to worker processes.
        return {**self.__dict__, "_active": None}

    # ------------------------------------------------------------------ pipeline
    def rows_in_text_order(self, limit: int) -> Iterator[dict[str, Tensor]]:
        """Raw kept rows of the first ``limit`` positions in text order, unshuffled.

        Over the whole text (every shard's capture batches), with the positions training
        keeps (no padding; no special tokens unless ``exclude_special_tokens=False``): the
        same rows on every rank and worker, whatever the seed. What a fixed statistic of the
        stream, such as its normalisation scale, is estimated from.
        """
        seen = 0
        for _, _, input_ids, attention_mask in self._capture_batches(0, TextPosition(0, 0)):
            if seen >= limit:
                break
            rows = self._rows(input_ids, attention_mask)
            take = min(next(iter(rows.values())).shape[0], limit - seen)
            seen += take
            yield {site: tensor[:take] for site, tensor in rows.items()}

    def _capture_batches(
        self, index: int, start: TextPosition
    ) -> Iterator[tuple[int, TextPosition, Tensor, Tensor]]:
        """``(index, position, ids, mask)`` of capture batches from ``start`` on, not yet run."""
        documents = self.texts() if callable(self.texts) else self.texts
        if self.column is not None:
            documents = (item[self.column] for item in documents)
        batches = iter_batches(
            documents,
            self.tokenizer,
            self.context_size,
            self.contexts_per_capture,
            chat=self.chat,
            sequential_chat=self.sequential_chat,
            prepend_bos=self.prepend_bos,
            separator=self.separator,
            start=start,
        )
        for offset, batch in enumerate(batches):
            yield index + offset, *batch

    @property
    def output_device(self) -> torch.device:
        """Where batches are returned: ``device``, else the backbone's current device."""
        return self.device if self.device is not None else self.backbone.device

    @torch.no_grad()
    def _rows(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        """Run the backbone on one capture batch; the activations at kept positions."""
        acts = self.backbone.capture(
            {"input_ids": input_ids, "attention_mask": attention_mask},
            self.sites,
            dtype=self.dtype,
            device=self.device,
            autocast_dtype=self.autocast_dtype,
        )
        # Kept positions come from the (CPU) token ids: a boolean mask applied on the GPU
        # would synchronise to count its rows; an index computed here does not.
        keep = attention_mask.bool()
        if self.exclude_special_tokens:
            keep &= ~torch.isin(input_ids, self._special)
        index = keep.reshape(-1).nonzero().squeeze(1)
        rows = {}
        for site in self.sites:
            flat = acts[site].reshape(-1, acts[site].shape[-1])  # [B, T, d] or [B * T, d]
            rows[site] = flat.index_select(0, to_device(index, flat.device))
        return rows

    def _pinned(self, rows: dict[str, Tensor]) -> dict[str, Tensor]:
        # Host batches for a GPU run: pinned, so the trainer's copy to the GPU is async.
        if self.device is None or self.device.type != "cpu":
            return rows
        if self.backbone.device.type != "cuda":
            return rows
        return {key: tensor.pin_memory() for key, tensor in rows.items()}

    def _format(self, rows: dict[str, Tensor]) -> Batch:
        return {site: rows[site] for site in self.sites}
