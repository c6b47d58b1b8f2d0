"""Multimodal feature stores (an LM site of a tiny random Idefics3 over image + caption
sequences): a dense brute force over positions, the boxes of image tokens, the dashboard (in
chromium where installed) and the command."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from lightning_interp import create_dictionary
from lightning_interp.backbones import Backbone
from lightning_interp.backbones.image_patches import image_token_boxes
from lightning_interp.backbones.multimodal import vlm_inputs
from lightning_interp.cli import run_extra_command
from lightning_interp.data.multimodal_datamodule import ImageTextActivations
from lightning_interp.dictionaries.config import Provenance
from lightning_interp.dictionaries.serialization import save_dictionary
from lightning_interp.errors import ConfigError
from lightning_interp.features.build_multimodal import build_multimodal_feature_store
from lightning_interp.features.dashboard import build_dashboard
from lightning_interp.features.layout import partial_folder, read_store
from lightning_interp.features.store import FeatureSettings
from tests.backbones.tiny_vlms import FAMILIES, IMAGE_TOKEN, build
from tests.data.test_tokens import make_tokenizer
from tests.features.test_dashboard import assert_not_blank, chromium, needs_chromium

SITE = "layers.1.resid_post"
SETTINGS = FeatureSettings(top_k=4, quantile_bins=3, per_quantile=2, correlated=4)
N_IMAGE = 4  # Idefics3: 32 px, 8 px patches, pixel shuffle by 2 -> a 2 x 2 grid of tokens
MEAN = STD = (0.5,) * 3


@pytest.fixture(scope="module")
def world():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only contends on a busy machine
    tokenizer = make_tokenizer()
    backbone = Backbone(build("idefics3"), tokenizer)
    torch.manual_seed(0)
    sae = create_dictionary("topk", d_in=32, d_latent=16, k=3)
    images = torch.rand(14, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    yield backbone, sae, images, tokenizer("w1 w2 w3")["input_ids"]
    torch.set_num_threads(threads)


def reader(world, token_types: str) -> ImageTextActivations:
    backbone, _, images, caption = world
    return ImageTextActivations(
        backbone,
        images,
        SITE,
        caption_ids=caption,
        token_types=token_types,
        mean=MEAN,
        std=STD,
        pad_token_id=3,
        batch_size=8,
        buffer_tokens=64,
        images_per_capture=4,
    )


def dense_codes(world, token_types: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes [images, L, F] at every position, zero where not kept; input_ids [L])``."""
    backbone, sae, images, caption = world
    config = backbone.model.config
    inputs = vlm_inputs(config, images, [caption] * len(images), mean=MEAN, std=STD)
    acts = backbone.capture(inputs, SITE)[SITE]
    with torch.no_grad():
        codes = sae.encode(acts.reshape(-1, acts.shape[-1])).view(*acts.shape[:2], -1)
    ids = inputs["input_ids"][0]
    if token_types == "image":
        codes[:, ids != IMAGE_TOKEN] = 0
    return codes, ids


@pytest.fixture(scope="module", params=["all", "image"])
def built(world, tmp_path_factory, request):
    out = tmp_path_factory.mktemp("mm") / "store"
    build_multimodal_feature_store(
        world[1], reader(world, request.param), out, settings=SETTINGS, progress=False
    )
    return out, read_store(out), *dense_codes(world, request.param)


def test_top_examples_equal_a_dense_brute_force_over_positions(built):
    _, store, codes, _ = built
    contexts, stats = store["contexts"], store["stats"]
    length = codes.shape[1]
    maxima, argmax = codes.max(1)  # [images, F]: the first position on ties
    assert torch.equal(stats["count"], (codes > 0).sum((0, 1)))
    seen = 0
    for f in range(codes.shape[2]):
        order = torch.argsort(-maxima[:, f], stable=True)  # the earlier image on ties
        expected = [int(i) for i in order[: SETTINGS.top_k] if maxima[i, f] > 0]
        got = contexts["top_image"][f]
        assert got[: len(expected)].tolist() == expected, f"latent {f}"
        assert (got[len(expected) :] == -1).all()
        for slot, image in enumerate(expected):
            assert contexts["top_values"][f, slot] == pytest.approx(float(maxima[image, f]), 1e-4)
            assert int(contexts["top_center"][f, slot]) == int(argmax[image, f])
            assert contexts["top_tokens"][f, slot].tolist() == list(range(length))
            torch.testing.assert_close(
                contexts["top_activations"][f, slot].float(),
                codes[image, :, f],
                atol=2e-3,
                rtol=2e-3,  # float16 windows
            )
            seen += 1
    assert seen > 20


