"""One pass of one shard of an :class:`~lightning_interp.data.stream.ActivationStream`.

The shuffling buffer, its refills from the backbone, and the exact-resume state (see the
``Exact resume`` section of :mod:`~lightning_interp.data.stream`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import astuple, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_interp.backbones.devices import to_device
from lightning_interp.data import sharding
from lightning_interp.data.buffer import ShufflingBuffer
from lightning_interp.data.normalize import scale_rows
from lightning_interp.data.tokens import TextPosition
from lightning_interp.errors import ConfigError

if TYPE_CHECKING:
    from lightning_interp.data.stream import ActivationStream

Batch = dict[str, Tensor]  # site -> rows (see lightning_interp.data.batches)
ROW = "__row__"  # buffer column: the id of each row, its order of arrival on this shard
STATE_VERSION = 1


@dataclass(frozen=True)
class _Capture:
    """A capture batch, as far as resuming needs it."""

    index: int  # number of the capture batch in text order, over all shards
    document: int  # text position of its first context
    token: int
    first_row: int  # id of its first kept row
    num_rows: int


class _StreamIterator(Iterator[Batch]):
    """One pass of one shard over the stream, resumable from its state."""

    def __init__(
        self,
        stream: ActivationStream,
        shard: int,
        num_shards: int,
        limit: int | None,
        state: Mapping[str, Any] | None,
    ) -> None:
        self.stream = stream
        self.shard, self.num_shards, self.limit = shard, num_shards, limit
        self.buffer = ShufflingBuffer(
            stream.buffer_tokens, seed=sharding.stable_seed(stream.seed, shard)
        )
        self.yielded = 0
        self.next_row = 0
        self.text_done = False
        self.captures: list[_Capture] = []  # own capture batches that may still have rows held
        self.anchor: _Capture | None = None  # the last own capture batch read
        self._batches: Iterator[tuple[int, TextPosition, Tensor, Tensor]] | None = None
        # Restored at the first next(), not here: Lightning calls iter() once just to probe.
        self._initial = state
        self._started = False

    def __iter__(self) -> _StreamIterator:
        return self

    def __next__(self) -> Batch:
        if not self._started:
            self._started = True
            if self._initial is not None:
                if self.stream._pending_state is self._initial:
                    self.stream._pending_state = None
                self._restore(self._initial)
        batch_size = self.stream.batch_size
        if self.limit is not None and self.yielded >= self.limit:
            raise StopIteration
        if self.buffer.needs_refill and not self.text_done:
            target = self.buffer.capacity
            if self.limit is not None:
                # Near the end, capture no more than the remaining batches need.
                target = min(target, (self.limit - self.yielded) * batch_size)
            self._refill(target)
        if len(self.buffer) < batch_size:
            raise StopIteration
        rows = self.buffer.take(batch_size)
        del rows[ROW]
        self.yielded += 1
        rows = scale_rows(rows, self.stream._scales)
        return self.stream._format(self.stream._pinned(rows))

    def _next_own(self) -> tuple[int, TextPosition, Tensor, Tensor] | None:
        if self._batches is None:
            self._batches = self.stream._capture_batches(0, TextPosition(0, 0))
        after = -1 if self.anchor is None else self.anchor.index
        for item in self._batches:
            if item[0] % self.num_shards == self.shard and item[0] > after:
                return item
        return None

    def _refill(self, target: int) -> None:
        while len(self.buffer) < target:
            item = self._next_own()
            if item is None:
                self.text_done = True
                break
            index, position, input_ids, attention_mask = item
            rows = self.stream._rows(input_ids, attention_mask)
            count = next(iter(rows.values())).shape[0]
            capture = _Capture(index, *position, self.next_row, count)
            self.anchor = capture
            if count:
                rows[ROW] = torch.arange(self.next_row, self.next_row + count)
                self.buffer.add(rows)
                self.captures.append(capture)
            self.next_row += count
        if len(self.buffer):
            oldest = int(self.buffer.column(ROW).min())
            self.captures = [c for c in self.captures if c.first_row + c.num_rows > oldest]

    def state_dict(self) -> dict[str, Any]:
        if not self._started and self._initial is not None:
            return dict(self._initial)
        ids = self.buffer.column(ROW) if len(self.buffer) else torch.zeros(0, dtype=torch.long)
        captures = self.captures
        if captures:
            # Only batches that still have a row held need recapturing on restore.
            starts = torch.tensor([c.first_row for c in captures])
            hit = torch.zeros(len(captures), dtype=torch.bool)
            hit[torch.searchsorted(starts, ids, right=True) - 1] = True
            captures = [c for c, keep in zip(captures, hit.tolist(), strict=True) if keep]
        base = int(ids.min()) if len(ids) else 0
        relative = ids - base
        if len(ids) and int(relative.max()) < 2**31:
            relative = relative.to(torch.int32)  # halves the state; ids span a few buffers
        return {
            "version": STATE_VERSION,
            "config": self.stream._fingerprint(),
            "shard": self.shard,
            "num_shards": self.num_shards,
            "yielded": self.yielded,
            "next_row": self.next_row,
            "text_done": self.text_done,
            "anchor": None if self.anchor is None else list(astuple(self.anchor)),
            "captures": torch.tensor([astuple(c) for c in captures], dtype=torch.long).view(-1, 5),
            "row_base": base,
            "rows": relative.clone(),
            "buffer": self.buffer.state_dict(),
            "scales": self.stream.scales,
        }

    def _restore(self, state: Mapping[str, Any]) -> None:
        if (state["shard"], state["num_shards"]) != (self.shard, self.num_shards):
            raise ConfigError(
                f"the state is shard {state['shard']} of {state['num_shards']}, this iterator "
                f"is shard {self.shard} of {self.num_shards}; resume with the same number of "
                f"ranks and workers"
            )
        self.yielded, self.next_row = int(state["yielded"]), int(state["next_row"])
        self.text_done = bool(state["text_done"])
        self.captures = [_Capture(*row) for row in state["captures"].tolist()]
        self.anchor = None if state["anchor"] is None else _Capture(*state["anchor"])
        ids = state["rows"].long() + int(state["row_base"])
        if self.anchor is not None:
            start = self.captures[0] if self.captures else self.anchor
            position = TextPosition(start.document, start.token)
            self._batches = self.stream._capture_batches(start.index, position)
            content = self._recapture(ids)
            if content is not None:
                self.buffer.add(content)
        self.buffer.load_state_dict(state["buffer"])

    def _recapture(self, ids: Tensor) -> dict[str, Tensor] | None:
        """Run the backbone again on the live capture batches; the held rows, in order."""
        assert self._batches is not None and self.anchor is not None
        live = {c.index: c for c in self.captures}
        order = torch.argsort(ids)
        sorted_ids = ids[order]
        content: dict[str, Tensor] | None = None
        filled = 0
        for index, position, input_ids, attention_mask in self._batches:
            capture = live.get(index)
            if capture is not None:
                rows = self.stream._rows(input_ids, attention_mask)
                count = next(iter(rows.values())).shape[0]
                saved = (capture.document, capture.token, capture.num_rows)
                if (*position, count) != saved:
                    raise ConfigError(
                        f"capture batch {index} starts at {tuple(position)} with {count} rows, "
                        f"the saved run had {saved}: the text, tokenizer or sites changed"
                    )
                if content is None:
                    content = {
                        site: t.new_empty((len(ids), *t.shape[1:])) for site, t in rows.items()
                    }
                bounds = torch.tensor([capture.first_row, capture.first_row + count])
                low, high = torch.searchsorted(sorted_ids, bounds).tolist()
                where = order[low:high]
                offsets = sorted_ids[low:high] - capture.first_row
                for site, tensor in rows.items():
                    device = tensor.device
                    content[site][to_device(where, device)] = tensor[to_device(offsets, device)]
                filled += high - low
            if index >= self.anchor.index:
                break
        else:
            raise ConfigError("the text ended before the saved position: the text source changed")
        if filled != len(ids):
            raise ConfigError("the saved buffer rows do not match the saved capture batches")
        if content is not None:
            content[ROW] = ids
        return content
