"""Multimodal LLMs on tiny random configs: sites, early exit, token-type masks, data module."""

import pytest
import torch

from lightning_interp.backbones import SITE_KINDS, Backbone
from lightning_interp.backbones.multimodal import image_token_count, token_type_mask
from lightning_interp.errors import ConfigError
from tests.backbones.test_backbone import by_hand, count_block_calls
from tests.backbones.tiny_vlms import CAPTIONS, FAMILIES, IMAGE_HW, IMAGE_TOKEN, build, inputs

NAMES = sorted(FAMILIES)


@pytest.fixture(scope="module", params=NAMES)
def family(request):
    name = request.param
    model = build(name)
    return name, model, Backbone(model), inputs(name, model)


def test_every_site_matches_a_hand_hook_or_hidden_states(family):
    name, model, backbone, batch = family
    vision_blocks, (attn, out_proj, mlp_in, mlp_out), projector, lm_blocks, _ = FAMILIES[name]
    lm = [f"layers.1.{kind}" for kind in SITE_KINDS]
    vision = [f"vision.layers.1.{kind}" for kind in SITE_KINDS]
    acts = backbone.capture(batch, [*vision, "projector", *lm])
    with torch.no_grad():
        states = model(**batch, output_hidden_states=True).hidden_states
    torch.testing.assert_close(acts["layers.1.resid_pre"], states[1], rtol=0, atol=0)
    torch.testing.assert_close(acts["layers.1.resid_post"], states[2], rtol=0, atol=0)
    expected = {
        "layers.1.attn_out": (f"{lm_blocks}.1.self_attn", "output"),
        "layers.1.attn_z": (f"{lm_blocks}.1.self_attn.o_proj", "input"),
        "layers.1.mlp_in": (f"{lm_blocks}.1.mlp", "input"),
        "layers.1.mlp_out": (f"{lm_blocks}.1.mlp", "output"),
        "vision.layers.1.resid_pre": (f"{vision_blocks}.1", "input"),
        "vision.layers.1.resid_post": (f"{vision_blocks}.1", "output"),
        "vision.layers.1.attn_out": (f"{vision_blocks}.1.{attn}", "output"),
        "vision.layers.1.attn_z": (f"{vision_blocks}.1.{out_proj}", "input"),
        "vision.layers.1.mlp_in": (f"{vision_blocks}.1.{mlp_in}", "input"),
        "vision.layers.1.mlp_out": (f"{vision_blocks}.1.{mlp_out}", "output"),
        "projector": (projector, "output"),
    }
    for site, (path, direction) in expected.items():
        hand = by_hand(model, batch, path, direction)
        torch.testing.assert_close(acts[site], hand, rtol=0, atol=0, msg=site)
        assert backbone.site_width(site) == hand.shape[-1], site
    # Pre-norm vision blocks: the residual stream adds up (an independent check).
    pre, post = acts["vision.layers.1.resid_pre"], acts["vision.layers.1.resid_post"]
    summed = pre + acts["vision.layers.1.attn_out"] + acts["vision.layers.1.mlp_out"]
    torch.testing.assert_close(summed, post, rtol=1e-5, atol=1e-5)


def test_qwen_vision_width_is_the_blocks_not_the_merger():
    backbone = Backbone(build("qwen2_vl"))
    assert backbone.site_width("vision.layers.0.resid_post") == 16  # embed_dim
    assert backbone.site_width("projector") == backbone.site_width("layers.0.resid_post") == 32


def test_early_exit_by_call_counts(family):
    name, model, backbone, batch = family
    vision_blocks, _, projector, lm_blocks, _ = FAMILIES[name]
    lm_calls, lm_handles = count_block_calls(model, lm_blocks)
    vision_calls, vision_handles = count_block_calls(model, vision_blocks)
    head_calls = []
    handles = [
        *lm_handles,
        *vision_handles,
        model.lm_head.register_forward_hook(lambda *_: head_calls.append(1)),
        model.get_submodule(projector).register_forward_hook(lambda *_: head_calls.append(0)),
    ]
    try:
        backbone.capture(batch, "layers.1.resid_post")
        assert lm_calls == [0, 1] and 1 not in head_calls  # LM blocks 2, 3 and the head: never
        lm_calls.clear(), vision_calls.clear(), head_calls.clear()
        backbone.capture(batch, "vision.layers.0.mlp_out")
        # The vision tower runs first; block 0 started, none finished, nothing after it ran.
        assert (lm_calls, vision_calls, head_calls) == ([], [], [])
        backbone.capture(batch, "projector")
        assert lm_calls == [] and head_calls == [0]  # the LM never runs
        head_calls.clear()
        backbone.capture(batch, "layers.0.resid_post", stop_early=False)
        assert lm_calls == [0, 1, 2, 3] and 1 in head_calls
    finally:
        for handle in handles:
            handle.remove()


