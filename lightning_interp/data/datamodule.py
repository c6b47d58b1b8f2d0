"""Serving activations to a Trainer: shuffled, resumable batches from a cache, or a live stream.

:class:`CachedActivations` turns an :class:`~lightning_interp.data.cache.ActivationCache` into
an ``IterableDataset`` of whole batches whose order depends only on ``(seed, epoch)``, and
which can resume mid-epoch. :class:`ActivationDataModule` serves it (or any live
``IterableDataset``) to a Trainer and stores the stream position in checkpoints.
"""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from lightning_interp.data import sharding
from lightning_interp.data.cache import ActivationCache
from lightning_interp.errors import ConfigError

Batch = Tensor | tuple[Tensor, Tensor] | dict[str, Tensor]


def _generator(*values: int | str) -> torch.Generator:
    # A stable seed, so a resumed run (another process) reshuffles alike.
    return torch.Generator().manual_seed(sharding.stable_seed(*values))


class CachedActivations(IterableDataset):
    """Batches of cached activations in a shuffled order fixed by ``(seed, epoch)``.

    Each epoch permutes the shards, takes them ``shuffle_shards`` at a time, and permutes the
    rows of each such group, so a batch mixes rows of several shards while memory holds only
    a group or two. The epoch is one stream of batches; data-loader workers and DDP ranks each
    take every n-th batch of it (rank ``r`` of ``R`` takes batches ``r, r+R, …`` whatever its
    number of workers), and the stream is cut to a multiple of ``R`` batches so every rank
    steps equally. Use with ``DataLoader(dataset, batch_size=None)``.

    Every pass over the dataset draws the next epoch; ``set_epoch`` and ``load_state_dict``
    choose the next pass. With ``num_workers > 0`` workers iterate copies, so call
    ``set_epoch`` before each pass, or serve it through :class:`ActivationDataModule`, which
    does this and records the position in checkpoints.

    Args:
        cache: An :class:`ActivationCache` or its folder.
        batch_size: Rows per batch.
        sites: Sites to serve (default: all, in manifest order). One site yields tensors
            ``[batch, d]``; two yield ``(inputs, targets)`` in the order given; more yield
            dicts keyed by site.
        shuffle: Shuffle shards and rows (otherwise serve rows in cache order).
        seed: Base seed of the shuffle.
        drop_last: Drop the last, smaller batch of an epoch.
        apply_normalization: Multiply each site's rows by the scale recorded in the manifest.
        shuffle_shards: Shards whose rows are mixed together.
        start: First cache row served (for splits).
        stop: One past the last cache row served (default: the end).
    """

    def __init__(
        self,
        cache: ActivationCache | str | os.PathLike[str],
        *,
        batch_size: int,
        sites: Sequence[str] | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        apply_normalization: bool = False,
        shuffle_shards: int = 2,
        start: int = 0,
        stop: int | None = None,
    ) -> None:
        super().__init__()
        self.cache = cache if isinstance(cache, ActivationCache) else ActivationCache(cache)
        self.sites = list(sites) if sites is not None else self.cache.sites
        unknown = [site for site in self.sites if site not in self.cache.widths]
        if unknown or not self.sites:
            raise ConfigError(f"unknown sites {unknown}; this cache has {self.cache.sites}")
        stop = self.cache.total_tokens if stop is None else stop
        if not 0 <= start <= stop <= self.cache.total_tokens:
            raise ConfigError(
                f"rows {start}:{stop} are outside the cache's {self.cache.total_tokens}"
            )
        if batch_size <= 0 or shuffle_shards <= 0:
            raise ConfigError("batch_size and shuffle_shards must be positive")
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.drop_last, self.shuffle_shards = drop_last, shuffle_shards
        self.scales = self.cache.normalization if apply_normalization else {}
        self.rows = stop - start
        # (shard, first row, end row) of every shard's part inside [start, stop).
        offsets = self.cache.offsets
        self.segments = [
            (i, max(start, offsets[i]) - offsets[i], min(stop, offsets[i + 1]) - offsets[i])
            for i in range(self.cache.num_shards)
            if offsets[i + 1] > start and offsets[i] < stop
        ]
        self.epoch = 0
        self._start = 0
        self._position: tuple[int, int] | None = None

    def _num_batches(self, world: int) -> int:
        count = self.rows // self.batch_size
        if not self.drop_last:
            count = math.ceil(self.rows / self.batch_size)
        # Under DDP a rank with one more batch than the others would hang in all-reduce.
        return count - count % world

    def __len__(self) -> int:
        """Batches per epoch served by this process (this DDP rank, all its workers)."""
        world = sharding.world()[1]
        return self._num_batches(world) // world

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass draw ``epoch`` from its first batch."""
        self.load_state_dict({"epoch": epoch, "batches_yielded": 0})

    def state_dict(self) -> dict[str, int]:
        """Where the stream stands: ``{"epoch", "batches_yielded"}``.

        ``batches_yielded`` counts batches of the whole epoch stream (all ranks) handed out by
        the pass in this process; a finished epoch reads as the next one at 0.
        """
        epoch, done = self._position if self._position is not None else (self.epoch, self._start)
        if done >= self._num_batches(sharding.world()[1]):
            epoch, done = epoch + 1, 0
        return {"epoch": epoch, "batches_yielded": done}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Make the next pass continue from ``state`` (as returned by :meth:`state_dict`)."""
        epoch, done = state.get("epoch"), state.get("batches_yielded")
        if not isinstance(epoch, int) or not isinstance(done, int) or epoch < 0 or done < 0:
            raise ConfigError(f"expected {{'epoch': int, 'batches_yielded': int}}, got {state}")
        self.epoch, self._start, self._position = epoch, done, None

    def _groups(self, epoch: int) -> list[list[tuple[int, int, int]]]:
        order = list(range(len(self.segments)))
        if self.shuffle:
            order = torch.randperm(len(order), generator=_generator(self.seed, epoch)).tolist()
        segments = [self.segments[i] for i in order]
        return [
            segments[i : i + self.shuffle_shards]
            for i in range(0, len(segments), self.shuffle_shards)
        ]

    def _load_group(
        self, epoch: int, index: int, segments: list[tuple[int, int, int]]
    ) -> dict[str, Tensor]:
        rows = {
            site: torch.cat([self.cache.read_shard(i, site, lo, hi) for i, lo, hi in segments])
            for site in self.sites
        }
        if self.shuffle:
            count = next(iter(rows.values())).shape[0]
            # One permutation for every site keeps a transcoder's input and output rows aligned.
            perm = torch.randperm(count, generator=_generator(self.seed, epoch, "rows", index))
            rows = {site: tensor[perm] for site, tensor in rows.items()}
        return rows

    def _format(self, rows: dict[str, Tensor]) -> Batch:
        for site, scale in self.scales.items():
            if site in rows:
                # Scale in at least fp32, then round once to the stored dtype.
                wide = torch.promote_types(rows[site].dtype, torch.float32)
                rows[site] = (rows[site].to(wide) * scale).to(rows[site].dtype)
        if len(self.sites) == 1:
            return rows[self.sites[0]]
        if len(self.sites) == 2:
            return rows[self.sites[0]], rows[self.sites[1]]
        return rows

    def __iter__(self) -> Iterator[Batch]:
        rank, world = sharding.world()
        worker = torch.utils.data.get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        total = self._num_batches(world)
        epoch, start = self.epoch, self._start
        if start >= total:
            epoch, start = epoch + 1, 0
        self.epoch, self._start, self._position = epoch + 1, 0, (epoch, start)
        groups = self._groups(epoch)
        bounds = [0]
        for segments in groups:
            bounds.append(bounds[-1] + sum(hi - lo for _, lo, hi in segments))
        loaded: dict[int, dict[str, Tensor]] = {}
        # Worker w of rank r takes the rank's w-th, (w+W)-th, ... batch, so the DataLoader's
        # round-robin over workers hands the rank its batches in stream order.
        first = start + worker_id * world + rank
        for count, index in enumerate(range(first, total, world * workers), start=1):
            lo, hi = index * self.batch_size, min((index + 1) * self.batch_size, self.rows)
            group = bisect.bisect_right(bounds, lo) - 1
            pieces: dict[str, list[Tensor]] = {site: [] for site in self.sites}
            while group < len(groups) and bounds[group] < hi:
                if group not in loaded:
                    loaded[group] = self._load_group(epoch, group, groups[group])
                begin, end = max(lo, bounds[group]), min(hi, bounds[group + 1])
                for site in self.sites:
                    pieces[site].append(
                        loaded[group][site][begin - bounds[group] : end - bounds[group]]
                    )
                group += 1
            # Batches only move forward: drop groups this one has passed.
            for old in [g for g in loaded if g < group - 1]:
                del loaded[old]
            batch = {site: torch.cat(parts) for site, parts in pieces.items()}
            # Counted before the yield: a consumer that stops here has received this batch.
            self._position = (epoch, min(start + count * world, total))
            yield self._format(batch)


