"""On-disk activation cache: safetensors shards plus a ``manifest.json``, written once, read many.

A cache folder holds ``shard-00000.safetensors``, ``shard-00001.safetensors``, … (one tensor
per site, keyed by site name, rows aligned across sites) and ``manifest.json``, which lists
the shards. Every file is written atomically and the manifest last, so a folder with a
manifest is complete and a folder without one is not a cache (see
:mod:`~lightning_interp.data.cache_writer`). Shards are read memory-mapped through
``safetensors.safe_open``; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from lightning_interp._io import check_folder_name
from lightning_interp.data.cache_format import (
    CACHE_FORMAT,
    CACHE_VERSION,
    MANIFEST_NAME,
    SAFETENSORS_DTYPES,
    check_scales,
    expected_norm_scale,
)
from lightning_interp.data.cache_writer import ActivationCacheWriter
from lightning_interp.dictionaries.config import dtype_from_name
from lightning_interp.errors import ConfigError, CorruptFileError, UnsafePathError

__all__ = ["ActivationCache", "ActivationCacheWriter", "expected_norm_scale"]


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