def test_token_type_masks(family):
    name, model, backbone, batch = family
    ids, attention = batch["input_ids"], batch["attention_mask"]
    image = token_type_mask(ids, model.config, "image", attention)
    text = token_type_mask(ids, model.config, "text", attention)
    every = token_type_mask(ids, model.config, "all", attention)
    torch.testing.assert_close(image, ids == IMAGE_TOKEN)
    n_image = image_token_count(model.config, FAMILIES[name][-1], image_hw=IMAGE_HW)
    assert image.sum(1).tolist() == [n_image, n_image]
    assert not (image & text).any() and torch.equal(image | text, every)
    # Text counts: the captions (and the tokens bracketing the image), padding excluded.
    brackets = int(name in ("gemma3", "qwen2_vl", "qwen2_5_vl")) * 2
    assert text.sum(1).tolist() == [len(c) + brackets for c in CAPTIONS]
    assert every.sum() < ids.numel()  # the shorter caption's row is padded
    # Each image token's row is one projector output row (any-resolution LLaVAs: one per tile
    # patch; padding-only patches are dropped and a newline token ends each row).
    acts = backbone.capture(batch, "projector")["projector"]
    if not name.startswith("llava_"):
        assert acts.reshape(-1, acts.shape[-1]).shape[0] == image.sum()
    else:
        assert acts.shape[:2] == (2 * 3, 16)  # [images * (base + 2 tiles), 4 x 4 patches]


@pytest.mark.parametrize("name", ["llava", "idefics3", "qwen2_vl"])
def test_image_positions_of_the_lm_hold_the_projector_rows(name):
    model = build(name)
    batch = inputs(name, model)
    acts = Backbone(model).capture(batch, ["projector", "embeddings"])
    mask = token_type_mask(batch["input_ids"], model.config, "image")
    projected = acts["projector"].reshape(-1, acts["projector"].shape[-1])
    torch.testing.assert_close(acts["embeddings"][mask], projected, rtol=0, atol=0)