class _PassLoader(DataLoader):
    """A DataLoader that calls ``on_pass()`` in this process before each pass starts."""

    def __init__(self, dataset: Any, *, on_pass: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.on_pass = on_pass

    def __iter__(self) -> Any:
        # Runs before workers copy the dataset, so the epoch pinned here is the one they draw.
        self.on_pass()
        return super().__iter__()


def _is_stream(dataset: Any) -> bool:
    """Whether the dataset keeps an ``{"epoch", "batches_yielded"}`` state, as CachedActivations."""
    if not (hasattr(dataset, "state_dict") and hasattr(dataset, "load_state_dict")):
        return False
    state = dataset.state_dict()
    return isinstance(state, Mapping) and {"epoch", "batches_yielded"} <= set(state)


class ActivationDataModule(L.LightningDataModule):
    """Serves activations from a cache folder, or from live datasets, to a Trainer.

    With ``cache_dir``, training reads the cache shuffled (:class:`CachedActivations`) and
    the last ``val_tokens`` rows are held out for validation, read in order. With
    ``train_dataset`` (and optionally ``val_dataset``), any ``IterableDataset`` yielding whole
    batches is served as is. Checkpoints store the training stream's position, so resuming
    mid-epoch continues with exactly the batches an uninterrupted run would have seen.

    Args:
        cache_dir: Folder written by :class:`~lightning_interp.data.ActivationCacheWriter`.
        batch_size: Rows per batch (cache only; a live dataset batches itself).
        sites: Cache sites to serve: one for an SAE, two (inputs, targets) for a transcoder.
        val_tokens: Rows at the end of the cache held out for validation.
        shuffle: Shuffle the training rows.
        seed: Seed of the shuffle.
        shuffle_shards: Shards mixed together when shuffling.
        apply_normalization: Scale rows by the factors recorded in the cache manifest.
        train_dataset: A training ``IterableDataset``, or a callable that builds one.
        val_dataset: A validation ``IterableDataset``, or a callable that builds one.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        cache_dir: str | None = None,
        batch_size: int = 4096,
        sites: list[str] | None = None,
        val_tokens: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        shuffle_shards: int = 2,
        apply_normalization: bool = False,
        train_dataset: IterableDataset | Callable[[], IterableDataset] | None = None,
        val_dataset: IterableDataset | Callable[[], IterableDataset] | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if (cache_dir is None) == (train_dataset is None):
            raise ConfigError("give exactly one of cache_dir and train_dataset")
        if cache_dir is not None and val_dataset is not None:
            raise ConfigError(
                "with cache_dir, validation rows come from val_tokens, not val_dataset"
            )
        if val_tokens < 0 or num_workers < 0:
            raise ConfigError("val_tokens and num_workers must be >= 0")
        # Datasets may not be serialisable: checkpoints keep only the plain arguments.
        self.save_hyperparameters(ignore=["train_dataset", "val_dataset"])
        self.cache_dir, self.batch_size, self.sites = cache_dir, batch_size, sites
        self.val_tokens, self.shuffle, self.seed = val_tokens, shuffle, seed
        self.shuffle_shards, self.apply_normalization = shuffle_shards, apply_normalization
        self.num_workers = num_workers
        self._train_source, self._val_source = train_dataset, val_dataset
        self.train_data: IterableDataset | None = None
        self.val_data: IterableDataset | None = None
        self._pending_state: dict[str, Any] | None = None
        self._pass: dict[str, int] | None = None

    def setup(self, stage: str | None = None) -> None:
        """Open the cache (or build the live datasets) once."""
        if self.train_data is not None:
            return
        if self.cache_dir is not None:
            cache = ActivationCache(self.cache_dir)
            if self.val_tokens >= cache.total_tokens:
                raise ConfigError(
                    f"val_tokens={self.val_tokens} leaves no training rows in {self.cache_dir} "
                    f"({cache.total_tokens} rows)"
                )
            split = cache.total_tokens - self.val_tokens
            common = dict(
                batch_size=self.batch_size,
                sites=self.sites,
                apply_normalization=self.apply_normalization,
            )
            self.train_data = CachedActivations(
                cache,
                **common,
                shuffle=self.shuffle,
                seed=self.seed,
                shuffle_shards=self.shuffle_shards,
                stop=split,
            )
            if self.val_tokens:
                self.val_data = CachedActivations(
                    cache, **common, shuffle=False, drop_last=False, start=split
                )
        else:
            self.train_data = _build(self._train_source)
            self.val_data = _build(self._val_source)
        if self._pending_state is not None and hasattr(self.train_data, "load_state_dict"):
            self.train_data.load_state_dict(self._pending_state)

    def _begin_train_pass(self) -> None:
        dataset = self.train_data
        if not _is_stream(dataset):
            return
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
        elif self._pass is not None:
            state = {"epoch": self._pass["epoch"] + 1, "batches_yielded": 0}
        else:
            state = dataset.state_dict()
        dataset.load_state_dict(state)
        self._pass = dataset.state_dict()  # normalised: a finished epoch reads as the next

    def train_dataloader(self) -> DataLoader:
        """The training batches (``batch_size=None``: the dataset yields whole batches)."""
        self.setup("fit")
        return _PassLoader(
            self.train_data,
            on_pass=self._begin_train_pass,
            batch_size=None,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader | list:
        """The validation batches, or an empty list when there is no validation data."""
        self.setup("validate")
        if self.val_data is None:
            return []
        return DataLoader(self.val_data, batch_size=None, num_workers=self.num_workers)

    def state_dict(self) -> dict[str, Any]:
        """The training stream's position, for checkpoints."""
        dataset = self.train_data
        if dataset is None or not hasattr(dataset, "state_dict"):
            return {"train_dataset": self._pending_state} if self._pending_state else {}
        trainer = self.trainer
        if self._pass is None or trainer is None or not _is_stream(dataset):
            return {"train_dataset": dataset.state_dict()}
        # The dataset has run ahead of training (the DataLoader and Lightning prefetch, workers
        # iterate copies), so the position comes from the batches the trainer has processed.
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if done >= trainer.num_training_batches:
            state = {"epoch": self._pass["epoch"] + 1, "batches_yielded": 0}
        else:
            state = {"epoch": self._pass["epoch"], "batches_yielded": done * trainer.world_size}
        return {"train_dataset": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the training stream from a checkpoint's position."""
        state = state_dict.get("train_dataset")
        if state is None:
            return
        self._pending_state, self._pass = dict(state), None
        if self.train_data is not None and hasattr(self.train_data, "load_state_dict"):
            self.train_data.load_state_dict(state)


def _build(source: Any) -> IterableDataset | None:
    if source is None or isinstance(source, torch.utils.data.Dataset):
        return source
    if callable(source):
        return source()
    raise ConfigError(f"expected an IterableDataset or a callable building one, got {source!r}")
