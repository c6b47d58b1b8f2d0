"""Multimodal LLMs (LLaVA, -Next, -OneVision, Qwen2-VL, Idefics3/SmolVLM, PaliGemma, Gemma-3).

Where their parts live, their inputs built in torch, and which positions hold image tokens.

An image encoder feeds a language model through a projector. Canonical sites
(:mod:`~lightning_interp.backbones.sites`):

``layers.{i}.<kind>``         the language model's blocks (``embeddings``: the merged text and
                              image embeddings entering block 0)
``vision.layers.{i}.<kind>``  the vision tower's blocks (Qwen2-VL's are ``[patches, d]``: that
                              tower runs every image's patches as one flat sequence)
``projector``                 output of the multimodal projector module (LLaVA's and PaliGemma's
                              ``multi_modal_projector``, Idefics3's ``connector``, Qwen2-VL's
                              patch ``merger``): one row per image token, in the LM's width,
                              before any scaling the model applies afterwards (PaliGemma
                              divides by ``sqrt(d)``)

The vision tower runs before the language model inside the one forward, so a capture whose
deepest site is in the vision tower (or the projector) stops there: the LM never runs.

transformers' image processors for these models need torchvision; :func:`vlm_inputs` builds
the model inputs in torch alone, laid out the way each family's processor lays them out (image
tokens counted from the config, Qwen2-VL's patch flattening as in
``transformers/models/qwen2_vl/image_processing_qwen2_vl.py``, LLaVA-Next's and
LLaVA-OneVision's any-resolution tiling as in ``transformers/models/llava_next/`` and
``llava_onevision/`` [image_processing, processing, modeling]).
Deviation on purpose: the image tokens come first and the caption follows, with no chat
template; images are resized in torch (bicubic, antialiased), not by PIL or torchvision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_interp.errors import ConfigError

TokenTypes = Literal["image", "text", "all"]
PROJECTOR = "projector"

# Where each family keeps its vision blocks, language-model blocks and projector (transformers
# 5.x ``*ForConditionalGeneration``; the bare ``*Model`` without the leading ``model.``).
VISION_BLOCK_PATHS = (
    "vision_tower.vision_model.encoder.layers",  # LLaVA, PaliGemma, Gemma-3 (older layout)
    "vision_tower.encoder.layers",  # LLaVA(-Next), PaliGemma, Gemma-3 (CLIP / SigLIP towers)
    "vision_model.encoder.layers",  # Idefics3, SmolVLM
    "visual.blocks",  # Qwen2-VL, Qwen2.5-VL
)
LANGUAGE_BLOCK_PATHS = ("language_model.layers", "text_model.layers")
PROJECTOR_PATHS = ("multi_modal_projector", "connector", "visual.merger")
FAMILIES = (
    "llava",
    "llava_next",
    "llava_onevision",
    "paligemma",
    "gemma3",
    "idefics3",
    "smolvlm",
    "qwen2_vl",
    "qwen2_5_vl",
)


ANYRES = ("llava_next", "llava_onevision")  # any-resolution tiling


def _with_prefix(paths: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(p for path in paths for p in (f"model.{path}", path))


# A bare Idefics3Model's "vision_model.encoder.layers" is CLIP's path: sites.py finds it there.
VISION_PATHS = tuple(
    p for p in _with_prefix(VISION_BLOCK_PATHS) if p != "vision_model.encoder.layers"
)
LANGUAGE_PATHS = _with_prefix(LANGUAGE_BLOCK_PATHS)


def is_multimodal(config: Any) -> bool:
    """Whether a config is an image encoder feeding a language model."""
    return getattr(config, "vision_config", None) is not None and (
        getattr(config, "text_config", None) is not None
    )


def projector_path(model: torch.nn.Module) -> str | None:
    """Dotted path of the multimodal projector, or ``None`` (not a multimodal LLM)."""
    if not is_multimodal(getattr(model, "config", None)):
        return None
    names = dict(model.named_modules())
    return next((p for p in _with_prefix(PROJECTOR_PATHS) if p in names), None)


def image_token_id(config: Any) -> int:
    """The id that marks image positions in ``input_ids``.

    Raises:
        ConfigError: if the config names none.
    """
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ConfigError(
        f"{type(config).__name__} names no image token id (image_token_id / image_token_index); "
        f"token types need a multimodal LLM config"
    )


def token_type_mask(
    input_ids: Tensor, config: Any, token_types: TokenTypes, attention_mask: Tensor | None = None
) -> Tensor:
    """Which positions to keep: ``image`` tokens, ``text`` tokens or ``all``.

    ``text`` is every attended position that is not an image token (the specials bracketing
    an image included); ``all`` is every attended position.

    Args:
        input_ids: ``[batch, seq]`` token ids as fed to the model.
        config: The multimodal model's config (for its image token id).
        token_types: ``"image"``, ``"text"`` or ``"all"``.
        attention_mask: ``[batch, seq]``, zero at padding (default: nothing padded).

    Returns:
        A boolean ``[batch, seq]`` mask.
    """
    attended = (
        torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask is None
        else attention_mask.bool()
    )
    image = input_ids == image_token_id(config)
    if token_types == "image":
        return image & attended
    if token_types == "text":
        return ~image & attended
    if token_types == "all":
        return attended
    raise ConfigError(f"token_types must be 'image', 'text' or 'all', got {token_types!r}")


def _family(config: Any) -> str:
    family = getattr(config, "model_type", "")
    if family not in FAMILIES:
        raise ConfigError(
            f"no torch-only input builder for model_type {family!r}; supported: {FAMILIES}. "
            f"Pass model inputs built by the model's processor instead"
        )
    return family


def image_resolution(config: Any, size: int | None = None) -> int:
    """Side of the square image (LLaVA-Next: of each tile) the vision tower is fed."""
    family, vision = _family(config), config.vision_config
    default = getattr(vision, "image_size", None) or 224
    if size is None:
        size = default
    if family in ("qwen2_vl", "qwen2_5_vl"):
        unit = vision.patch_size * vision.spatial_merge_size
        size = max(unit, size // unit * unit)  # Qwen2-VL needs whole merge windows
    if family in ANYRES and size != default:
        # The model cuts its features by the config's image_size, whatever the pixels.
        raise ConfigError(
            f"LLaVA-Next tiles are the vision tower's image_size ({default}), got size={size}; "
            f"leave size unset (the image's own size picks the tiling)"
        )
    return size


@dataclass(frozen=True)
class AnyResLayout:
    """Where LLaVA-Next's (and OneVision's) any-resolution preprocessing puts an image.

    The image is resized (aspect ratio kept) into the best-fitting ``canvas`` of the
    config's ``image_grid_pinpoints``, padded to it, and cut into ``tile x tile`` tiles row
    by row; a base tile (the whole image resized to ``tile x tile``) comes first. The model
    lays the grid tiles' patches out as one ``canvas / patch`` grid, drops the rows or
    columns of patches that are only padding (``kept``), and ends each kept row with an
    ``image_newline`` token. LLaVA-OneVision then shrinks a kept grid of more than
    ``anyres_max_N`` tiles' worth of patches (by 1.1 times the ratio) by bilinear
    interpolation to ``rows_cols``.

    Attributes:
        image_hw: The image's own ``(height, width)`` (the model's ``image_sizes``).
        tile: Tile side in pixels (the vision tower's ``image_size``).
        patch: Patch side in pixels.
        canvas: ``(height, width)`` of the chosen pinpoint resolution.
        resized: ``(height, width)`` of the image inside the canvas.
        offset: ``(top, left)`` padding before the image in the canvas.
        kept: ``(top, left, rows, cols)`` of the kept patch grid, in canvas patch units.
        rows_cols: ``(rows, cols)`` of grid tokens: ``kept``'s unless OneVision shrinks it.
    """

    image_hw: tuple[int, int]
    tile: int
    patch: int
    canvas: tuple[int, int]
    resized: tuple[int, int]
    offset: tuple[int, int]
    kept: tuple[int, int, int, int]
    rows_cols: tuple[int, int]

    @property
    def grid(self) -> int:
        """Patches per tile side."""
        return self.tile // self.patch

    @property
    def n_tiles(self) -> tuple[int, int]:
        """Grid tiles per column and per row of the canvas."""
        return self.canvas[0] // self.tile, self.canvas[1] // self.tile

    @property
    def n_tokens(self) -> int:
        """Image tokens: the base tile's patches, then each grid row and its newline."""
        return self.grid**2 + self.rows_cols[0] * (self.rows_cols[1] + 1)


def _best_resolution(image_hw: tuple[int, int], pinpoints: Sequence[Sequence[int]]):
    """The pinpoint keeping most of the image's pixels, then wasting fewest (first wins ties).

    The rule of ``transformers.image_processing_utils.select_best_resolution``.
    """
    h, w = image_hw
    best, best_key = None, None
    for ph, pw in pinpoints:
        scale = min(pw / w, ph / h)
        effective = min(int(w * scale) * int(h * scale), w * h)
        key = (effective, -(ph * pw - effective))
        if best_key is None or key > best_key:
            best, best_key = (int(ph), int(pw)), key
    return best


def anyres_layout(config: Any, image_hw: Sequence[int]) -> AnyResLayout:
    """LLaVA-Next's (or OneVision's) tiling of an image of size ``image_hw = (height, width)``.

    Raises:
        ConfigError: a tile's features are not its ``g x g`` patches (a CLIP tower's class
            token kept by ``"full"``, or a SigLIP tower's first patch dropped by
            ``"default"``), or a pinpoint is not whole tiles.
    """
    vision, pinpoints = config.vision_config, config.image_grid_pinpoints
    has_cls = "clip" in getattr(vision, "model_type", "")  # SigLIP towers have none
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    if has_cls != (strategy == "default"):
        want = "default" if has_cls else "full"
        raise ConfigError(
            f"any-resolution tiles need one feature per patch: with this vision tower set "
            f"vision_feature_select_strategy={want!r} (got {strategy!r})"
        )
    tile, patch = vision.image_size, vision.patch_size
    if any(side % tile for point in pinpoints for side in point):
        raise ConfigError(
            f"image_grid_pinpoints {pinpoints} must be multiples of the tile side {tile}; "
            f"fix the config's pinpoints"
        )
    h, w = (int(side) for side in image_hw)
    ch, cw = _best_resolution((h, w), pinpoints)
    # Fit inside the canvas (the processor's get_patch_output_size), then centre.
    if cw / w < ch / h:
        rh, rw = min(math.ceil(h * cw / w), ch), cw
    else:
        rh, rw = ch, min(math.ceil(w * ch / h), cw)
    # The model's unpad_image: rows (or columns) of patches that are only padding go.
    grid = tile // patch
    rows, cols = ch // patch, cw // patch
    top = left = 0
    if w / h > cols / rows:
        top = (rows - int(round(h * (cols / w), 7))) // 2
    else:
        left = (cols - int(round(w * (rows / h), 7))) // 2
    rows, cols = rows - 2 * top, cols - 2 * left
    rows_cols = (rows, cols)
    limit = getattr(config, "vision_aspect_ratio", None)  # OneVision's "anyres_max_9"
    if limit is not None:
        ratio = math.sqrt(rows * cols / (int(limit.removeprefix("anyres_max_")) * grid**2))
        if ratio > 1.1:
            rows_cols = (int(rows // ratio), int(cols // ratio))
    return AnyResLayout(
        image_hw=(h, w),
        tile=tile,
        patch=patch,
        canvas=(ch, cw),
        resized=(rh, rw),
        offset=((ch - rh) // 2, (cw - rw) // 2),
        kept=(top, left, rows, cols),
        rows_cols=rows_cols,
    )


def image_token_count(
    config: Any, size: int | None = None, image_hw: Sequence[int] | None = None
) -> int:
    """Image tokens per image in the language model's sequence, as the processor counts.

    Args:
        config: The multimodal model's config.
        size: Image side fed to the vision tower (default: its config's).
        image_hw: The image's own ``(height, width)``: LLaVA-Next's count depends on it.

    Raises:
        ConfigError: LLaVA-Next without ``image_hw``.
    """
    family, vision = _family(config), config.vision_config
    size = image_resolution(config, size)
    patches = (size // vision.patch_size) ** 2
    if family in ANYRES:
        if image_hw is None:
            raise ConfigError("LLaVA-Next's image tokens depend on the image: pass image_hw=(h, w)")
        return anyres_layout(config, image_hw).n_tokens
    if family == "llava":
        full = getattr(config, "vision_feature_select_strategy", "default") == "full"
        return patches + int(full)  # "full" keeps the class token
    if family == "gemma3":
        return config.mm_tokens_per_image
    if family in ("idefics3", "smolvlm"):
        return patches // config.scale_factor**2
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return patches // vision.spatial_merge_size**2
    return patches  # paligemma


def _resize(images: Tensor, hw: Sequence[int]) -> Tensor:
    return F.interpolate(
        images, size=tuple(hw), mode="bicubic", align_corners=False, antialias=True
    ).clamp(0.0, 1.0)


def _anyres_tiles(images: Tensor, layout: AnyResLayout) -> Tensor:
    """``[N, 1 + tiles, C, tile, tile]``: the base tile, then the canvas cut row by row."""
    n, c = images.shape[:2]
    (rh, rw), (top, left), t = layout.resized, layout.offset, layout.tile
    # Padding is black before normalisation, as the processor pads the raw image with 0.
    canvas = images.new_zeros(n, c, *layout.canvas)
    canvas[:, :, top : top + rh, left : left + rw] = _resize(images, (rh, rw))
    rows, cols = layout.n_tiles
    tiles = canvas.reshape(n, c, rows, t, cols, t).permute(0, 2, 4, 1, 3, 5)
    base = _resize(images, (t, t))[:, None]
    return torch.cat([base, tiles.reshape(n, rows * cols, c, t, t)], dim=1)


def _qwen_patches(pixels: Tensor, vision: Any) -> tuple[Tensor, Tensor]:
    """Qwen2-VL's flat patches ``[images * patches, C * T * p * p]`` and grids ``[images, 3]``.

    Same order as ``Qwen2VLImageProcessor.patchify``: merge windows row by row, the patches
    of a window together, each patch repeated over the temporal patch size.
    """
    n, c, h, w = pixels.shape
    p, m, t = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
    gh, gw = h // p, w // p
    patches = pixels.reshape(n, c, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
    flat = patches.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, t, -1, -1)
    grid = torch.tensor([[1, gh, gw]] * n)
    return flat.reshape(n * gh * gw, c * t * p * p), grid


def vlm_inputs(
    config: Any,
    images: Tensor,
    texts: Sequence[Sequence[int]],
    *,
    mean: Sequence[float],
    std: Sequence[float],
    pad_token_id: int = 0,
    size: int | None = None,
) -> dict[str, Tensor]:
    """Model inputs for (image, text) pairs, built in torch (no processor, no torchvision).

    Args:
        config: The multimodal model's config.
        images: ``[N, C, H, W]`` in ``[0, 1]`` (grey images become RGB); LLaVA-Next tiles
            them by their own size ``(H, W)``.
        texts: Token ids of each image's caption (already tokenized, specials included).
        mean: Per-channel normalisation mean (the model's image processor's).
        std: Per-channel normalisation std.
        pad_token_id: Id right-padding the shorter sequences (masked out).
        size: Image side (default: the vision tower's resolution).

    Returns:
        ``input_ids``, ``attention_mask``, ``pixel_values`` and what the family also needs
        (``image_grid_thw`` and ``mm_token_type_ids`` for Qwen2-VL, ``token_type_ids`` for
        PaliGemma and Gemma-3, ``image_sizes`` for LLaVA-Next, whose ``pixel_values`` are
        ``[N, 1 + tiles, C, tile, tile]``: see :func:`anyres_layout`).
    """
    family = _family(config)
    if len(texts) != len(images):
        raise ConfigError(f"{len(images)} images but {len(texts)} texts; pass one text per image")
    size = image_resolution(config, size)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    image_hw = images.shape[-2:]
    if family in ANYRES:  # every image of a batch has one size, so one tiling
        pixels = _anyres_tiles(images.float(), anyres_layout(config, image_hw))
    else:
        pixels = _resize(images.float(), (size, size))
    shape = (3, 1, 1)
    pixels = (pixels - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)
    image = [image_token_id(config)] * image_token_count(config, size, image_hw)
    wrap = {
        "gemma3": ("boi_token_index", "eoi_token_index"),
        "qwen2_vl": ("vision_start_token_id", "vision_end_token_id"),
        "qwen2_5_vl": ("vision_start_token_id", "vision_end_token_id"),
    }.get(family)
    if wrap is not None:  # the processor brackets the image tokens with these
        image = [getattr(config, wrap[0]), *image, getattr(config, wrap[1])]
    rows = [image + list(text) for text in texts]
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
    inputs = {"input_ids": ids, "attention_mask": attention}
    if family in ("qwen2_vl", "qwen2_5_vl"):
        inputs["pixel_values"], inputs["image_grid_thw"] = _qwen_patches(
            pixels, config.vision_config
        )
    elif family in ANYRES:
        inputs["pixel_values"] = pixels
        inputs["image_sizes"] = torch.tensor([list(image_hw)] * len(images))
    elif family in ("idefics3", "smolvlm"):
        inputs["pixel_values"] = pixels[:, None]  # [batch, images per text, C, H, W]
    else:
        inputs["pixel_values"] = pixels
    # What the processors add: PaliGemma's and Gemma-3's token_type_ids give image tokens
    # bidirectional attention; Qwen2-VL's mm_token_type_ids place them in its 3-D RoPE.
    if family in ("paligemma", "gemma3"):
        inputs["token_type_ids"] = (ids == image_token_id(config)).long()
    if family in ("qwen2_vl", "qwen2_5_vl"):
        inputs["mm_token_type_ids"] = (ids == image_token_id(config)).long()
    return inputs
