"""Sites, capture, early exit and splicing on tiny random models of every family."""

import pytest
import torch

from lightning_interp.backbones import SITE_KINDS, Backbone, UnknownSiteError
from lightning_interp.errors import ConfigError, ShapeMismatchError
from tests.backbones.tiny_models import FAMILIES, build, pixel_inputs, token_inputs


def by_hand(model, inputs, path, direction, runner=None):
    """The activation at a module's input/output, read with a hand-placed hook."""
    seen = {}
    module = model.get_submodule(path)

    def pre(_m, args, kwargs):
        seen["value"] = args[0] if args else kwargs["hidden_states"]

    def post(_m, _args, output):
        seen["value"] = output if isinstance(output, torch.Tensor) else output[0]

    handle = (
        module.register_forward_pre_hook(pre, with_kwargs=True)
        if direction == "input"
        else module.register_forward_hook(post)
    )
    with torch.no_grad():
        (runner or model)(**inputs)
    handle.remove()
    return seen["value"]


def hidden_states(model, inputs, prefix):
    with torch.no_grad():
        if prefix == "vision.":
            return model.vision_model(**inputs, output_hidden_states=True).hidden_states
        if prefix == "text.":
            return model.text_model(**inputs, output_hidden_states=True).hidden_states
        return model(**inputs, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_site_of_a_layer_matches_the_model(family):
    builder, prefix, make_inputs, parts = FAMILIES[family]
    model = build(builder)
    backbone = Backbone(model)
    inputs = make_inputs()
    names = [f"{prefix}layers.1.{kind}" for kind in SITE_KINDS]
    acts = backbone.capture(inputs, names)
    assert list(acts) == names
    runner = getattr(model, prefix[:-1] + "_model") if prefix else model
    states = hidden_states(model, inputs, prefix)
    torch.testing.assert_close(acts[f"{prefix}layers.1.resid_pre"], states[1], rtol=0, atol=0)
    torch.testing.assert_close(acts[f"{prefix}layers.1.resid_post"], states[2], rtol=0, atol=0)
    for kind in ("attn_out", "attn_z", "mlp_in", "mlp_out"):
        path, direction = parts[kind]
        expected = by_hand(model, inputs, path, direction, runner)
        torch.testing.assert_close(acts[f"{prefix}layers.1.{kind}"], expected, rtol=0, atol=0)
        assert backbone.site_width(f"{prefix}layers.1.{kind}") == expected.shape[-1]
    assert all(not t.requires_grad for t in acts.values())


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "qwen2", "clip_text"])
def test_residual_stream_adds_up(family):
    """Pre-norm blocks: resid_post = resid_pre + attn_out + mlp_out (an independent check)."""
    builder, prefix, make_inputs, _ = FAMILIES[family]
    acts = Backbone(build(builder)).capture(
        make_inputs(),
        [f"{prefix}layers.2.{k}" for k in ("resid_pre", "attn_out", "mlp_out", "resid_post")],
    )
    pre, attn, mlp, post = acts.values()
    torch.testing.assert_close(pre + attn + mlp, post, rtol=1e-5, atol=1e-5)


def count_block_calls(model, blocks_path):
    calls = []
    handles = [
        block.register_forward_hook(lambda *_, i=i: calls.append(i))
        for i, block in enumerate(model.get_submodule(blocks_path))
    ]
    return calls, handles


@pytest.mark.parametrize(
    "family, blocks_path",
    [("gpt2", "transformer.h"), ("llama", "model.layers"), ("bert", "encoder.layer")],
)
def test_capture_stops_after_the_deepest_site(family, blocks_path):
    builder, prefix, make_inputs, _ = FAMILIES[family]
    model = build(builder)
    backbone = Backbone(model)
    calls, handles = count_block_calls(model, blocks_path)
    backbone.capture(make_inputs(), ["layers.0.mlp_out", "layers.1.attn_out"])
    assert calls == [0]  # block 1 started (attention ran) but never finished; 2 and 3 never ran
    calls.clear()
    backbone.capture(make_inputs(), ["layers.1.resid_post"], stop_early=False)
    assert calls == [0, 1, 2, 3]
    for handle in handles:
        handle.remove()


