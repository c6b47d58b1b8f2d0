"""Tiny random multimodal LLMs (LLaVA, -Next, -OneVision, Qwen2-VL, Idefics3, PaliGemma, Gemma-3).

Built offline from configs; no download.
"""

from __future__ import annotations

import torch
import transformers as T

VOCAB = 64
IMAGE_TOKEN = 60  # outside the test tokenizer's words (ids 0..57), inside the embedding
SMALL = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64)
TEXT = dict(
    SMALL,
    num_key_value_heads=2,
    num_hidden_layers=4,
    vocab_size=VOCAB,
    head_dim=8,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
)
VISION = dict(SMALL, num_hidden_layers=3, image_size=32, patch_size=8)


def _vlm(family: str, text, vision, **extra):
    """``T.<family>ForConditionalGeneration`` of a ``T.<family>Config`` built from parts."""
    config = getattr(T, f"{family}Config")(text_config=text, vision_config=vision, **extra)
    return getattr(T, f"{family}ForConditionalGeneration")(config)


def llava():
    text, vision = T.Qwen2Config(**TEXT), T.CLIPVisionConfig(**VISION)
    return _vlm("Llava", text, vision, image_token_index=IMAGE_TOKEN, vision_feature_layer=-2)


# Tiles of 32 pixels; the tests' 8 x 8 images land on the 32 x 64 canvas (two grid tiles),
# whose left and right quarters are padding the model drops.
PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def llava_next():
    text, vision = T.Qwen2Config(**TEXT), T.CLIPVisionConfig(**VISION)
    return _vlm(
        "LlavaNext",
        text,
        vision,
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-2,
        image_grid_pinpoints=PINPOINTS,
    )


def llava_onevision():  # a SigLIP tower (no class token): every feature is kept ("full")
    text, vision = T.Qwen2Config(**TEXT), T.SiglipVisionConfig(**VISION)
    return _vlm(
        "LlavaOnevision",
        text,
        vision,
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-2,
        image_grid_pinpoints=PINPOINTS,
    )


def paligemma():
    text, vision = T.GemmaConfig(**TEXT), T.SiglipVisionConfig(**VISION)
    return _vlm("PaliGemma", text, vision, image_token_index=IMAGE_TOKEN, projection_dim=32)


def gemma3():
    text = T.Gemma3TextConfig(**TEXT, sliding_window=8)
    brackets = dict(boi_token_index=61, eoi_token_index=62)
    model = _vlm(
        "Gemma3",
        text,
        T.SiglipVisionConfig(**VISION),
        image_token_index=IMAGE_TOKEN,
        mm_tokens_per_image=4,
        **brackets,
    )
    # transformers initialises the projection at zero: every image row would be 0.
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.2)
    return model


def idefics3():
    text, vision = T.LlamaConfig(**TEXT), T.Idefics3VisionConfig(**VISION)
    return _vlm("Idefics3", text, vision, image_token_id=IMAGE_TOKEN, scale_factor=2)


def smolvlm():  # the recipe's family: Idefics3's layout under its own classes
    text, vision = T.LlamaConfig(**TEXT), T.SmolVLMVisionConfig(**VISION)
    return _vlm("SmolVLM", text, vision, image_token_id=IMAGE_TOKEN, scale_factor=2)


# Qwen2-VL's text config places image tokens with a 3-D rotary embedding (M-RoPE).
QWEN_TEXT = dict(TEXT, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
QWEN_TOKENS = dict(image_token_id=IMAGE_TOKEN, vision_start_token_id=61, vision_end_token_id=62)


def qwen2_vl():
    # embed_dim (the blocks) differs from hidden_size (the merger output, the LM width).
    vision = dict(depth=3, embed_dim=16, hidden_size=32, num_heads=2, patch_size=4)
    return _vlm("Qwen2VL", QWEN_TEXT, vision, **QWEN_TOKENS)


def qwen2_5_vl():
    vision = dict(
        depth=3,
        hidden_size=32,
        out_hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        patch_size=4,
        window_size=8,
        fullatt_block_indexes=[2],
    )
    return _vlm("Qwen2_5_VL", QWEN_TEXT, vision, **QWEN_TOKENS)


def build(name: str):
    torch.manual_seed(0)
    return globals()[name]().eval()


LM = ("self_attn", "self_attn.o_proj", "mlp", "mlp")
CLIP_LIKE = ("self_attn", "self_attn.out_proj", "mlp", "mlp")
# Per family, written out independently of the library's tables: (vision blocks, their
# parts, projector module, LM blocks, image side).
FAMILIES = {
    "llava": (
        "model.vision_tower.encoder.layers",
        CLIP_LIKE,
        "model.multi_modal_projector",
        "model.language_model.layers",
        None,
    ),
    "llava_next": (
        "model.vision_tower.encoder.layers",
        CLIP_LIKE,
        "model.multi_modal_projector",
        "model.language_model.layers",
        None,
    ),
    "llava_onevision": (
        "model.vision_tower.encoder.layers",
        CLIP_LIKE,
        "model.multi_modal_projector",
        "model.language_model.layers",
        None,
    ),
    "paligemma": (
        "model.vision_tower.encoder.layers",
        CLIP_LIKE,
        "model.multi_modal_projector",
        "model.language_model.layers",
        None,
    ),
    "gemma3": (
        "model.vision_tower.encoder.layers",
        CLIP_LIKE,
        "model.multi_modal_projector",
        "model.language_model.layers",
        None,
    ),
    "idefics3": (
        "model.vision_model.encoder.layers",
        CLIP_LIKE,
        "model.connector",
        "model.text_model.layers",
        None,
    ),
    "smolvlm": (
        "model.vision_model.encoder.layers",
        CLIP_LIKE,
        "model.connector",
        "model.text_model.layers",
        None,
    ),
    "qwen2_vl": (
        "model.visual.blocks",
        ("attn", "attn.proj", "mlp", "mlp"),
        "model.visual.merger",
        "model.language_model.layers",
        16,
    ),
    "qwen2_5_vl": (
        "model.visual.blocks",
        ("attn", "attn.proj", "mlp", "mlp"),
        "model.visual.merger",
        "model.language_model.layers",
        16,
    ),
}
CAPTIONS = [[1, 7, 8, 9], [1, 10, 11]]
IMAGE_HW = (8, 8)  # different lengths: the second row is padded


def inputs(name: str, model) -> dict[str, torch.Tensor]:
    """Two (image, caption) pairs built the way the data module builds them."""
    from lightning_interp.backbones.multimodal import vlm_inputs

    images = torch.rand(2, 1, *IMAGE_HW, generator=torch.Generator().manual_seed(0))
    size = FAMILIES[name][-1]
    return vlm_inputs(
        model.config,
        images,
        CAPTIONS,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        pad_token_id=3,
        size=size,
    )
