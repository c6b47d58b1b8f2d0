"""CLIP vision activations of images: token selection, shuffling, processor input."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_interp.backbones import Backbone
from lightning_interp.data.images import ImageActivations, select_tokens
from lightning_interp.errors import ConfigError
from tests.backbones.tiny_models import build


@pytest.fixture(scope="module")
def clip():
    return Backbone(build("clip"))


def test_token_selection():
    acts = torch.arange(2 * 5 * 3.0).view(2, 5, 3)
    assert select_tokens(acts, "cls").shape == (2, 3)
    torch.testing.assert_close(select_tokens(acts, "cls"), acts[:, 0])
    assert select_tokens(acts, "patches").shape == (8, 3)
    assert select_tokens(acts, "all").shape == (10, 3)
    with pytest.raises(ConfigError, match="'all', 'cls' or 'patches'"):
        select_tokens(acts, "pooled")


def test_every_token_of_every_image_is_served_once_per_epoch(clip):
    pixels = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    dataset = ImageActivations(
        clip,
        pixels,
        "vision.layers.1.resid_post",
        batch_size=17,
        images_per_capture=4,
        buffer_tokens=64,
    )
    batches = list(dataset)
    assert all(list(batch) == ["vision.layers.1.resid_post"] for batch in batches)  # by site
    rows = torch.cat([batch["vision.layers.1.resid_post"] for batch in batches])
    assert rows.shape == (170, 32)  # 10 images x 17 tokens, in batches of 17
    expected = clip.capture({"pixel_values": pixels}, "vision.layers.1.resid_post")
    expected = expected["vision.layers.1.resid_post"].reshape(-1, 32)
    key = lambda t: sorted(map(float, t.sum(-1)))  # noqa: E731
    assert key(rows) == pytest.approx(key(expected), abs=1e-4)
    # Shuffled: consecutive rows are not one image's consecutive tokens.
    assert not torch.allclose(rows[:17], expected[:17])
    again = torch.cat(
        [
            batch["vision.layers.1.resid_post"]
            for batch in ImageActivations(
                clip,
                pixels,
                "vision.layers.1.resid_post",
                batch_size=17,
                images_per_capture=4,
                buffer_tokens=64,
            )
        ]
    )
    torch.testing.assert_close(again, rows)  # same seed, same first epoch


class ResizeProcessor:
    """A processor in the transformers calling convention: ``(images=..., return_tensors)``.

    (transformers 5's CLIPImageProcessor needs torchvision, which cannot be installed beside
    this torch here.)
    """

    def __call__(self, images, return_tensors="pt"):
        batch = torch.stack([torch.as_tensor(im).permute(2, 0, 1).float() / 255 for im in images])
        return {"pixel_values": torch.nn.functional.interpolate(batch, size=(32, 32))}


def test_cls_rows_from_raw_images_through_a_processor():
    backbone = Backbone(build("clip"), ResizeProcessor())
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40, 48, 3), dtype=np.uint8) for _ in range(6)]
    dataset = ImageActivations(
        backbone,
        images,
        "vision.layers.0.resid_post",
        batch_size=3,
        tokens="cls",
        images_per_capture=3,
        buffer_tokens=6,
    )
    batches = [b["vision.layers.0.resid_post"] for b in DataLoader(dataset, batch_size=None)]
    assert [tuple(b.shape) for b in batches] == [(3, 32), (3, 32)]
    pixels = ResizeProcessor()(images)["pixel_values"]
    cls = backbone.capture({"pixel_values": pixels}, "vision.layers.0.resid_post")
    cls = cls["vision.layers.0.resid_post"][:, 0]
    served = torch.cat(batches)
    assert sorted(map(float, served.sum(-1))) == pytest.approx(
        sorted(map(float, cls.sum(-1))), abs=1e-4
    )
