"""Which share of a stream this process serves, under DDP and data-loader workers."""

from __future__ import annotations

import hashlib

import torch


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, or ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def workers() -> tuple[int, int]:
    """``(worker id, number of workers)`` inside a DataLoader worker, else ``(0, 1)``."""
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def shard() -> tuple[int, int]:
    """``(shard, num_shards)`` over every (rank, worker) pair: take items ``shard::num_shards``."""
    rank, ranks = world()
    worker, count = workers()
    return rank * count + worker, ranks * count


def stable_seed(*values: int | str) -> int:
    """A seed from ``values``, the same in every process and Python version (not ``hash()``).

    Example:
        >>> stable_seed(0, "rows", 3) == stable_seed(0, "rows", 3)
        True
    """
    digest = hashlib.blake2b(repr(values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**62 - 1)
