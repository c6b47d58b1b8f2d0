"""On-disk activation cache: safetensors shards plus a ``manifest.json``, written once, read many.

A cache folder holds ``shard-00000.safetensors``, ``shard-00001.safetensors``, … (one tensor
per site, keyed by site name, rows aligned across sites) and ``manifest.json``, which lists
the shards. Every file is written atomically and the manifest last, so a folder with a
manifest is complete and a folder without one is not a cache (see
:mod:`~lightning_interp.data.cache_writer`). Shards are read memory-mapped through
``safetensors.safe_open``; nothing is ever unpickled.

:class:`ActivationCache` reads a cache folder; :class:`CachedActivations` serves it as an
``IterableDataset`` of whole batches whose order depends only on ``(seed, epoch)``, and which
can resume mid-epoch.
"""

from __future__ import annotations

import bisect
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor
from torch.utils.data import IterableDataset

from lightning_interp._dtypes import dtype_from_name
from lightning_interp._io import check_folder_name
from lightning_interp.data import sharding
from lightning_interp.data.cache_format import (
    CACHE_FORMAT,
    CACHE_VERSION,
    MANIFEST_NAME,
    SAFETENSORS_DTYPES,
    check_scales,
    expected_norm_scale,
)
from lightning_interp.data.cache_writer import ActivationCacheWriter
from lightning_interp.errors import ConfigError, CorruptFileError, UnsafePathError

__all__ = ["ActivationCache", "ActivationCacheWriter", "CachedActivations", "expected_norm_scale"]