def test_each_example_knows_its_image_token_and_box(built, world):
    _, store, codes, ids = built
    config = world[0].model.config
    boxes = image_token_boxes(config)
    spec = store["meta"]["multimodal"]
    is_image = ids == IMAGE_TOKEN
    assert spec["input_ids"] == ids.tolist() and spec["boxes"] == boxes.tolist()
    assert spec["ordinals"] == torch.where(is_image, is_image.cumsum(0) - 1, -1).tolist()
    assert len(boxes) == N_IMAGE and store["meta"]["image"]["image_size"] == 32
    assert store["vocab"]["0"] == "image token 0" and store["vocab"][str(N_IMAGE)] == "w1"
    contexts, image_examples = store["contexts"], 0
    for prefix in ("top_", "quantile_"):
        for f, slot in (contexts[f"{prefix}source"] >= 0).nonzero().tolist():
            ordinal = spec["ordinals"][int(contexts[f"{prefix}center"][f, slot])]
            box = contexts[f"{prefix}box"][f, slot].tolist()
            assert box == (boxes[ordinal].tolist() if ordinal >= 0 else [-1] * 4)
            image_examples += ordinal >= 0
    assert image_examples > 10
    if spec["token_types"] == "image":  # text positions never count
        assert (contexts["top_box"][contexts["top_source"] >= 0] >= 0).all()


def test_thumbnails_are_the_shown_images(built):
    out, store, _, _ = built
    shown = torch.cat([store["contexts"]["top_image"], store["contexts"]["quantile_image"]], 1)
    files = {int(p.stem) for p in (out / "images").glob("*.png")}
    assert files == set(shown[shown >= 0].tolist()) and store["meta"]["modality"] == "multimodal"


def test_a_killed_pass_resumes_to_the_same_store(world, tmp_path):
    full, out = tmp_path / "full", tmp_path / "resumed"
    run = dict(settings=SETTINGS, checkpoint_every=1, progress=False)
    build_multimodal_feature_store(world[1], reader(world, "all"), full, **run)
    dying, calls = reader(world, "all"), []
    capture = dying.capture_with_positions

    def killed_in_the_third_batch(indices):
        calls.append(indices)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return capture(indices)

    dying.capture_with_positions = killed_in_the_third_batch
    with pytest.raises(KeyboardInterrupt):
        build_multimodal_feature_store(world[1], dying, out, **run)
    assert not out.exists() and partial_folder(out).exists()
    build_multimodal_feature_store(world[1], reader(world, "all"), out, **run)
    a, b = read_store(full), read_store(out)
    assert a["meta"] == b["meta"] and a["vocab"] == b["vocab"] and not partial_folder(out).exists()
    for group in ("stats", "contexts"):
        assert a[group].keys() == b[group].keys()
        assert all(torch.equal(a[group][k], b[group][k]) for k in a[group]), group


@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "gemma3"])
def test_other_families_record_their_own_boxes(world, name, tmp_path):
    """Qwen2-VL and Gemma-3 bracket the image tokens with text specials; LLaVA has 16."""
    stream = reader(world, "image")
    stream.backbone, stream.image_size = Backbone(build(name)), FAMILIES[name][-1]
    out = tmp_path / "store"
    build_multimodal_feature_store(world[1], stream, out, max_images=6, progress=False)
    spec = read_store(out)["meta"]["multimodal"]
    ids = torch.tensor(spec["input_ids"])
    assert (
        spec["boxes"] == image_token_boxes(stream.backbone.model.config, stream.image_size).tolist()
    )
    assert [k for k in spec["ordinals"] if k >= 0] == list(range(len(spec["boxes"])))
    assert ((torch.tensor(spec["ordinals"]) >= 0) == (ids == IMAGE_TOKEN)).all()


