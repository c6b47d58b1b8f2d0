"""Serving activations to a Trainer: shuffled, resumable batches from a cache, or a live stream.

:class:`ActivationDataModule` serves an activation cache through
:class:`~lightning_interp.data.cache.CachedActivations` (or any live ``IterableDataset``) to
a Trainer and stores the stream position in checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from lightning_interp.backbones import Backbone
from lightning_interp.data.cache import ActivationCache
from lightning_interp.data.cache import CachedActivations as _CachedActivations  # see below
from lightning_interp.data.renamed import moved_names
from lightning_interp.errors import ConfigError

# CachedActivations lived here before it moved beside the cache (importable for one release).
__getattr__ = moved_names(
    __name__, {"CachedActivations": "lightning_interp.data.cache:CachedActivations"}
)


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

    With ``cache_dir``, training reads the cache shuffled
    (:class:`~lightning_interp.data.cache.CachedActivations`) and the last ``val_tokens``
    rows are held out for validation, read in order. With ``train_dataset`` (and optionally
    ``val_dataset``), any ``IterableDataset`` yielding whole batches is served as is.
    Checkpoints store the training stream's position, so resuming mid-epoch continues with
    exactly the batches an uninterrupted run would have seen.

    It is an :class:`~lightning_interp.data.source.ActivationSource` without a backbone: a
    cache's sites, widths and scales come from its manifest, and its provenance from the
    manifest metadata's ``"provenance"`` entry, if the writer recorded one. A live dataset
    gives its ``sites`` and ``scales`` if it announces them (as
    :class:`~lightning_interp.data.ActivationStream` does), and no widths.

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
        self.cache_dir, self.batch_size, self._sites = cache_dir, batch_size, sites
        self.val_tokens, self.shuffle, self.seed = val_tokens, shuffle, seed
        self.shuffle_shards, self.apply_normalization = shuffle_shards, apply_normalization
        self.num_workers = num_workers
        self._train_source, self._val_source = train_dataset, val_dataset
        self.train_data: IterableDataset | None = None
        self.val_data: IterableDataset | None = None
        self._cache: ActivationCache | None = None
        # A cache holds activations, not the model that computed them.
        self.backbone: Backbone | None = None
        self._pending_state: dict[str, Any] | None = None
        self._pass: dict[str, int] | None = None

    def setup(self, stage: str | None = None) -> None:
        """Open the cache (or build the live datasets) once."""
        if self.train_data is not None:
            return
        if self.cache_dir is not None:
            cache = self._cache = ActivationCache(self.cache_dir)
            if self.val_tokens >= cache.total_tokens:
                raise ConfigError(
                    f"val_tokens={self.val_tokens} leaves no training rows in {self.cache_dir} "
                    f"({cache.total_tokens} rows)"
                )
            split = cache.total_tokens - self.val_tokens
            common = dict(
                batch_size=self.batch_size,
                sites=self._sites,
                apply_normalization=self.apply_normalization,
            )
            self.train_data = _CachedActivations(
                cache,
                **common,
                shuffle=self.shuffle,
                seed=self.seed,
                shuffle_shards=self.shuffle_shards,
                stop=split,
            )
            if self.val_tokens:
                self.val_data = _CachedActivations(
                    cache, **common, shuffle=False, drop_last=False, start=split
                )
        else:
            self.train_data = _build(self._train_source)
            self.val_data = _build(self._val_source)
        if self._pending_state is not None and hasattr(self.train_data, "load_state_dict"):
            self.train_data.load_state_dict(self._pending_state)

    # ------------------------------------------------------------------ ActivationSource
    @property
    def sites(self) -> list[str]:
        """The sites served, in batch order (opens the cache if needed)."""
        self.setup()
        return [str(site) for site in getattr(self.train_data, "sites", None) or []]

    @property
    def site_widths(self) -> dict[str, int]:
        """Each served site's width, from the cache manifest (none for a live dataset)."""
        self.setup()
        if self._cache is None:
            return {}
        return {site: self._cache.widths[site] for site in self.sites}

    @property
    def provenance(self) -> dict[str, Any]:
        """The ``"provenance"`` entry of the cache manifest's metadata (empty if none)."""
        self.setup()
        recorded = self._cache.metadata.get("provenance") if self._cache is not None else None
        return dict(recorded) if isinstance(recorded, Mapping) else {}

    @property
    def scales(self) -> dict[str, float]:
        """Site -> factor batches are multiplied by (``apply_normalization``; else empty)."""
        self.setup()
        scales, sites = getattr(self.train_data, "scales", None) or {}, self.sites
        return {str(site): float(scale) for site, scale in scales.items() if site in sites}

    def downstream_inputs(self) -> list[dict[str, Tensor]]:
        """None: a cache holds no token contexts to splice into a backbone."""
        return []

    # ------------------------------------------------------------------ loaders
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