def test_unknown_token_types_and_families_are_refused():
    model = build("llava")
    with pytest.raises(ConfigError, match="token_types must be"):
        token_type_mask(torch.tensor([[1, 2]]), model.config, "patches")
    from lightning_interp.backbones.multimodal import vlm_inputs
    from tests.backbones.tiny_models import build as build_lm

    with pytest.raises(ConfigError, match="no torch-only input builder"):
        vlm_inputs(build_lm("llama").config, torch.rand(1, 3, 8, 8), [[1]], mean=(0,), std=(1,))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each tiny family saved with the tests' word-level tokenizer, as a user's folder."""
    from tests.data.test_tokens import make_tokenizer

    root = tmp_path_factory.mktemp("tiny-vlms")
    for name in NAMES:
        build(name).save_pretrained(root / name)
        make_tokenizer().save_pretrained(root / name)
    return root


def datamodule(saved, name, site, token_types="image"):
    from lightning_interp.data import ImageTextDataModule

    data = ImageTextDataModule(
        str(saved / name),
        site,
        caption="w1 w2 w3",
        token_types=token_types,
        batch_size=16,
        buffer_tokens=64,
        images_per_capture=3,
        image_size=FAMILIES[name][-1],
    )
    data.setup()
    return data


@pytest.mark.parametrize("name", ["idefics3", "qwen2_vl"])
def test_data_module_rows_are_the_chosen_token_types(saved, name):
    data = datamodule(saved, name, "layers.1.resid_post")
    stream, config = data.train_set, data.backbone.model.config
    n_image = image_token_count(config, FAMILIES[name][-1])
    caption = len(data.backbone.tokenizer("w1 w2 w3")["input_ids"])
    brackets = 2 if name == "qwen2_vl" else 0
    group = torch.arange(3)
    for token_types, per_image in (("image", n_image), ("text", caption + brackets)):
        stream.token_types = token_types
        rows = stream._capture(group)
        assert rows.shape == (3 * per_image, 32)
    stream.token_types = "image"
    vision = datamodule(saved, name, "vision.layers.0.resid_post", token_types="text")
    with pytest.raises(ConfigError, match="not a language-model site"):
        vision.train_set._capture(group)
    assert data.provenance["extra"]["token_types"] == "image"
    assert data.site_widths == {"layers.1.resid_post": 32}


@pytest.mark.parametrize("name", ["llava_next", "qwen2_vl"])
def test_data_module_rows_know_their_image_and_image_token(saved, name):
    from lightning_interp.backbones.image_patches import image_token_boxes

    data = datamodule(saved, name, "layers.1.resid_post", token_types="all")
    stream, config, size = data.train_set, data.backbone.model.config, FAMILIES[name][-1]
    group = torch.tensor([4, 0, 2])
    rows, positions = stream.capture_with_positions(group)
    torch.testing.assert_close(rows, stream._capture(group))
    image_hw = tuple(stream.images.shape[-2:])
    n_image = image_token_count(config, size, image_hw=image_hw)
    per_image = n_image + len(stream.caption_ids) + (2 if name == "qwen2_vl" else 0)
    assert positions[:, 0].tolist() == group.repeat_interleave(per_image).tolist()
    is_image = positions[:, 1] >= 0
    assert positions[is_image, 1].tolist() == list(range(n_image)) * 3
    assert len(image_token_boxes(config, size, image_hw)) == n_image  # a box per ordinal
    # Keeping image tokens only keeps exactly the rows with an ordinal, in order.
    stream.token_types = "image"
    image_rows, image_positions = stream.capture_with_positions(group)
    stream.token_types = "all"
    torch.testing.assert_close(image_rows, rows[is_image])
    assert torch.equal(image_positions, positions[is_image])
    projector = datamodule(saved, name, "projector").train_set
    _, projector_positions = projector.capture_with_positions(group)
    if name == "qwen2_vl":  # one projector row per image token, in the same order
        assert torch.equal(projector_positions, positions[is_image])


@pytest.mark.parametrize("name", NAMES)
def test_a_dictionary_trains_on_image_tokens_through_the_cli(saved, name, tmp_path, monkeypatch):
    import json
    import sys

    from lightning_interp import load_dictionary
    from tests.test_recipes import run_recipe, tiny_recipe

    monkeypatch.setattr(sys, "argv", ["lightning-interp"])
    # The shipped recipe, its SmolVLM swapped for this tiny family (test_recipes' rewrite).
    recipe = tiny_recipe("smolvlm_image_tokens.yaml", ({"idefics3": saved / name}, None), tmp_path)
    size = FAMILIES[name][-1]
    # Two steps of 16 rows; one capture fills the 64-row buffer (few forwards: they dominate).
    per_capture = 64 // image_token_count(build(name).config, size, image_hw=(8, 8))  # digits
    recipe["data"]["init_args"].update(
        image_size=size, images_per_capture=per_capture, batch_size=16, buffer_tokens=64
    )
    recipe["trainer"].update(limit_train_batches=2, limit_val_batches=1)
    cli = run_recipe(recipe, tmp_path / "recipe.yaml")
    assert cli.trainer.global_step == 2
    dictionary = load_dictionary(tmp_path / "dictionary")
    provenance = dictionary.config.provenance
    assert dictionary.d_in == 32 and provenance.site == "layers.3.resid_post"
    assert provenance.extra["token_types"] == "image"
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["tokens_trained"] == 2 * 16 and metrics["l0"] > 0


@pytest.mark.parametrize("name", ["idefics3", "llava"])
def test_feature_dashboard_ends_an_image_token_run_with_a_multimodal_store(
    saved, name, tmp_path, monkeypatch
):
    import sys

    from lightning_interp.features.layout import read_store
    from tests.test_recipes import run_recipe, tiny_recipe

    monkeypatch.setattr(sys, "argv", ["lightning-interp"])
    recipe = tiny_recipe("smolvlm_image_tokens.yaml", ({"idefics3": saved / name}, None), tmp_path)
    size = FAMILIES[name][-1]
    per_capture = 64 // image_token_count(build(name).config, size, image_hw=(8, 8))
    recipe["data"]["init_args"].update(
        image_size=size, images_per_capture=per_capture, batch_size=16, buffer_tokens=64
    )
    recipe["trainer"].update(limit_train_batches=2, limit_val_batches=1)
    recipe["trainer"]["callbacks"].append(
        {"class_path": "lightning_interp.callbacks.FeatureDashboard", "init_args": {"images": 6}}
    )
    run_recipe(recipe, tmp_path / "recipe.yaml")
    store = read_store(tmp_path / "features")
    assert store["meta"]["modality"] == "multimodal"
    assert store["meta"]["multimodal"]["family"] == name
    assert (tmp_path / "features" / "images" / "5.png").is_file()  # the first 6 images
    assert not (tmp_path / "features" / "images" / "6.png").exists()
    assert (tmp_path / "dashboard" / "index.html").is_file()


def test_feature_dashboard_refuses_a_vision_site_of_a_multimodal_run_before_training(
    saved, tmp_path, monkeypatch
):
    import sys

    from tests.test_recipes import run_recipe, tiny_recipe

    monkeypatch.setattr(sys, "argv", ["lightning-interp"])
    recipe = tiny_recipe(
        "smolvlm_image_tokens.yaml", ({"idefics3": saved / "idefics3"}, None), tmp_path
    )
    recipe["data"]["init_args"].update(site="vision.layers.0.resid_post", token_types="all")
    recipe["trainer"]["callbacks"].append(
        {"class_path": "lightning_interp.callbacks.FeatureDashboard", "init_args": {"images": 6}}
    )
    with pytest.raises(ConfigError, match="language-model sites only"):
        run_recipe(recipe, tmp_path / "recipe.yaml")
    assert not (tmp_path / "dictionary").exists()