def test_vision_sites_and_tiled_families_are_refused(world, tmp_path):
    stream = reader(world, "image")
    stream.site = "vision.layers.0.resid_post"
    with pytest.raises(ConfigError, match="language-model site"):
        build_multimodal_feature_store(world[1], stream, tmp_path / "a", progress=False)
    tiled = reader(world, "image")
    tiled.backbone = Backbone(build("llava_next"))
    with pytest.raises(ConfigError, match="LLaVA-Next"):
        build_multimodal_feature_store(world[1], tiled, tmp_path / "b", progress=False)


# ---------------------------------------------------------------------------- dashboard
@pytest.fixture(scope="module")
def site(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("mm") / "store"
    build_multimodal_feature_store(
        world[1], reader(world, "all"), out, settings=SETTINGS, progress=False
    )
    store = read_store(out)
    html = build_dashboard(out, tmp_path_factory.mktemp("html") / "html").parent
    return store, html


def busiest_image_latent(store) -> int:
    """The latent firing most whose strongest example is on an image token."""
    on_image = store["contexts"]["top_box"][:, 0, 0] >= 0
    return int(torch.where(on_image, store["stats"]["count"], -1).argmax())


def test_a_latent_page_shows_boxes_over_thumbnails_and_the_caption(site):
    store, html = site
    f = busiest_image_latent(store)
    page = (html / "latents" / f"{f}.html").read_text(encoding="utf-8")
    top = [i for i in store["contexts"]["top_image"][f].tolist() if i >= 0]
    shown = re.findall(r'<img src="\.\./images/(\d+)\.png"', page)
    assert [int(i) for i in shown[: len(top)]] == top
    assert all((html / "images" / f"{i}.png").is_file() for i in shown)
    first = re.search(r'<div class="boxes">(.*?)</div>', page).group(1)
    # The strongest example's maximum, outlined, at its box in percent of the image.
    top_, left, bottom, right = (100 * v / 32 for v in store["contexts"]["top_box"][f, 0].tolist())
    centre = f'class="c" style="--a:1.00;top:{top_:.2f}%;left:{left:.2f}%;'
    assert centre + f"height:{bottom - top_:.2f}%;width:{right - left:.2f}%" in first
    assert '<span class="toks">' in page and "w1" in page  # the caption


@needs_chromium
def test_a_multimodal_latent_page_in_a_browser(site, tmp_path):
    store, html = site
    page = (html / "latents" / f"{busiest_image_latent(store)}.html").as_uri()
    dom = chromium(tmp_path, "--dump-dom", page)
    assert len(re.findall(r'<img src="\.\./images/\d+\.png"', dom)) >= 4
    assert len(re.findall(r'<div class="boxes"><span (class="c" )?style="--a:', dom)) >= 4
    shot = tmp_path / "latent.png"
    chromium(tmp_path, f"--screenshot={shot}", page)
    assert_not_blank(shot)


# ---------------------------------------------------------------------------- command
def test_the_features_command_reads_image_caption_sequences(world, tmp_path, capsys):
    backbone, sae, _, _ = world
    model = tmp_path / "vlm"
    backbone.model.save_pretrained(model)
    make_tokenizer().save_pretrained(model)
    extra = {"backbone_source": str(model), "dataset_source": "offline:digits"}
    provenance = Provenance(
        backbone="org/tiny-vlm",
        site=SITE,
        dataset="digits",
        extra={**extra, "caption": "w1 w2", "token_types": "image"},
    )
    trained = create_dictionary("topk", d_in=32, d_latent=16, k=3)
    trained.load_state_dict(sae.state_dict())
    trained.config = dataclasses.replace(sae.config, provenance=provenance)
    save_dictionary(trained, tmp_path / "dictionary")
    args = [str(tmp_path / "dictionary"), "--out", str(tmp_path / "store")]
    code = run_extra_command("features", [*args, "--max-images", "12", "--top-k", "3", "--quiet"])
    assert code == 0, capsys.readouterr().err
    meta = read_store(tmp_path / "store")["meta"]
    assert meta["modality"] == "multimodal" and meta["corpus"]["images"] == 12
    assert meta["multimodal"]["token_types"] == "image" and meta["corpus"]["tokens"] == 12 * 4
