"""Image feature stores (CLIP vision): a dense brute force over patches, thumbnails, resume,
the dashboard (in chromium where installed), the command and the end-of-fit callback."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from lightning_interp import create_dictionary
from lightning_interp.backbones import Backbone
from lightning_interp.cli import run_extra_command
from lightning_interp.dictionaries.config import Provenance
from lightning_interp.dictionaries.serialization import save_dictionary
from lightning_interp.features.build_images import ImageSet, build_image_feature_store, png_bytes
from lightning_interp.features.dashboard import build_dashboard
from lightning_interp.features.layout import partial_folder, read_store
from lightning_interp.features.store import FeatureSettings
from tests.backbones.tiny_models import build
from tests.features.test_dashboard import (
    assert_not_blank,
    chromium,
    index_rows,
    needs_chromium,
    png_pixels,
)
from tests.test_recipes import quiet_one_thread, run_recipe, tiny_recipe

__all__ = ["quiet_one_thread"]  # the recipe tests' fixture: one thread, a clean argv

SITE = "vision.layers.1.resid_post"
LENGTH, GRID = 17, 4  # the tiny tower: 32 px images, 8 px patches, a class token first
SETTINGS = FeatureSettings(top_k=4, quantile_bins=3, per_quantile=2, correlated=4)


def tiny_images(n: int = 26) -> list[torch.Tensor]:
    """Generated images of two sizes (one grey), as a folder of photographs would differ."""
    gen = torch.Generator().manual_seed(0)
    return [
        torch.rand(1 if i % 5 == 0 else 3, 20 + 4 * (i % 2), 24, generator=gen) for i in range(n)
    ]


@pytest.fixture(scope="module")
def world():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only contends on a busy machine
    torch.manual_seed(0)
    backbone = Backbone(build("clip_vision"))
    sae = create_dictionary("topk", d_in=32, d_latent=24, k=3)
    with torch.no_grad():  # latents 0 and 1 never fire: dead latents must give zeros
        sae.W_enc[:, :2] = 0
        sae.b_enc[:2] = -1
    yield backbone, sae
    torch.set_num_threads(threads)


def dense_codes(backbone, sae, images: ImageSet) -> torch.Tensor:
    """``[images, L, F]`` codes at every position, the same capture batches as the pass."""
    parts = []
    for start in range(0, images.count, images.images_per_capture):
        stop = min(start + images.images_per_capture, images.count)
        acts = backbone.capture({"pixel_values": images.pixels(start, stop, 32)}, SITE)[SITE]
        with torch.no_grad():
            parts.append(sae.encode(acts.reshape(-1, acts.shape[-1])).view(*acts.shape[:2], -1))
    return torch.cat(parts)


def build_store(world, folder: Path, tokens: str):
    """``(store folder, store, dense codes [images, L, F], images)`` over the tiny images."""
    backbone, sae = world
    images = ImageSet(tiny_images(), name="generated", tokens=tokens, images_per_capture=4)
    out = folder / "store"
    build_image_feature_store(
        sae, backbone, images, out, site=SITE, settings=SETTINGS, progress=False
    )
    codes = dense_codes(backbone, sae, images)
    if tokens == "patches":  # the class token counts for nothing
        codes[:, 0] = 0
    return out, read_store(out), codes, images


@pytest.fixture(scope="module", params=["all", "patches"])
def built(world, tmp_path_factory, request):
    return build_store(world, tmp_path_factory.mktemp("images"), request.param)


def test_top_examples_equal_a_dense_brute_force_over_patches(built):
    _, store, codes, _ = built
    contexts, stats = store["contexts"], store["stats"]
    n_images, length, width = codes.shape
    maxima, argmax = codes.max(1)  # [images, F]: the first position on ties
    assert torch.equal(stats["count"], (codes > 0).sum((0, 1)))
    assert torch.allclose(stats["max_activation"], maxima.max(0).values, atol=1e-5)
    for f in range(width):
        # Largest first, the earlier image on ties: a stable sort of the images.
        order = torch.argsort(-maxima[:, f], stable=True)
        expected = [int(i) for i in order[: SETTINGS.top_k] if maxima[i, f] > 0]
        got = contexts["top_image"][f]
        assert got[: len(expected)].tolist() == expected, f"latent {f}"
        assert (got[len(expected) :] == -1).all()
        for slot, image in enumerate(expected):
            assert contexts["top_values"][f, slot] == pytest.approx(float(maxima[image, f]), 1e-5)
            assert int(contexts["top_center"][f, slot]) == int(argmax[image, f])
            assert int(contexts["top_source"][f, slot]) == image * length + int(argmax[image, f])
            # The whole image: slot j of the window is position j (CLS, then the patches).
            assert contexts["top_tokens"][f, slot].tolist() == list(range(length))
            torch.testing.assert_close(
                contexts["top_activations"][f, slot].float(),
                codes[image, :, f],
                atol=2e-3,
                rtol=2e-3,  # float16 windows
            )
    assert (stats["count"][:2] == 0).all() and (contexts["top_image"][:2] == -1).all()


def test_quantile_examples_are_whole_images_in_their_bins(built):
    _, store, codes, _ = built
    contexts, stats = store["contexts"], store["stats"]
    maxima = codes.max(1).values
    q, per = SETTINGS.quantile_bins, SETTINGS.per_quantile
    seen = 0
    for f, slot in (contexts["quantile_image"] >= 0).nonzero().tolist():
        image, value = (
            int(contexts["quantile_image"][f, slot]),
            contexts["quantile_values"][f, slot],
        )
        assert value == pytest.approx(float(maxima[image, f]), 1e-5)
        share = float(value / stats["max_activation"][f])
        assert (slot // per) / q - 1e-6 < share <= (slot // per + 1) / q + 1e-6
        torch.testing.assert_close(
            contexts["quantile_activations"][f, slot].float(),
            codes[image, :, f],
            atol=2e-3,
            rtol=2e-3,
        )
        seen += 1
    assert seen > 20


def test_store_json_names_the_modality_the_grid_and_the_positions(built):
    out, store, codes, images = built
    meta = store["meta"]
    assert meta["modality"] == "image" and meta["logit_lens"] == 0 and meta["window"] == LENGTH
    assert meta["image"]["grid"] == [GRID, GRID] and meta["image"]["class_token"] is True
    assert meta["image"]["tokens"] == images.tokens
    kept = LENGTH - (images.tokens == "patches")
    assert meta["corpus"] == {
        "dataset": "generated",
        "tokens": len(codes) * kept,
        "context_size": LENGTH,
        "images": len(codes),
    }
    assert store["vocab"]["0"] == "CLS" and store["vocab"]["16"] == "patch 3,3"
    assert "logit_top_ids" not in store["stats"]


def test_thumbnails_are_the_shown_images_as_the_model_sees_them(built):
    out, store, _, images = built
    shown = torch.cat([store["contexts"]["top_image"], store["contexts"]["quantile_image"]], 1)
    expected = set(shown[shown >= 0].tolist())
    files = {int(p.stem) for p in (out / "images").glob("*.png")}
    assert files == expected and store["meta"]["image"]["thumbnails"] == len(files)
    image = min(files)
    rows = png_pixels(out / "images" / f"{image}.png")
    thumb = images.thumbnail_rgb(image)
    assert thumb.shape == (96, 96, 3)
    assert rows == [bytes(row) for row in thumb.reshape(96, -1).tolist()]  # lossless


def test_png_bytes_round_trips_any_pixels(tmp_path):
    pixels = torch.randint(0, 256, (5, 7, 3), generator=torch.Generator().manual_seed(1))
    (tmp_path / "x.png").write_bytes(png_bytes(pixels.to(torch.uint8)))
    assert png_pixels(tmp_path / "x.png") == [bytes(row) for row in pixels.reshape(5, -1).tolist()]


class Dying(list):
    """Images that raise (a kill) when image ``at`` is read."""

    at = 10**9

    def __getitem__(self, index):
        if isinstance(index, int) and index >= self.at:
            raise KeyboardInterrupt
        return super().__getitem__(index)


def test_a_killed_image_pass_resumes_to_the_same_store(world, tmp_path):
    backbone, sae = world
    common = dict(name="generated", images_per_capture=4)
    full = build_image_feature_store(
        sae,
        backbone,
        ImageSet(tiny_images(), **common),
        tmp_path / "full",
        site=SITE,
        settings=SETTINGS,
        progress=False,
    )
    dying = Dying(tiny_images())
    dying.at = 14  # in the fourth batch of four
    out = tmp_path / "resumed"
    run = dict(site=SITE, settings=SETTINGS, checkpoint_every=1, progress=False)
    with pytest.raises(KeyboardInterrupt):
        build_image_feature_store(sae, backbone, ImageSet(dying, **common), out, **run)
    progress = json.loads((partial_folder(out) / "progress.json").read_text())
    assert not out.exists() and progress["images"] == 12
    build_image_feature_store(sae, backbone, ImageSet(tiny_images(), **common), out, **run)
    assert not partial_folder(out).exists()
    a, b = read_store(full), read_store(out)
    assert a["meta"] == b["meta"] and a["vocab"] == b["vocab"]
    for group in ("stats", "contexts"):
        assert a[group].keys() == b[group].keys()
        for name in a[group]:
            assert torch.equal(a[group][name], b[group][name]), name
    assert sorted(p.name for p in (full / "images").iterdir()) == sorted(
        p.name for p in (out / "images").iterdir()
    )


def test_other_sites_and_settings_are_refused(world, tmp_path):
    from lightning_interp.errors import ConfigError

    backbone, sae = world
    images = ImageSet(tiny_images(4))
    text = Backbone(build("gpt2"))
    with pytest.raises(ConfigError, match="not in a vision tower"):
        build_image_feature_store(
            create_dictionary("topk", d_in=32, d_latent=8, k=2),
            text,
            images,
            tmp_path / "a",
            site="layers.1.resid_post",
            progress=False,
        )
    with pytest.raises(ConfigError, match="'all', 'patches' or 'cls'"):
        ImageSet(tiny_images(2), tokens="pooled")


# ---------------------------------------------------------------------------- dashboard
@pytest.fixture(scope="module")
def shown(world, tmp_path_factory):
    """A store of all positions (as the CLIP recipe trains) and its dashboard folder."""
    built = build_store(world, tmp_path_factory.mktemp("images"), "all")
    return built, build_dashboard(built[0], tmp_path_factory.mktemp("html") / "html").parent


def busiest(store) -> int:
    return int(store["stats"]["count"].argmax())


def test_a_latent_page_shows_thumbnails_with_the_patch_overlay(shown):
    (_, store, codes, _), site = shown
    f = busiest(store)
    page = (site / "latents" / f"{f}.html").read_text(encoding="utf-8")
    top = [i for i in store["contexts"]["top_image"][f].tolist() if i >= 0]
    shown = re.findall(r'<img src="\.\./images/(\d+)\.png"', page)
    assert [int(i) for i in shown[: len(top)]] == top  # the top images, strongest first
    assert all((site / "images" / f"{i}.png").is_file() for i in shown)
    # One cell per firing patch of each top image, placed at its row and column.
    first = re.search(r'<div class="grid" style="--side:4">(.*?)</div>', page).group(1)
    cells = re.findall(r'grid-area:(\d+)/(\d+)" title="patch (\d),(\d)', first)
    firing = (codes[top[0], 1:, f] > 0).nonzero().squeeze(1).tolist()
    assert sorted((int(r) - 1) * GRID + int(c) - 1 for r, c, _, _ in cells) == firing
    assert all(int(r) - 1 == int(pr) and int(c) - 1 == int(pc) for r, c, pr, pc in cells)
    assert 'class="c" style="--a:1.00' in first  # the latent's max, outlined
    assert [row[6] for row in index_rows(site)][f][0] == f"image {top[0]}"


@needs_chromium
def test_an_image_latent_page_in_a_browser(shown, tmp_path):
    (_, store, _, _), site = shown
    f = busiest(store)
    page = (site / "latents" / f"{f}.html").as_uri()
    dom = chromium(tmp_path, "--dump-dom", page)
    assert len(re.findall(r'<img src="\.\./images/\d+\.png"', dom)) >= 4
    assert len(re.findall(r'<span (class="c" )?style="--a:[0-9.]+;grid-area:', dom)) >= 4
    assert "<script" not in dom
    shot = tmp_path / "latent.png"
    chromium(tmp_path, f"--screenshot={shot}", page)
    assert_not_blank(shot)
    index = chromium(tmp_path, "--dump-dom", (site / "index.html").as_uri())
    assert "top images" in index and '<span class="chip">image ' in index


# ---------------------------------------------------------------------------- command
@pytest.fixture
def vision_dictionary(world, tmp_path):
    backbone, sae = world
    model = tmp_path / "clip"
    backbone.model.save_pretrained(model)
    provenance = Provenance(
        backbone="org/tiny-clip",
        site=SITE,
        dataset="digits",
        extra={
            "backbone_source": str(model),
            "dataset_source": "offline:digits",
            "image_tokens": "patches",
        },
    )
    trained = dataclasses.replace(sae.config, provenance=provenance)
    sae_copy = create_dictionary("topk", d_in=32, d_latent=24, k=3)
    sae_copy.load_state_dict(sae.state_dict())
    sae_copy.config = trained
    save_dictionary(sae_copy, tmp_path / "dictionary")
    return tmp_path


def test_the_features_command_reads_the_recorded_images(vision_dictionary, capsys):
    folder = vision_dictionary
    args = ["features", str(folder / "dictionary"), "--out", str(folder / "store")]
    code = run_extra_command(args[0], [*args[1:], "--max-images", "20", "--top-k", "3", "--quiet"])
    assert code == 0, capsys.readouterr().err
    meta = read_store(folder / "store")["meta"]
    assert meta["modality"] == "image" and meta["corpus"]["images"] == 20
    assert meta["corpus"]["dataset"] == "offline:digits" and meta["image"]["tokens"] == "patches"
    assert meta["corpus"]["tokens"] == 20 * 16 and meta["top_k"] == 3
    assert capsys.readouterr().out.strip() == str(folder / "store")
    code = run_extra_command(args[0], [args[1], "--out", str(folder / "s2"), "--tokens", "9"])
    assert code == 2 and "--max-images" in capsys.readouterr().err


# ---------------------------------------------------------------------------- callback
def test_fit_on_images_ends_with_an_image_store_and_dashboard(tmp_path, capsys):
    clip = tmp_path / "clip"
    model = build("clip")
    model.save_pretrained(clip)
    run = tmp_path / "run"
    recipe = tiny_recipe("clip_vit_b32_vision_topk.yaml", ({"clip": clip}, None), run)
    recipe["trainer"]["callbacks"].append(
        {
            "class_path": "lightning_interp.callbacks.FeatureDashboard",
            "init_args": {"images": 24, "top_k": 3},
        }
    )
    run_recipe(recipe, tmp_path / "recipe.yaml")
    meta = json.loads((run / "features" / "store.json").read_text())
    assert meta["modality"] == "image" and meta["corpus"]["images"] == 24
    assert meta["image"]["tokens"] == "all"  # the recipe's, from the data module's provenance
    index = run / "dashboard" / "index.html"
    printed = capsys.readouterr()
    assert f"dashboard: {index.resolve()}" in printed.out.splitlines()
    assert "features: 24/24 images, " in printed.err  # the progress line, counting images
    pages = list((run / "dashboard" / "latents").glob("*.html"))
    assert len(pages) == 128 and any("../images/" in p.read_text() for p in pages)