class ActivationCache:
    """A finished cache folder: the manifest, validated, and memory-mapped reads of its shards.

    Args:
        directory: Folder written by :class:`ActivationCacheWriter`.
        verify: Open every shard's header now (cheap: no data is read), so a missing,
            truncated or mismatched shard fails here rather than hours into training.

    Attributes:
        offsets: First global row of each shard, then the total row count.

    Raises:
        FileNotFoundError: the folder, its manifest or a shard is missing.
        CorruptFileError: the manifest or a shard cannot be parsed or contradicts the other.
    """

    def __init__(self, directory: str | os.PathLike[str], *, verify: bool = True) -> None:
        self.directory = Path(directory)
        path = self.directory / MANIFEST_NAME
        if not path.is_file():
            what = "does not exist" if not self.directory.is_dir() else f"has no {MANIFEST_NAME}"
            raise FileNotFoundError(
                f"activation cache {self.directory} {what}; write one with "
                f"ActivationCacheWriter (the manifest is written last, so a folder without one "
                f"holds an unfinished write)"
            )
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            self._manifest = self._validate(manifest)
        except (
            json.JSONDecodeError,
            UnicodeDecodeError,
            KeyError,
            TypeError,
            AttributeError,
        ) as err:
            raise CorruptFileError(f"{path} is not a valid cache manifest ({err!r})") from err
        sizes = [shard["tokens"] for shard in self._manifest["shards"]]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        for index, shard in enumerate(self._manifest["shards"]):
            if not (self.directory / shard["file"]).is_file():
                raise FileNotFoundError(
                    f"{self.directory / shard['file']} is missing but listed in {path}; the "
                    f"cache is incomplete: copy the whole folder again or rewrite the cache"
                )
            if verify:
                with self._open(index):
                    pass

    def _validate(self, manifest: Any) -> dict[str, Any]:
        where = self.directory / MANIFEST_NAME
        if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
            raise CorruptFileError(f"{where} is not a lightning-interp activation manifest")
        if manifest["version"] != CACHE_VERSION:
            raise CorruptFileError(
                f"{where} has format version {manifest['version']}; this lightning-interp "
                f"reads version {CACHE_VERSION} (upgrade it, or rewrite the cache)"
            )
        sites, widths, shards = manifest["sites"], manifest["widths"], manifest["shards"]
        if (
            not sites
            or sorted(widths) != sorted(sites)
            or not all(isinstance(widths[s], int) and widths[s] > 0 for s in sites)
        ):
            raise CorruptFileError(f"{where}: sites {sites} and widths {widths} disagree")
        try:
            dtype_from_name(manifest["dtype"])
            check_scales(manifest["normalization"], sites, "the manifest")
        except ConfigError as err:
            raise CorruptFileError(f"{where}: {err}") from err
        for shard in shards:
            # A name with a separator or ".." could point outside the cache folder.
            name, tokens = shard["file"], shard["tokens"]
            try:
                check_folder_name(name, "shard file name")
            except UnsafePathError as err:
                raise CorruptFileError(f"{where}: {err}") from err
            if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
                raise CorruptFileError(f"{where}: bad shard entry {shard}")
        if manifest["total_tokens"] != sum(shard["tokens"] for shard in shards):
            raise CorruptFileError(f"{where}: total_tokens does not match the shard sizes")
        if not isinstance(manifest["metadata"], dict):
            raise CorruptFileError(f"{where}: metadata must be an object")
        return manifest

    @property
    def sites(self) -> list[str]:
        """Site names, in the order they were written."""
        return list(self._manifest["sites"])

    @property
    def widths(self) -> dict[str, int]:
        """Activation width of each site."""
        return dict(self._manifest["widths"])

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of every shard."""
        return dtype_from_name(self._manifest["dtype"])

    @property
    def total_tokens(self) -> int:
        """Rows in the cache."""
        return int(self._manifest["total_tokens"])

    @property
    def num_shards(self) -> int:
        """Number of shard files."""
        return len(self._manifest["shards"])

    @property
    def metadata(self) -> dict[str, Any]:
        """The free-form metadata given to the writer."""
        return dict(self._manifest["metadata"])

    @property
    def normalization(self) -> dict[str, float]:
        """Recorded scale per site (sites without one are unscaled)."""
        return dict(self._manifest["normalization"])

    def _open(self, index: int) -> Any:
        path = self.directory / self._manifest["shards"][index]["file"]
        tokens = self._manifest["shards"][index]["tokens"]
        try:
            handle = safe_open(str(path), framework="pt")
            slices = {key: handle.get_slice(key) for key in handle.keys()}
            shapes = {key: piece.get_shape() for key, piece in slices.items()}
            dtypes = {piece.get_dtype() for piece in slices.values()}
        except (SafetensorError, OSError, ValueError) as err:
            raise CorruptFileError(
                f"{path} is not a readable safetensors shard ({err}); it may be truncated: "
                f"copy it again or rewrite the cache"
            ) from err
        expected = {site: [tokens, width] for site, width in self.widths.items()}
        if shapes != expected or dtypes - {SAFETENSORS_DTYPES[self.dtype]}:
            raise CorruptFileError(
                f"{path} holds {shapes} in {sorted(dtypes)}; the manifest says {expected} in "
                f"{self._manifest['dtype']}"
            )
        return handle

    def read_shard(self, index: int, site: str, start: int = 0, stop: int | None = None) -> Tensor:
        """Rows ``start:stop`` of one site in shard ``index``."""
        with self._open(index) as handle:
            return handle.get_slice(site)[start:stop]

    def read(self, site: str, start: int = 0, stop: int | None = None) -> Tensor:
        """Rows ``start:stop`` (global row indices, across shards) of one site."""
        if site not in self.widths:
            raise ConfigError(f"unknown site {site!r}; this cache has {self.sites}")
        stop = self.total_tokens if stop is None else stop
        if not 0 <= start <= stop <= self.total_tokens:
            raise ConfigError(f"rows {start}:{stop} are outside the cache's {self.total_tokens}")
        pieces = [torch.empty(0, self.widths[site], dtype=self.dtype)]
        for index in range(self.num_shards):
            lo, hi = self.offsets[index], self.offsets[index + 1]
            if hi > start and lo < stop:
                pieces.append(self.read_shard(index, site, max(start, lo) - lo, min(stop, hi) - lo))
        return torch.cat(pieces)


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
        sites: Sites to serve (default: all, in manifest order). Batches are dicts
            ``{site: [batch, d]}`` in this order (two sites are a transcoder's (inputs,
            targets); see :mod:`~lightning_interp.data.batches`).
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

    def _format(self, rows: dict[str, Tensor]) -> dict[str, Tensor]:
        for site, scale in self.scales.items():
            if site in rows:
                # Scale in at least fp32, then round once to the stored dtype.
                wide = torch.promote_types(rows[site].dtype, torch.float32)
                rows[site] = (rows[site].to(wide) * scale).to(rows[site].dtype)
        return rows

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
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
