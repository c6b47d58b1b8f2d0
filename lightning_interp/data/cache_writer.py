"""Writing an activation cache folder: one writer at a time, committed by one atomic rename.

The folder's ``manifest.json`` is the single commit point. Shards are written (each to a
temporary name, then renamed) under names no committed manifest lists, and only when the
writer closes is the new manifest renamed over the old one; the previous generation's
shards are deleted after that. So whatever happens before the rename (an exception, a
kill, a full disk) the folder still holds the previous complete cache, or no cache at all.
A lock file (:class:`~lightning_interp.data.lock.FolderLock`) keeps two writers out of one
folder; stray files of a killed writer are removed by the next one.
"""

from __future__ import annotations

import json
import os
import secrets
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from lightning_interp._dtypes import dtype_from_name, dtype_name
from lightning_interp._io import atomic_write, sync_folder
from lightning_interp.data.cache_format import (
    CACHE_FORMAT,
    CACHE_VERSION,
    MANIFEST_NAME,
    SHARD_GLOB,
    TEMP_GLOBS,
    check_scales,
)
from lightning_interp.data.lock import FolderLock
from lightning_interp.errors import ConfigError, EmptyCacheError, ShapeMismatchError


def _listed_shards(directory: Path) -> set[str] | None:
    """Shard files the committed manifest lists; ``None`` when it exists but is unreadable."""
    path = directory / MANIFEST_NAME
    if not path.exists():
        return set()
    try:
        return {str(shard["file"]) for shard in json.loads(path.read_text("utf-8"))["shards"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _cleanup(directory: Path, lock: FolderLock, written: list[str], created: bool) -> None:
    """Delete uncommitted shards, release the lock, remove a folder the writer created."""
    for name in written:
        (directory / name).unlink(missing_ok=True)
    written.clear()
    lock.release()
    if created:
        try:
            directory.rmdir()  # only if empty: never removes anything else
        except OSError:
            pass


class ActivationCacheWriter:
    """Writes aligned activation rows of one or more sites into a cache folder.

    Use as a context manager: on a clean exit the last partial shard and then the manifest
    are written; if the block raises, this writer's shards are deleted and the folder is as
    it was (the previous cache, if any, intact). The writer holds the folder's lock file
    from construction to close, so a second writer on the same folder is refused.

    With ``overwrite=True`` the new cache is built beside the old one (new shard names) and
    replaces it only when the writer closes, by renaming the new manifest over the old
    one: a writer killed before that leaves the old cache complete and readable.

    Args:
        directory: The cache folder (created if needed).
        sites: Site names, e.g. ``["layers.3.mlp_in", "layers.3.mlp_out"]`` for a transcoder.
        widths: Activation width of each site.
        dtype: Storage dtype (``"float32"``, ``"bfloat16"``, ``"float16"``, ``"float64"``).
        shard_tokens: Rows per shard file.
        metadata: JSON-serialisable provenance (backbone, dataset, context size, ...).
        normalization: Scale per site recorded in the manifest (see
            :func:`~lightning_interp.data.cache_format.expected_norm_scale`); activations are
            stored unscaled. May also be set later through the ``normalization`` attribute,
            before the writer closes.
        overwrite: Replace an existing cache in ``directory`` instead of refusing.

    Raises:
        FileExistsError: ``directory`` holds a cache and ``overwrite`` is False.
        FolderInUseError: another writer (alive) holds ``directory``.

    Example:
        >>> import tempfile
        >>> from lightning_interp.data.cache import ActivationCache
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     with ActivationCacheWriter(folder, sites=["resid"], widths={"resid": 4}) as w:
        ...         w.add(torch.randn(10, 4))
        ...     print(ActivationCache(folder).total_tokens)
        10
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        sites: Sequence[str],
        widths: Mapping[str, int],
        dtype: str = "float32",
        shard_tokens: int = 65536,
        metadata: Mapping[str, Any] | None = None,
        normalization: Mapping[str, float] | None = None,
        overwrite: bool = False,
    ) -> None:
        self.sites = list(sites)
        if not self.sites or len(set(self.sites)) != len(self.sites):
            raise ConfigError(f"sites must be a non-empty list of distinct names, got {sites}")
        if sorted(widths) != sorted(self.sites) or any(int(w) <= 0 for w in widths.values()):
            raise ConfigError(f"widths must give a positive width for each of {self.sites}")
        if shard_tokens <= 0:
            raise ConfigError(f"shard_tokens must be positive, got {shard_tokens}")
        self.widths = {site: int(widths[site]) for site in self.sites}
        self.dtype = dtype_from_name(dtype)
        self.shard_tokens = shard_tokens
        self.metadata = dict(metadata or {})
        try:
            json.dumps(self.metadata)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"metadata must be JSON-serialisable: {err}") from err
        self.normalization = dict(normalization or {})
        check_scales(self.normalization, self.sites, "ActivationCacheWriter")
        self.directory = Path(directory)
        created = not self.directory.exists()
        self.directory.mkdir(parents=True, exist_ok=True)
        lock = FolderLock(self.directory, "an ActivationCacheWriter")
        self._written: list[str] = []  # shard files of this writer not yet committed
        try:
            lock.acquire()
        except BaseException:
            _cleanup(self.directory, lock, [], created)
            raise
        # Runs once: at abort, at close, or when an unclosed writer is garbage collected.
        self._finalizer = weakref.finalize(
            self, _cleanup, self.directory, lock, self._written, created
        )
        try:
            if (self.directory / MANIFEST_NAME).exists() and not overwrite:
                raise FileExistsError(
                    f"{self.directory} already holds an activation cache ({MANIFEST_NAME}); "
                    f"pass overwrite=True to replace it, or write to another folder"
                )
            self._prefix = self._remove_strays()
        except BaseException:
            self._finalizer()
            raise
        self._pending: dict[str, list[Tensor]] = {site: [] for site in self.sites}
        self._pending_rows = 0
        self._shards: list[dict[str, Any]] = []
        self._closed = False

    def _remove_strays(self) -> str:
        """Delete files of killed writers; the shard name prefix this writer will use."""
        for pattern in TEMP_GLOBS:
            for stale in self.directory.glob(pattern):
                stale.unlink(missing_ok=True)
        listed = _listed_shards(self.directory)
        for shard in self.directory.glob(SHARD_GLOB):
            if listed is not None and shard.name not in listed:
                shard.unlink(missing_ok=True)
        if not any(self.directory.glob(SHARD_GLOB)):
            return "shard"
        # A cache being replaced keeps its shards until the new manifest is in: new names.
        while True:
            prefix = f"shard-{secrets.token_hex(4)}"
            if not any(self.directory.glob(f"{prefix}-*")):
                return prefix

    def __enter__(self) -> ActivationCacheWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @property
    def total_tokens(self) -> int:
        """Rows added so far."""
        return sum(shard["tokens"] for shard in self._shards) + self._pending_rows

    def add(self, activations: Mapping[str, Tensor] | Tensor) -> None:
        """Append rows: ``{site: [n, width]}`` (same ``n`` for every site), or one tensor.

        Leading dimensions are flattened, so ``[batch, seq, width]`` captures work as is.
        Rows on an accelerator are copied to the CPU here (one synchronising copy per add).
        """
        if self._closed:
            raise ConfigError(f"the writer of {self.directory} is closed; open a new one")
        if isinstance(activations, Tensor):
            if len(self.sites) != 1:
                raise ConfigError(f"pass a dict keyed by site: this cache has sites {self.sites}")
            activations = {self.sites[0]: activations}
        if sorted(activations) != sorted(self.sites):
            raise ConfigError(f"expected activations for {self.sites}, got {sorted(activations)}")
        rows = {}
        for site in self.sites:
            tensor = activations[site]
            if tensor.ndim == 0 or tensor.shape[-1] != self.widths[site]:
                raise ShapeMismatchError(
                    f"site {site!r} has width {self.widths[site]}, got shape {tuple(tensor.shape)}"
                )
            rows[site] = tensor.detach().reshape(-1, tensor.shape[-1]).to("cpu", self.dtype)
        counts = {site: tensor.shape[0] for site, tensor in rows.items()}
        if len(set(counts.values())) != 1:
            raise ShapeMismatchError(f"sites must add the same number of rows, got {counts}")
        for site, tensor in rows.items():
            self._pending[site].append(tensor)
        self._pending_rows += counts[self.sites[0]]
        if self._pending_rows >= self.shard_tokens:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        # Concatenate only when a shard is due: many small adds stay linear in time.
        joined = {site: torch.cat(chunks) for site, chunks in self._pending.items()}
        begin = 0
        while self._pending_rows - begin >= self.shard_tokens or (
            final and self._pending_rows > begin
        ):
            end = min(begin + self.shard_tokens, self._pending_rows)
            self._write_shard({site: t[begin:end].contiguous() for site, t in joined.items()})
            begin = end
        self._pending = {site: [t[begin:]] for site, t in joined.items()}
        self._pending_rows -= begin

    def _write_shard(self, tensors: dict[str, Tensor]) -> None:
        name = f"{self._prefix}-{len(self._shards):05d}.safetensors"
        tokens = next(iter(tensors.values())).shape[0]
        # Recorded before the write so that abort() also finds a shard whose rename happened.
        self._shards.append({"file": name, "tokens": tokens})
        self._written.append(name)
        # atomic_write syncs each file before its rename (the data is on disk before the name).
        atomic_write(
            self.directory / name,
            lambda path: save_file(tensors, str(path), metadata={"format": "pt"}),
        )

    def close(self) -> None:
        """Write the last partial shard, then commit the manifest. Idempotent.

        Raises:
            EmptyCacheError: no row was added; nothing is written and the folder is left
                as it was.
        """
        if self._closed:
            return
        try:
            if self.total_tokens == 0:
                raise EmptyCacheError(
                    f"no rows were added to the activation cache {self.directory}, so nothing "
                    f"was written (a previous cache there is unchanged); check that the source "
                    f"yields activations (texts not empty, total_tokens > 0) before closing"
                )
            self._flush(final=True)
            manifest = {
                "format": CACHE_FORMAT,
                "version": CACHE_VERSION,
                "sites": self.sites,
                "widths": self.widths,
                "dtype": dtype_name(self.dtype),
                "shards": self._shards,
                "total_tokens": self.total_tokens,
                "metadata": self.metadata,
                "normalization": check_scales(self.normalization, self.sites, "close()"),
            }
            text = json.dumps(manifest, indent=2) + "\n"
            # The shards' renames reach the disk before the manifest's: after a power cut the
            # manifest can never list a shard that is not there.
            sync_folder(self.directory)
            # The commit: one rename replaces the previous manifest (if any).
            atomic_write(self.directory / MANIFEST_NAME, lambda p: p.write_text(text, "utf-8"))
        except BaseException:
            self.abort()
            raise
        self._written.clear()  # committed: no longer this writer's to delete
        keep = {shard["file"] for shard in self._shards}
        for old in self.directory.glob(SHARD_GLOB):
            if old.name not in keep:  # the replaced cache's shards
                old.unlink(missing_ok=True)
        self._closed = True
        self._finalizer()

    def abort(self) -> None:
        """Delete this writer's shards, write no manifest and release the folder."""
        self._shards, self._pending_rows = [], 0
        self._pending = {site: [] for site in self.sites}
        self._closed = True
        self._finalizer()
