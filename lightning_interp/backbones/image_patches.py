"""Which pixels each image token of a multimodal LLM summarises.

:func:`image_token_boxes` gives, for the k-th image token of one image (in the order the
language model's sequence holds them), the pixel box ``(top, left, bottom, right)``, bottom
and right exclusive, in the preprocessed image the vision tower is fed (what
:func:`~lightning_interp.backbones.multimodal.vlm_inputs` builds). The box is what the token's
patches cover before the vision tower's attention mixes them with every other patch. The
layouts follow each family's modeling code in transformers:

- LLaVA, PaliGemma: one token per patch of the ``g x g`` grid, row by row
  (``g = image_size // patch_size``); LLaVA's ``vision_feature_select_strategy="full"``
  puts the class token first, whose box is the whole image.
- Gemma-3: ``Gemma3MultiModalProjector`` average-pools the patch grid into
  ``sqrt(mm_tokens_per_image)`` cells a side, row by row.
- Idefics3 / SmolVLM: ``Idefics3Connector.pixel_shuffle`` folds each
  ``scale_factor x scale_factor`` block of patches into one token, blocks row by row.
- Qwen2-VL / Qwen2.5-VL: the patch ``merger`` folds each ``spatial_merge_size`` square of
  patches into one token, windows row by row (Qwen2.5-VL's windowed attention reorders the
  patches and its merger output is put back in this order).
- LLaVA-Next: the base tile's ``g x g`` patch tokens (boxes in the base tile, the whole image
  resized to ``tile x tile``), then each kept row of the grid tiles' patches (boxes in the
  canvas the image was resized and padded into, before it was cut into tiles: see
  :class:`~lightning_interp.backbones.multimodal.AnyResLayout`) ended by an
  ``image_newline`` token, a learned vector from no pixels: its box is ``-1``.
  LLaVA-OneVision: the same, unless it shrinks the grid by interpolation (refused).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_interp.backbones.multimodal import (
    ANYRES,
    _family,
    anyres_layout,
    image_resolution,
    image_token_count,
)
from lightning_interp.errors import ConfigError

NO_PIXELS = -1  # the box of a token made from no pixels (LLaVA-Next's image newline)


def grid_boxes(rows: int, cols: int, cell: int, top: int = 0, left: int = 0) -> Tensor:
    """Boxes of a ``rows x cols`` grid of ``cell``-pixel squares, row by row, ``[rows * cols, 4]``.

    Args:
        rows: Cells per column.
        cols: Cells per row.
        cell: Side of a cell in pixels.
        top: Pixel offset of the grid's first row.
        left: Pixel offset of the grid's first column.
    """
    r = torch.arange(rows).repeat_interleave(cols) * cell + top
    c = torch.arange(cols).repeat(rows) * cell + left
    return torch.stack([r, c, r + cell, c + cell], dim=1)


def _cells(config: Any, size: int) -> int:
    """Side in pixels of the square of pixels one image token stands for (one-tile families)."""
    family, vision = _family(config), config.vision_config
    patch = vision.patch_size
    if family == "gemma3":
        side = math.isqrt(config.mm_tokens_per_image)
        return (size // patch) // side * patch  # the pooling kernel, in pixels
    if family in ("idefics3", "smolvlm"):
        return config.scale_factor * patch
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return vision.spatial_merge_size * patch
    return patch  # llava, paligemma: a token per patch


def image_token_boxes(
    config: Any, size: int | None = None, image_hw: Sequence[int] | None = None
) -> Tensor:
    """Pixel box ``(top, left, bottom, right)`` of each image token of one image.

    Args:
        config: The multimodal model's config.
        size: Image side fed to the vision tower (default: its config's), as given to
            :func:`~lightning_interp.backbones.multimodal.vlm_inputs`.
        image_hw: The image's own ``(height, width)``; LLaVA-Next's tiling depends on it.

    Returns:
        A long tensor ``[n_image_tokens, 4]``, bottom and right exclusive, in the
        preprocessed image's pixels (LLaVA-Next: see the module docstring; ``-1`` rows for
        its newline tokens).

    Raises:
        ConfigError: an unsupported family, LLaVA-Next without ``image_hw``, or a
            LLaVA-OneVision grid shrunk by interpolation (no exact boxes).
    """
    family = _family(config)
    size = image_resolution(config, size)
    if family in ANYRES:
        if image_hw is None:
            raise ConfigError("LLaVA-Next's image tokens depend on the image: pass image_hw=(h, w)")
        layout = anyres_layout(config, image_hw)
        top, left, rows, cols = layout.kept
        if layout.rows_cols != (rows, cols):
            raise ConfigError(
                f"LLaVA-OneVision shrinks this image's {rows} x {cols} patch grid by bilinear "
                f"interpolation, so its tokens have no exact box; use smaller images or "
                f"pinpoints (at most {config.vision_aspect_ratio}'s tiles)"
            )
        p = layout.patch
        grid = grid_boxes(rows, cols + 1, p, top * p, left * p).view(rows, cols + 1, 4)
        grid[:, -1] = NO_PIXELS  # the last column of each row is the newline token
        base = grid_boxes(layout.grid, layout.grid, p)
        return torch.cat([base, grid.reshape(-1, 4)])
    cell = _cells(config, size)
    boxes = grid_boxes(size // cell, size // cell, cell)
    if len(boxes) + 1 == image_token_count(config, size):  # LLaVA "full": the class token
        boxes = torch.cat([torch.tensor([[0, 0, size, size]]), boxes])
    return boxes
