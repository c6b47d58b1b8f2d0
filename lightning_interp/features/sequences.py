"""The streaming pass shared by image and image+caption stores: whole sequences as contexts.

Every sequence of the pass has the same ``L`` positions (an image's patches, or an image's
tokens and its caption), so an example is a whole sequence: the accumulator cuts ``2L - 1``
positions centred on the example's maximum, which hold all ``L`` wherever the centre is, and
:func:`whole_images` puts each at its position. Used by
:mod:`~lightning_interp.features.build_images` and
:mod:`~lightning_interp.features.build_multimodal`.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_interp.features.build import TokenProgress
from lightning_interp.features.layout import (
    partial_folder,
    resume_progress,
    save_progress,
    write_store,
)
from lightning_interp.features.store import FeatureAccumulator, FeatureSettings
from lightning_interp.features.summary import correlation_kind, quantiles_kind, summarize

if TYPE_CHECKING:  # build_images imports this module
    from lightning_interp.features.build_images import ImageSet

IMAGES_FOLDER = "images"


class _CentredWindow(FeatureSettings):
    """Settings whose windows are centred: ``2L - 1`` slots hold every position of an image."""

    @property
    def center(self) -> int:
        return (self.window - 1) // 2


def whole_sequence_pass(
    dictionary: Any,
    settings: FeatureSettings,
    keep: Tensor,
    images: ImageSet,
    encode: Callable[[int, int], Any],
    out: Path,
    *,
    fingerprint: dict[str, Any],
    checkpoint_every: int,
    progress: bool | TokenProgress,
) -> tuple[FeatureAccumulator, dict[str, int], FeatureSettings]:
    """The streaming pass over images whose sequences all have one layout of ``L`` positions.

    Args:
        dictionary: The dictionary (its ``d_latent``).
        settings: What to record; the window becomes ``L``.
        keep: ``[L]`` bool, the positions that count (the same in every sequence).
        images: The images (their count and capture batch size).
        encode: ``encode(start, stop)``: sparse codes of images ``start .. stop-1``'s kept
            positions, in (image, position) order.
        out: The store folder (its ``.partial`` sibling holds checkpoints).
        fingerprint: What a resumed pass must share besides the settings.
        checkpoint_every: Capture batches between checkpoints (0: none).
        progress: As for :func:`build_image_feature_store`.

    Returns:
        The accumulator, the pass's counts and the settings to record (window ``L``).
    """
    length = len(keep)
    recorded = dataclasses.replace(settings, window=length)
    acc_settings = _CentredWindow(**{**settings.to_dict(), "window": 2 * length - 1})
    fingerprint = {**fingerprint, "settings": recorded.to_dict(), "d_latent": dictionary.d_latent}
    acc = FeatureAccumulator(dictionary.d_latent, acc_settings)
    partial = partial_folder(out)
    state = {"images": 0, "batches": 0, "tokens": 0}
    saved = resume_progress(partial, fingerprint, acc)
    if saved is not None:
        state = {k: saved[k] for k in state}
    meter = (
        progress
        if isinstance(progress, TokenProgress)
        else TokenProgress(images.count, enabled=progress, unit="images")
    )
    ids = torch.arange(length)
    for start in range(state["images"], images.count, images.images_per_capture):
        stop = min(start + images.images_per_capture, images.count)
        kept = keep.expand(stop - start, -1)
        # Rows in (image, position) order, as the accumulator's row_index numbers them.
        row_index = torch.where(kept, kept.reshape(-1).cumsum(0).view_as(kept) - 1, -1)
        with torch.no_grad():
            codes = encode(start, stop)
        acc.update(codes, ids.expand(stop - start, -1), row_index, start)
        state = {
            "images": stop,
            "batches": state["batches"] + 1,
            "tokens": state["tokens"] + (stop - start) * int(keep.sum()),
        }
        meter.update(state["images"])
        if checkpoint_every and state["batches"] % checkpoint_every == 0:
            save_progress(partial, acc.state(), {"fingerprint": fingerprint, **state})
    meter.update(state["images"], done=True)
    return acc, state, recorded


def finish_store(
    out: Path,
    meta: dict[str, Any],
    acc: FeatureAccumulator,
    state: dict[str, int],
    images: ImageSet,
    names: dict[str, str],
    add: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
) -> None:
    """Write the store: whole-image examples, and a thumbnail of every image they show.

    Args:
        out: The store folder.
        meta: ``store.json`` so far (its ``window`` is the sequence length ``L``).
        acc: The pass's accumulator.
        state: The pass's counts.
        images: The images (thumbnails).
        names: vocab.json, each position's name.
        add: Adds tensors to ``contexts.safetensors`` (given the whole-image contexts).
    """
    length = meta["window"]
    stats, contexts = summarize(acc, state["tokens"])
    contexts = whole_images(contexts, length)
    if add is not None:
        contexts = add(contexts)
    shown = torch.cat([contexts["top_image"].flatten(), contexts["quantile_image"].flatten()])
    shown = shown[shown >= 0].unique().tolist()
    meta = {
        **meta,
        "corpus": {
            "dataset": images.name,
            "tokens": state["tokens"],
            "context_size": length,
            "images": state["images"],
        },
        "image": {**meta["image"], "thumbnails": len(shown)},
        "quantiles": quantiles_kind(acc),
        "correlation": "jaccard",
        "correlation_sample": correlation_kind(acc, state["tokens"]),
    }

    def thumbnails(folder: Path) -> None:
        (folder / IMAGES_FOLDER).mkdir()
        for index in shown:
            png = png_bytes(images.thumbnail_rgb(index))
            (folder / IMAGES_FOLDER / f"{index}.png").write_bytes(png)

    write_store(out, meta, stats, contexts, names, extra=thumbnails)


def whole_images(contexts: dict[str, Tensor], length: int, chunk: int = 1024) -> dict[str, Tensor]:
    """Centred ``2L - 1`` windows to whole images: slot ``j`` holds position ``j``.

    Adds ``<prefix>image`` (the example's image, -1 padding) and sets ``<prefix>center`` to
    the position of the example's maximum. Latents go ``chunk`` at a time, so the int64
    scatter index never spans the whole ``[F, examples, 2L - 1]`` window tensor.
    """
    out = dict(contexts)
    for prefix in ("top_", "quantile_"):
        tokens, acts = contexts[f"{prefix}tokens"], contexts[f"{prefix}activations"]
        placed = torch.zeros(*tokens.shape[:2], length, dtype=acts.dtype)
        for start in range(0, len(tokens), chunk):
            ids, values = tokens[start : start + chunk], acts[start : start + chunk]
            # Each position lies in a window once; the outside slots add zeros.
            placed[start : start + chunk].scatter_add_(
                2, ids.clamp(min=0).long(), values.masked_fill(ids < 0, 0)
            )
        source = contexts[f"{prefix}source"]
        present = source >= 0
        out[f"{prefix}activations"] = placed
        out[f"{prefix}tokens"] = torch.where(
            present[..., None], torch.arange(length, dtype=torch.int32), -1
        ).int()
        out[f"{prefix}center"] = torch.where(present, source % length, 0).to(torch.int16)
        out[f"{prefix}image"] = torch.where(present, source // length, -1)
    return out


def png_bytes(rgb: Tensor) -> bytes:
    """An 8-bit RGB PNG of ``rgb`` (``[H, W, 3]`` uint8), each row with PNG's Sub filter.

    Written by hand (zlib and a CRC), so no imaging library is needed; the Sub filter (each
    byte minus the one 3 to its left) makes photographs compress about a third better.
    """
    height, width, _ = rgb.shape
    rows = rgb.reshape(height, width * 3).to(torch.int16)
    filtered = rows.clone()
    filtered[:, 3:] = (rows[:, 3:] - rows[:, :-3]) % 256
    lines = torch.cat([torch.ones(height, 1, dtype=torch.int16), filtered], 1)  # filter 1
    raw = lines.to(torch.uint8).numpy().tobytes()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )
