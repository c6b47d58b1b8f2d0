"""Pixel boxes of image tokens, checked against each family's own modeling code.

The check is by gradients, not by re-deriving the layout: the vision tower's blocks are cut
(LLaVA keeps one block, whose input is the feature layer it reads), so what is left between
the pixels and the language model's image rows is per patch (patch embedding, layer norms,
projector MLPs) except the family's own regrouping (pixel shuffle, pooling, merge windows,
tiling and unpadding). The pixels an image row's gradient reaches are then exactly the
pixels it summarises, and must be the box.
"""

import pytest
import torch

from lightning_interp.backbones.image_patches import NO_PIXELS, image_token_boxes
from lightning_interp.backbones.multimodal import (
    anyres_layout,
    image_token_count,
    token_type_mask,
    vlm_inputs,
)
from lightning_interp.errors import ConfigError
from tests.backbones.test_backbone import by_hand
from tests.backbones.tiny_vlms import FAMILIES, IMAGE_HW, build

NORM = dict(mean=(0.5,) * 3, std=(0.5,) * 3)


def local_model(name, **config):
    """The tiny family with its vision blocks cut, so no pixels mix across patches."""
    model = build(name)
    for key, value in config.items():
        setattr(model.config, key, value)
    path = FAMILIES[name][0]
    parent, attr = path.rsplit(".", 1)
    keep = 1 if name.startswith("llava") else 0  # LLaVA reads the block-0 input (layer -2)
    blocks = model.get_submodule(path)
    setattr(model.get_submodule(parent), attr, torch.nn.ModuleList(list(blocks)[:keep]))
    vision = model.config.vision_config  # the hidden states LLaVA reads are counted from it
    setattr(vision, "depth" if name.startswith("qwen") else "num_hidden_layers", keep)
    return model


def reached(model, name, batch, leaf):
    """Per image row of the LM's input: which elements of ``leaf`` its gradient reaches."""

    def run(**inputs):
        with torch.enable_grad():
            return model(**inputs)

    embeds = by_hand(model, batch, f"{FAMILIES[name][3]}.0", "input", runner=run)
    rows = embeds[token_type_mask(batch["input_ids"], model.config, "image")]
    weight = torch.randn(rows.shape[-1], generator=torch.Generator().manual_seed(0))
    # One backward per row, batched: row k's gradient is the k-th slice.
    (grads,) = torch.autograd.grad(
        rows @ weight, leaf, grad_outputs=torch.eye(len(rows)), is_grads_batched=True
    )
    return list(grads.abs() > 0)


def box_mask(box, shape):
    mask = torch.zeros(shape, dtype=torch.bool)
    if box[0] != NO_PIXELS:
        mask[box[0] : box[2], box[1] : box[3]] = True
    return mask


ANYRES = ("llava_next", "llava_onevision")


@pytest.mark.parametrize("name", [n for n in sorted(FAMILIES) if n not in ANYRES])
def test_boxes_are_the_pixels_each_image_token_reads(name):
    model = local_model(name)
    size = FAMILIES[name][-1] or model.config.vision_config.image_size
    images = torch.rand(1, 3, size, size, requires_grad=True)  # no resize at the tower's size
    batch = vlm_inputs(model.config, images, [[1, 7]], **NORM, size=size)
    boxes = image_token_boxes(model.config, size)
    assert boxes.shape == (image_token_count(model.config, size), 4)
    reach = reached(model, name, batch, images)
    for k, (box, grad) in enumerate(zip(boxes.tolist(), reach, strict=True)):
        assert torch.equal(grad[0].any(0), box_mask(box, (size, size))), (name, k, box)
    # The tokens tile the image: every pixel is read by exactly one token.
    cover = sum(box_mask(box, (size, size)).int() for box in boxes.tolist())
    assert torch.equal(cover, torch.ones(size, size, dtype=torch.int))


def test_llava_full_strategy_puts_the_class_token_first():
    model = local_model("llava", vision_feature_select_strategy="full")
    size = model.config.vision_config.image_size
    images = torch.rand(1, 3, size, size, requires_grad=True)
    batch = vlm_inputs(model.config, images, [[1, 7]], **NORM)
    boxes = image_token_boxes(model.config)
    assert boxes.shape == (17, 4) and boxes[0].tolist() == [0, 0, size, size]
    reach = reached(model, "llava", batch, images)
    # Cut before any attention, the class token reads no pixel; each patch token its box.
    assert not reach[0].any()
    for box, grad in zip(boxes[1:].tolist(), reach[1:], strict=True):
        assert torch.equal(grad[0].any(0), box_mask(box, (size, size)))
    # With its blocks, the class token reads every pixel (the whole-image box).
    whole = build("llava")
    whole.config.vision_feature_select_strategy = "full"
    images = torch.rand(1, 3, size, size, requires_grad=True)
    batch = vlm_inputs(whole.config, images, [[1, 7]], **NORM)
    assert reached(whole, "llava", batch, images)[0][0].any(0).all()


@pytest.mark.parametrize("name", ANYRES)
@pytest.mark.parametrize("image_hw", [IMAGE_HW, (8, 20), (20, 8), (40, 40)])
def test_anyres_boxes_follow_the_tiling_and_unpadding(name, image_hw):
    model = local_model(name)
    images = torch.rand(1, 3, *image_hw)
    batch = vlm_inputs(model.config, images, [[1, 7]], **NORM)
    pixels = batch["pixel_values"].clone().requires_grad_(True)
    batch["pixel_values"] = pixels
    layout = anyres_layout(model.config, image_hw)
    boxes = image_token_boxes(model.config, image_hw=image_hw)
    assert len(boxes) == layout.n_tokens == image_token_count(model.config, image_hw=image_hw)
    rows, cols = layout.n_tiles
    tile, base = layout.tile, layout.grid**2
    reach = reached(model, name, batch, pixels)
    for k, (box, grad) in enumerate(zip(boxes.tolist(), reach, strict=True)):
        grad = grad[0].any(1)  # [1 + tiles, tile, tile]
        # The grid tiles put back as the canvas they were cut from, row by row.
        canvas = grad[1:].view(rows, cols, tile, tile).permute(0, 2, 1, 3)
        canvas = canvas.reshape(rows * tile, cols * tile)
        if k < base:
            assert torch.equal(grad[0], box_mask(box, (tile, tile))) and not canvas.any()
        else:  # a grid patch, or a newline (no pixels)
            assert not grad[0].any() and torch.equal(canvas, box_mask(box, layout.canvas)), k
    newlines = (boxes[base:, 0] == NO_PIXELS).sum()
    assert newlines == layout.kept[2]  # one per kept row


def test_llava_next_tiles_are_the_canvas_cut_row_by_row():
    model = build("llava_next")
    images = torch.rand(1, 3, 32, 64)  # already the 32 x 64 pinpoint: no resize, no padding
    batch = vlm_inputs(model.config, images, [[1]], mean=(0.0,) * 3, std=(1.0,) * 3)
    tiles = batch["pixel_values"][0]
    torch.testing.assert_close(tiles[1], images[0, :, :, :32], rtol=0, atol=0)
    torch.testing.assert_close(tiles[2], images[0, :, :, 32:], rtol=0, atol=0)
    layout = anyres_layout(model.config, (32, 64))
    assert layout.offset == (0, 0) and layout.kept == (0, 0, 4, 8)
    assert batch["image_sizes"].tolist() == [[32, 64]]


def test_llava_next_refusals_name_the_fix():
    model = build("llava_next")
    with pytest.raises(ConfigError, match="pass image_hw"):
        image_token_boxes(model.config)
    with pytest.raises(ConfigError, match="leave size unset"):
        vlm_inputs(model.config, torch.rand(1, 3, 8, 8), [[1]], **NORM, size=64)
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(ConfigError, match="vision_feature_select_strategy='default'"):
        image_token_count(model.config, image_hw=(8, 8))
    model.config.vision_feature_select_strategy = "default"
    model.config.image_grid_pinpoints = [[32, 48]]
    with pytest.raises(ConfigError, match="multiples of the tile side"):
        anyres_layout(model.config, (8, 8))


def test_onevision_shrinks_large_grids_and_refuses_their_boxes():
    model = build("llava_onevision")
    model.config.image_grid_pinpoints = [[32 * a, 32 * b] for a in range(1, 7) for b in range(1, 7)]
    layout = anyres_layout(model.config, (200, 90))
    # 24 x 10 kept patches exceed 9 tiles' worth (1.1 x 9 x 16): shrunk to 18 x 7.
    assert layout.kept == (0, 1, 24, 10) and layout.rows_cols == (18, 7)
    batch = vlm_inputs(model.config, torch.rand(1, 3, 200, 90), [[1, 7]], **NORM)
    # The model raises when the image tokens and its features differ in number.
    with torch.no_grad():
        model(**batch)
    assert (batch["input_ids"] == model.config.image_token_id).sum() == 16 + 18 * 8
    with pytest.raises(ConfigError, match="no exact box"):
        image_token_boxes(model.config, image_hw=(200, 90))