def test_clip_vision_capture_runs_only_the_vision_tower():
    model = build("clip")
    backbone = Backbone(model)
    text_calls, handles = count_block_calls(model, "text_model.encoder.layers")
    acts = backbone.capture(pixel_inputs(), "vision.layers.0.resid_post")
    assert acts["vision.layers.0.resid_post"].shape == (2, 17, 32)  # 16 patches + CLS
    assert text_calls == []
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize("builder, prefix", [("clip_vision", "vision."), ("clip_text", "text.")])
def test_standalone_clip_towers(builder, prefix):
    model = build(builder)
    backbone = Backbone(model)
    inputs = pixel_inputs() if prefix == "vision." else token_inputs()
    plain = backbone.capture(inputs, "layers.1.resid_post")["layers.1.resid_post"]
    aliased = backbone.capture(inputs, f"{prefix}layers.1.resid_post")
    torch.testing.assert_close(aliased[f"{prefix}layers.1.resid_post"], plain)
    with torch.no_grad():
        expected = model(**inputs, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(plain, expected)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "gemma2"])
def test_splice_identity_keeps_logits_and_zeros_change_them(family):
    builder, _, make_inputs, _ = FAMILIES[family]
    backbone = Backbone(build(builder))
    inputs = make_inputs()
    clean = backbone(inputs).logits
    for site in ("layers.1.resid_post", "layers.1.attn_z", "layers.2.resid_pre"):
        with backbone.splice(site, lambda a: a):
            torch.testing.assert_close(backbone(inputs).logits, clean, rtol=0, atol=0)
        with backbone.splice(site, torch.zeros_like):
            assert (backbone(inputs).logits - clean).abs().max() > 1e-3
    torch.testing.assert_close(backbone(inputs).logits, clean, rtol=0, atol=0)  # hooks removed


def test_splice_feeds_downstream_capture_and_casts_dtype():
    backbone = Backbone(build("gpt2"))
    inputs = token_inputs()
    with backbone.splice("layers.0.resid_post", lambda a: (a * 0).double()):
        acts = backbone.capture(inputs, ["layers.0.resid_post", "layers.1.resid_pre"])
    assert acts["layers.1.resid_pre"].abs().max() == 0
    assert acts["layers.1.resid_pre"].dtype == torch.float32
    with pytest.raises(ShapeMismatchError, match="activation's shape"):
        with backbone.splice("layers.0.resid_post", lambda a: a[..., :4]):
            backbone(inputs)


def test_globs_raw_paths_and_unknown_sites():
    model = build("gpt2")
    backbone = Backbone(model)
    assert backbone.resolve_sites("layers.*.resid_post") == [
        f"layers.{i}.resid_post" for i in range(4)
    ]
    assert backbone.resolve_sites("embeddings") == ["embeddings"]
    acts = backbone.capture(
        token_inputs(), ["transformer.h.1.mlp.c_fc:output", "transformer.h.1.ln_2"]
    )
    assert acts["transformer.h.1.mlp.c_fc:output"].shape[-1] == 128
    expected = by_hand(model, token_inputs(), "transformer.h.1.mlp", "input")
    torch.testing.assert_close(acts["transformer.h.1.ln_2"], expected)
    with pytest.raises(UnknownSiteError, match="Closest: .*layers.1.resid_post"):
        backbone.capture(token_inputs(), "layers.1.resid_pots")
    with pytest.raises(UnknownSiteError, match="Valid sites are"):
        backbone.capture(token_inputs(), "layers.9.resid_post")


def test_natural_order_past_ten_layers():
    import transformers as T

    model = T.GPT2LMHeadModel(T.GPT2Config(n_layer=12, n_embd=8, n_head=2, vocab_size=16))
    names = Backbone(model).resolve_sites("layers.*.mlp_out")
    assert names[9:] == ["layers.9.mlp_out", "layers.10.mlp_out", "layers.11.mlp_out"]


def test_capture_dtype_device_and_autocast():
    backbone = Backbone(build("llama"))
    inputs = token_inputs()
    fp32 = backbone.capture(inputs, "layers.1.resid_post")["layers.1.resid_post"]
    cast = backbone.capture(inputs, "layers.1.resid_post", dtype="bfloat16")["layers.1.resid_post"]
    assert cast.dtype == torch.bfloat16
    bf16 = backbone.capture(inputs, "layers.1.mlp_out", autocast_dtype=torch.bfloat16)
    assert bf16["layers.1.mlp_out"].dtype == torch.bfloat16
    assert (
        bf16["layers.1.mlp_out"].float()
        - backbone.capture(inputs, "layers.1.mlp_out")["layers.1.mlp_out"]
    ).abs().mean() < 0.05
    assert fp32.dtype == torch.float32


def test_backbone_is_frozen_and_raw_text_needs_a_tokenizer():
    model = build("gpt2").train()
    backbone = Backbone(model)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        backbone.capture("some text", "layers.0.resid_post")


def test_unrecognised_model_gets_a_clear_error():
    with pytest.raises(ConfigError, match="found no transformer blocks"):
        Backbone(torch.nn.Sequential(torch.nn.Linear(2, 2)))
