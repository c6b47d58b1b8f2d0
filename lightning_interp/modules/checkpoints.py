"""Refuse checkpoints that cannot be resumed, with a message naming the file and the problem.

Two ways a resume goes wrong silently or with a raw traceback:

- the file is damaged (a zero-byte or truncated ``.ckpt`` left by a killed save), and
  ``torch.load`` answers ``PytorchStreamReader failed reading zip archive``;
- the file is fine but was written by another model: a different ``k`` has the same tensor
  shapes, so Lightning loads it without complaint and trains a TopK-32 from a TopK-16.

:func:`check_checkpoint_file` and :class:`CheckedCheckpointIO` cover the first (the training
modules install the latter on their trainer in ``setup``, before Lightning loads anything);
:func:`check_resume_compatible` the second (called from ``on_load_checkpoint``, before the
weights are loaded).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.fabric.plugins import CheckpointIO

from lightning_interp.errors import CheckpointError

# Config fields that may differ between a checkpoint and the run resuming it: provenance is
# filled in during training and at export, and records no choice that shapes the model.
_IGNORED_FIELDS = frozenset({"provenance"})


def _local_path(path: Any) -> Path | None:
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    if text is None or "://" in text:
        return None  # a remote (fsspec) path: Lightning reads it, we cannot stat it cheaply
    return Path(text)


def check_checkpoint_file(path: str | os.PathLike[str]) -> None:
    """Raise :class:`CheckpointError` if ``path`` is an empty or truncated checkpoint file.

    Cheap: reads the size, the first bytes and the zip end record (``torch.save`` writes a
    zip archive whose directory is at the end, so a truncated file has none). A missing
    file is left to the loader, which raises ``FileNotFoundError`` naming it.

    Args:
        path: A ``.ckpt`` file (remote URLs are not checked).

    Example:
        >>> import tempfile, pathlib
        >>> empty = pathlib.Path(tempfile.mkdtemp()) / "last.ckpt"
        >>> _ = empty.write_bytes(b"")
        >>> try:
        ...     check_checkpoint_file(empty)
        ... except CheckpointError as error:
        ...     print("is empty (0 bytes)" in str(error))
        True
    """
    local = _local_path(path)
    if local is None or not local.is_file():
        return
    size = local.stat().st_size
    fix = (
        "its save was interrupted; resume from an earlier checkpoint in the same folder, or "
        "start without ckpt_path"
    )
    if size == 0:
        raise CheckpointError(f"checkpoint {local} is empty (0 bytes): {fix}")
    with local.open("rb") as handle:
        magic = handle.read(2)
    if magic == b"PK" and not zipfile.is_zipfile(local):
        raise CheckpointError(
            f"checkpoint {local} is truncated ({size:,} bytes, no zip end record): {fix}"
        )
    # torch.save writes a zip (b"PK"); very old torch versions a raw pickle (b"\x80").
    if magic != b"PK" and magic[:1] != b"\x80":
        raise CheckpointError(
            f"{local} is not a PyTorch checkpoint (it starts with {magic!r}); pass the .ckpt "
            f"file a ModelCheckpoint callback wrote"
        )


class CheckedCheckpointIO(CheckpointIO):
    """A ``CheckpointIO`` that turns unreadable checkpoint files into :class:`CheckpointError`.

    Delegates every call to the wrapped plugin; ``load_checkpoint`` first runs
    :func:`check_checkpoint_file`, and re-raises what ``torch.load`` raises on a damaged
    archive (``RuntimeError``, ``EOFError``, ``UnpicklingError``, ``BadZipFile``) as one line
    naming the file.

    Args:
        inner: The plugin to wrap (the strategy's own).
    """

    def __init__(self, inner: CheckpointIO) -> None:
        self.inner = inner

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Save with the wrapped plugin."""
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Check the file, then load it with the wrapped plugin."""
        check_checkpoint_file(path)
        try:
            return self.inner.load_checkpoint(path, *args, **kwargs)
        except FileNotFoundError:
            raise
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
            # torch's messages run on with advice; the first sentence says what is wrong.
            reason = " ".join(str(e).split()).split(". ")[0][:200]
            raise CheckpointError(
                f"cannot read checkpoint {path} ({type(e).__name__}: {reason}); the file is "
                f"damaged or not a Lightning checkpoint: resume from another one, or start "
                f"without ckpt_path"
            ) from e

    def remove_checkpoint(self, path: Any) -> None:
        """Remove with the wrapped plugin."""
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        """Tear down the wrapped plugin."""
        self.inner.teardown()


def install_checkpoint_checks(trainer: Any) -> None:
    """Wrap ``trainer.strategy.checkpoint_io`` in :class:`CheckedCheckpointIO` (once)."""
    strategy = trainer.strategy
    if not isinstance(strategy.checkpoint_io, CheckedCheckpointIO):
        strategy.checkpoint_io = CheckedCheckpointIO(strategy.checkpoint_io)


def _architecture(spec: Mapping[str, Any]) -> str:
    return str(spec.get("class_path", "?")).rpartition(".")[2]


def _config(spec: Mapping[str, Any]) -> dict[str, Any]:
    config = (spec.get("init_args") or {}).get("config") or {}
    return {k: v for k, v in config.items() if k not in _IGNORED_FIELDS}


def spec_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """How two dictionary specs (as :func:`dictionary_hparams` stores them) differ.

    Compares the class and every config field but ``provenance``; a field recorded on only
    one side (a checkpoint from an older version) is not a difference.

    Returns:
        ``"field: checkpoint A, this run B"`` for each difference (empty when compatible).
    """
    differences = []
    if _architecture(saved) != _architecture(current):
        differences.append(
            f"architecture: checkpoint {_architecture(saved)}, this run {_architecture(current)}"
        )
    old, new = _config(saved), _config(current)
    for key in sorted(old.keys() & new.keys()):
        if old[key] != new[key]:
            differences.append(f"{key}: checkpoint {old[key]!r}, this run {new[key]!r}")
    return differences


def check_resume_compatible(
    saved: Mapping[str, Mapping[str, Any]] | None,
    current: Mapping[str, Mapping[str, Any]],
    *,
    source: Any = None,
) -> None:
    """Raise :class:`CheckpointError` unless a checkpoint's dictionaries match this run's.

    Args:
        saved: Name -> dictionary spec from the checkpoint's hyper-parameters (``None``: the
            checkpoint records none, so nothing can be compared).
        current: Name -> spec of the module being resumed.
        source: The checkpoint path, for the message.
    """
    if saved is None:
        return
    where = f"checkpoint {source}" if source else "the checkpoint"
    if set(saved) != set(current):
        raise CheckpointError(
            f"{where} holds dictionaries {sorted(saved)} but this run trains {sorted(current)}; "
            f"resume with the same dictionaries, or start a new run without ckpt_path"
        )
    for name, spec in current.items():
        differences = spec_differences(saved[name], spec)
        if differences:
            label = "" if name == "main" else f" {name!r}"
            raise CheckpointError(
                f"{where} was written by a different dictionary{label} than this run's ("
                + "; ".join(differences)
                + "); resume with the checkpoint's settings, or start a new run without "
                "ckpt_path (DictionaryModule.load_from_checkpoint reads its weights)"
            )
