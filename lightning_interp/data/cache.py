"""On-disk activation cache: safetensors shards plus a ``manifest.json``, written once, read many.

A cache folder holds ``shard-00000.safetensors``, ``shard-00001.safetensors``, … (one tensor
per site, keyed by site name, rows aligned across sites) and ``manifest.json``. Every file is
written atomically and the manifest last, so a folder with a manifest is complete and a
folder without one is not a cache. Shards are read memory-mapped through
``safetensors.safe_open``; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from lightning_interp.dictionaries.config import dtype_from_name, dtype_name
from lightning_interp.dictionaries.serialization import atomic_write
from lightning_interp.errors import ConfigError, CorruptFileError, ShapeMismatchError

MANIFEST_NAME = "manifest.json"
CACHE_FORMAT = "lightning-interp-activations"
CACHE_VERSION = 1
_SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float64: "F64",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
}
_SHARD_GLOBS = ("shard-*.safetensors", ".shard-*.tmp", f".{MANIFEST_NAME}.*.tmp")


def expected_norm_scale(sample: Tensor, target_norm: float | None = None) -> float:
    """The factor ``s`` such that rows of ``s * sample`` have mean L2 norm ``target_norm``.

    SAELens's ``"expected_average_only_in"`` normalisation: activations are scaled so their
    average norm is ``sqrt(d)``, which makes hyper-parameters transfer across sites and models.

    Args:
        sample: Activations ``[..., d]`` (leading dimensions are rows).
        target_norm: The mean norm wanted (default ``sqrt(d)``).

    Returns:
        The scale, a positive float.

    Example:
        >>> x = torch.randn(1000, 16) * 5
        >>> s = expected_norm_scale(x)
        >>> round(float((s * x).norm(dim=-1).mean()), 3)
        4.0
    """
    rows = sample.detach().reshape(-1, sample.shape[-1]).double()
    mean_norm = float(rows.norm(dim=-1).mean()) if rows.shape[0] else 0.0
    if not math.isfinite(mean_norm) or mean_norm <= 0:
        raise ConfigError(f"cannot normalise a sample whose mean norm is {mean_norm}")
    target = math.sqrt(rows.shape[-1]) if target_norm is None else float(target_norm)
    return target / mean_norm


def _check_scales(scales: Mapping[str, float], sites: Sequence[str], where: str) -> dict:
    unknown = sorted(set(scales) - set(sites))
    if unknown:
        raise ConfigError(f"{where}: normalization names unknown sites {unknown}; sites: {sites}")
    bad = {k: v for k, v in scales.items() if not (isinstance(v, (int, float)) and v > 0)}
    if bad or not all(math.isfinite(v) for v in scales.values()):
        raise ConfigError(f"{where}: normalization scales must be finite and > 0, got {scales}")
    return {site: float(scale) for site, scale in scales.items()}


class ActivationCacheWriter:
    """Writes aligned activation rows of one or more sites into a cache folder.

    Use as a context manager: on a clean exit the last partial shard and then the manifest
    are written; if the block raises, the shards written so far are deleted and no manifest
    is written. Stray shards in a folder without a manifest (left by a killed writer) are
    removed when writing starts.

    Args:
        directory: The cache folder (created if needed).
        sites: Site names, e.g. ``["layers.3.mlp_in", "layers.3.mlp_out"]`` for a transcoder.
        widths: Activation width of each site.
        dtype: Storage dtype (``"float32"``, ``"bfloat16"``, ``"float16"``, ``"float64"``).
        shard_tokens: Rows per shard file.
        metadata: JSON-serialisable provenance (backbone, dataset, context size, ...).
        normalization: Scale per site recorded in the manifest (see
            :func:`expected_norm_scale`); activations are stored unscaled. May also be set
            later through the ``normalization`` attribute, before the writer closes.
        overwrite: Replace an existing cache in ``directory`` instead of refusing.

    Example:
        >>> import tempfile
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
        _check_scales(self.normalization, self.sites, "ActivationCacheWriter")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        manifest = self.directory / MANIFEST_NAME
        if manifest.exists() and not overwrite:
            raise FileExistsError(
                f"{self.directory} already holds an activation cache ({MANIFEST_NAME}); pass "
                f"overwrite=True to replace it, or write to another folder"
            )
        # The manifest goes first: a reader must never see it pointing at deleted shards.
        manifest.unlink(missing_ok=True)
        for pattern in _SHARD_GLOBS:
            for stale in self.directory.glob(pattern):
                stale.unlink()
        self._pending: dict[str, list[Tensor]] = {site: [] for site in self.sites}
        self._pending_rows = 0
        self._shards: list[dict[str, Any]] = []
        self._closed = False

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
        """
        if self._closed:
            raise ValueError(f"the writer of {self.directory} is closed")
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
        name = f"shard-{len(self._shards):05d}.safetensors"
        tokens = next(iter(tensors.values())).shape[0]
        # Recorded before the write so that abort() also finds a shard whose rename happened.
        self._shards.append({"file": name, "tokens": tokens})
        atomic_write(
            self.directory / name,
            lambda path: save_file(tensors, str(path), metadata={"format": "pt"}),
        )

    def close(self) -> None:
        """Write the last partial shard, then the manifest. Idempotent."""
        if self._closed:
            return
        try:
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
                "normalization": _check_scales(self.normalization, self.sites, "close()"),
            }
            text = json.dumps(manifest, indent=2) + "\n"
            atomic_write(self.directory / MANIFEST_NAME, lambda p: p.write_text(text, "utf-8"))
        except BaseException:
            self.abort()
            raise
        self._closed = True

    def abort(self) -> None:
        """Delete the shards written so far; no manifest is written."""
        for shard in self._shards:
            (self.directory / shard["file"]).unlink(missing_ok=True)
        self._shards, self._pending_rows = [], 0
        self._pending = {site: [] for site in self.sites}
        self._closed = True


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
            _check_scales(manifest["normalization"], sites, "the manifest")
        except ConfigError as err:
            raise CorruptFileError(f"{where}: {err}") from err
        for shard in shards:
            # A file name with a separator could point outside the cache folder.
            name, tokens = shard["file"], shard["tokens"]
            if Path(name).name != name or not isinstance(tokens, int) or tokens <= 0:
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
        if shapes != expected or dtypes - {_SAFETENSORS_DTYPES[self.dtype]}:
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
