"""Tiny random transformers models of every supported family, built offline from configs."""

from __future__ import annotations

import torch
import transformers as T

SMALL = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64)
VOCAB = 64


def gpt2():
    return T.GPT2LMHeadModel(
        T.GPT2Config(
            n_layer=4, n_embd=32, n_head=4, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0
        )
    )


def gpt_neox():
    return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(num_hidden_layers=4, vocab_size=VOCAB, **SMALL))


def llama():
    return T.LlamaForCausalLM(
        T.LlamaConfig(num_hidden_layers=4, num_key_value_heads=2, vocab_size=VOCAB, **SMALL)
    )


def qwen2():
    return T.Qwen2ForCausalLM(
        T.Qwen2Config(num_hidden_layers=4, num_key_value_heads=2, vocab_size=VOCAB, **SMALL)
    )


def gemma2():
    return T.Gemma2ForCausalLM(
        T.Gemma2Config(
            num_hidden_layers=4, num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, **SMALL
        )
    )


def bert():
    return T.BertModel(T.BertConfig(num_hidden_layers=4, vocab_size=VOCAB, **SMALL))


def _clip_config():
    text = dict(num_hidden_layers=4, vocab_size=VOCAB, projection_dim=16, **SMALL)
    vision = dict(num_hidden_layers=4, image_size=32, patch_size=8, projection_dim=16, **SMALL)
    return T.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def clip():
    return T.CLIPModel(_clip_config())


def clip_vision():
    return T.CLIPVisionModel(_clip_config().vision_config)


def clip_text():
    return T.CLIPTextModel(_clip_config().text_config)


from tests.backbones.tiny_vlms import idefics3  # noqa: E402,F401  (a recipe's stand-in)


def build(name: str):
    torch.manual_seed(0)
    return globals()[name]().eval()


def token_inputs(batch: int = 2, seq: int = 6) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(1, VOCAB, (batch, seq), generator=generator)}


def pixel_inputs(batch: int = 2) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    }


def parts(block: str, attn: str, out_proj: str, mlp_in: str, mlp_out: str) -> dict:
    """Module paths of layer 1's parts, as a reader would hook them by hand."""
    return {
        "block": block,
        "attn_out": (f"{block}.{attn}", "output"),
        "attn_z": (f"{block}.{out_proj}", "input"),
        "mlp_in": (f"{block}.{mlp_in}", "input"),
        "mlp_out": (f"{block}.{mlp_out}", "output"),
    }


LLAMA_LIKE = parts("model.layers.1", "self_attn", "self_attn.o_proj", "mlp", "mlp")

# Per family: (builder, site prefix, inputs, layer 1's parts), independent of the
# library's own table.
FAMILIES = {
    "gpt2": (
        "gpt2",
        "",
        token_inputs,
        parts("transformer.h.1", "attn", "attn.c_proj", "mlp", "mlp"),
    ),
    "gpt_neox": (
        "gpt_neox",
        "",
        token_inputs,
        parts("gpt_neox.layers.1", "attention", "attention.dense", "mlp", "mlp"),
    ),
    "llama": ("llama", "", token_inputs, LLAMA_LIKE),
    "qwen2": ("qwen2", "", token_inputs, LLAMA_LIKE),
    "gemma2": ("gemma2", "", token_inputs, LLAMA_LIKE),
    "bert": (
        "bert",
        "",
        token_inputs,
        # Post-norm: sub-layer outputs are read before the residual add and LayerNorm.
        parts(
            "encoder.layer.1",
            "attention.output.dense",
            "attention.output.dense",
            "intermediate",
            "output.dense",
        ),
    ),
    "clip_text": (
        "clip",
        "text.",
        token_inputs,
        parts("text_model.encoder.layers.1", "self_attn", "self_attn.out_proj", "mlp", "mlp"),
    ),
    "clip_vision": (
        "clip",
        "vision.",
        pixel_inputs,
        parts("vision_model.encoder.layers.1", "self_attn", "self_attn.out_proj", "mlp", "mlp"),
    ),
}
