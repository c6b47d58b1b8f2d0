"""A shuffling buffer of activation rows, so batches mix tokens from many contexts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_interp.backbones.devices import to_device
from lightning_interp.errors import ConfigError, ShapeMismatchError

Rows = Tensor | dict[str, Tensor]
_SINGLE = ""  # key of the contents when rows are one tensor rather than a dict


class ShufflingBuffer:
    """Holds activation rows and hands out uniformly random batches of them.

    Consecutive tokens of one context are strongly correlated; training on them in order
    biases every step. The buffer is filled with rows from many contexts and each batch
    is a uniform random draw without replacement from everything it holds. It is meant to
    be refilled when half empty (:attr:`needs_refill`), so each batch mixes old and new
    contexts.

    Rows are one tensor ``[n, ...]`` or a dict of aligned tensors (several sites, plus
    any bookkeeping column) sharing the leading dimension. New rows are shuffled in
    lazily, by one permutation at the first :meth:`take` after :meth:`add`: a uniformly
    shuffled buffer read from the end is the same as drawing uniformly at random, at the
    cost of one pass per refill instead of one per batch.

    Args:
        capacity_tokens: Number of rows the buffer is filled up to. A refill may overshoot
            it by less than the rows of one :meth:`add`.
        seed: Seed of the shuffling; the same adds and takes give the same batches.

    Example:
        >>> buffer = ShufflingBuffer(8, seed=0)
        >>> buffer.add(torch.arange(8.0).unsqueeze(1))
        >>> buffer.take(3).shape, len(buffer), buffer.needs_refill
        (torch.Size([3, 1]), 5, False)
    """

    def __init__(self, capacity_tokens: int, *, seed: int = 0) -> None:
        if capacity_tokens < 1:
            raise ConfigError(f"capacity_tokens must be positive, got {capacity_tokens}")
        self.capacity = capacity_tokens
        self.generator = torch.Generator().manual_seed(seed)
        self._stored: dict[str, Tensor] | None = None  # shuffled, taken from the end
        self._pending: list[dict[str, Tensor]] = []  # added since the last shuffle
        self._single: bool | None = None
        self._size = 0

    def __len__(self) -> int:
        return self._size

    @property
    def needs_refill(self) -> bool:
        """True when the buffer is at most half full."""
        return 2 * self._size <= self.capacity

    @property
    def is_full(self) -> bool:
        """True when the buffer holds at least ``capacity_tokens`` rows."""
        return self._size >= self.capacity

    def add(self, rows: Rows) -> None:
        """Add rows (a tensor, or a dict of aligned tensors with the same keys each time).

        Raises:
            ShapeMismatchError: When the rows do not match earlier ones in keys, trailing
                shape or dtype, or the tensors of a dict differ in length.
        """
        single = isinstance(rows, Tensor)
        named = {_SINGLE: rows} if single else dict(rows)
        if not single and (not isinstance(rows, Mapping) or _SINGLE in named or not named):
            raise ShapeMismatchError("rows must be a tensor or a non-empty dict of named tensors")
        lengths = {t.shape[0] if t.ndim else -1 for t in named.values()}
        if len(lengths) != 1 or -1 in lengths:
            raise ShapeMismatchError(
                f"rows must share their leading dimension, got shapes "
                f"{ {k: tuple(t.shape) for k, t in named.items()} }"
            )
        reference = self._reference()
        if reference is None:
            self._single = single
        elif single != self._single or list(named) != list(reference):
            raise ShapeMismatchError(
                f"rows have keys {list(named)}, the buffer holds {list(reference)}"
            )
        else:
            for key, tensor in named.items():
                old = reference[key]
                if tensor.shape[1:] != old.shape[1:] or tensor.dtype != old.dtype:
                    raise ShapeMismatchError(
                        f"rows {key or ''} are {tuple(tensor.shape[1:])} {tensor.dtype}, the "
                        f"buffer holds {tuple(old.shape[1:])} {old.dtype}"
                    )
        (length,) = lengths
        if length:
            self._pending.append(named)
            self._size += length

    def take(self, batch_size: int) -> Rows:
        """Remove and return ``batch_size`` rows drawn uniformly at random.

        Raises:
            ConfigError: When fewer than ``batch_size`` rows are held.
        """
        if not 0 < batch_size <= self._size:
            raise ConfigError(f"cannot take {batch_size} rows from a buffer holding {self._size}")
        if self._pending:
            self._shuffle()
        assert self._stored is not None
        start = self._size - batch_size
        # Clone: a view would pin (and, across processes, ship) the whole storage.
        batch = {key: t[start:].clone() for key, t in self._stored.items()}
        self._stored = {key: t[:start] for key, t in self._stored.items()}
        self._size = start
        return batch[_SINGLE] if self._single else batch

    def rows(self) -> Rows:
        """Everything held, in storage order (the next :meth:`take` reads from the end).

        Returns views when nothing was added since the last take; treat them as read-only.
        """
        parts = ([self._stored] if self._stored is not None else []) + self._pending
        if not parts:
            raise ConfigError("the buffer has never held rows")
        if len(parts) == 1:
            named = dict(parts[0])
        else:
            named = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
        return named[_SINGLE] if self._single else named

    def column(self, key: str) -> Tensor:
        """One tensor of a dict buffer, in storage order, without copying the others."""
        parts = ([self._stored] if self._stored is not None else []) + self._pending
        if not parts or self._single or key not in parts[0]:
            raise ConfigError(f"the buffer holds no column {key!r}")
        tensors = [part[key] for part in parts]
        return tensors[0] if len(tensors) == 1 else torch.cat(tensors)

    def _reference(self) -> dict[str, Tensor] | None:
        if self._stored is not None:
            return self._stored
        return self._pending[0] if self._pending else None

    def _shuffle(self) -> None:
        parts = ([self._stored] if self._stored is not None else []) + self._pending
        order = torch.randperm(self._size, generator=self.generator)
        # Columns may live on different devices (GPU activations beside CPU row ids): one
        # asynchronous copy of the permutation per device.
        orders = {order.device: order}
        shuffled = {}
        for key in parts[0]:
            joined = torch.cat([part[key] for part in parts]) if len(parts) > 1 else parts[0][key]
            if joined.device not in orders:
                orders[joined.device] = to_device(order, joined.device)
            shuffled[key] = joined[orders[joined.device]]
        self._stored, self._pending = shuffled, []

    def to(self, device: str | torch.device) -> ShufflingBuffer:
        """Move the held rows to ``device`` in place (order and shuffling state unchanged)."""
        if self._stored is not None:
            self._stored = {key: t.to(device) for key, t in self._stored.items()}
        self._pending = [{key: t.to(device) for key, t in part.items()} for part in self._pending]
        return self

    def state_dict(self) -> dict[str, Any]:
        """The shuffling state (RNG and whether a shuffle is due), not the rows themselves."""
        return {"generator": self.generator.get_state(), "shuffle_pending": bool(self._pending)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the shuffling state saved by :meth:`state_dict`.

        The rows are not part of it: add the same rows in the same order first (as
        :meth:`rows` listed them), then load the state. When no shuffle was due at saving,
        the re-added rows count as already shuffled.
        """
        self.generator.set_state(state["generator"])
        if not state["shuffle_pending"] and self._pending:
            parts = ([self._stored] if self._stored is not None else []) + self._pending
            self._stored = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
            self._pending = []
