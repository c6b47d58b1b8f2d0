"""Steering, clamping and ablation at a site, for scoring and for generation, on tiny models."""

import pytest
import torch

from lightning_interp import create_dictionary
from lightning_interp.backbones import Backbone, steer
from lightning_interp.errors import ConfigError, ShapeMismatchError
from tests.backbones.tiny_models import build, token_inputs

SITE = "layers.1.resid_post"
BLOCK = {"gpt2": "transformer.h.1", "llama": "model.layers.1"}
TOL = dict(rtol=1e-5, atol=1e-5)


def make_dictionary(dtype="float32", d_latent=48):
    torch.manual_seed(1)
    sae = create_dictionary("standard", d_in=32, d_latent=d_latent, dtype=dtype)
    with torch.no_grad():
        # Random encoder biases: some latents fire at some positions and not at others.
        sae.b_enc.copy_(torch.randn(d_latent, dtype=sae.dtype) * 0.5)
    return sae.eval().requires_grad_(False)


def site_activation(backbone, inputs):
    return backbone.capture(inputs, SITE)[SITE]


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(params=["gpt2", "llama"])
def family(request):
    return request.param


@pytest.fixture
def backbone(family):
    return Backbone(build(family))


def test_add_moves_the_site_by_scale_times_the_decoder_rows(backbone):
    sae, inputs = make_dictionary(), token_inputs()
    clean = site_activation(backbone, inputs)
    with steer(backbone, SITE, sae, add={3: 2.5, 7: -1.0}):
        steered = site_activation(backbone, inputs)
    expected = 2.5 * sae.W_dec[3] - 1.0 * sae.W_dec[7]  # at every position
    torch.testing.assert_close(steered - clean, expected.expand_as(clean), **TOL)
    with steer(backbone, SITE, sae, add={3: 2.5}, normalize=True):
        unit = site_activation(backbone, inputs)
    direction = sae.W_dec[3] / sae.W_dec[3].norm()
    torch.testing.assert_close(unit - clean, (2.5 * direction).expand_as(clean), **TOL)


def test_zero_scale_and_empty_edits_leave_the_model_as_it_was(backbone):
    sae, inputs = make_dictionary(), token_inputs()
    clean = backbone(inputs).logits
    for edit in ({"add": {3: 0.0}}, {"add": {}}, {}, {"ablate": []}):
        with steer(backbone, SITE, sae, **edit):
            torch.testing.assert_close(backbone(inputs).logits, clean, rtol=0, atol=1e-6)
    with steer(backbone, SITE, sae):
        assert hook_count(backbone.model) == 0  # an empty edit installs nothing


def test_clamp_adds_decode_of_clamped_minus_decode_of_original(backbone):
    sae, inputs = make_dictionary(), token_inputs()
    clean = site_activation(backbone, inputs)
    codes = sae.encode(clean)
    clamped = codes.clone()
    clamped[..., 5] = 3.0
    clamped[..., 11] = 0.25
    with steer(backbone, SITE, sae, clamp={5: 3.0, 11: 0.25}):
        steered = site_activation(backbone, inputs)
    # The error term x - decode(encode(x)) is kept: only the clamped latents' share changes.
    expected = clean + sae.decode(clamped) - sae.decode(codes)
    torch.testing.assert_close(steered, expected, **TOL)


def test_ablation_removes_the_latent_where_it_fires_and_nothing_elsewhere(backbone):
    sae, inputs = make_dictionary(), token_inputs()
    clean = site_activation(backbone, inputs)
    codes = sae.encode(clean)
    latent = int((codes > 0).float().mean((0, 1)).sub(0.5).abs().argmin())
    active = codes[..., latent] > 0
    assert active.any() and (~active).any()  # the check below covers both cases
    with steer(backbone, SITE, sae, ablate=[latent]):
        steered = site_activation(backbone, inputs)
    change = steered - clean
    torch.testing.assert_close(change, -codes[..., latent, None] * sae.W_dec[latent], **TOL)
    assert torch.equal(change[~active], torch.zeros_like(change[~active]))


def generate(model, inputs, use_cache=True):
    out = model.generate(
        **inputs,
        max_new_tokens=6,
        min_new_tokens=6,
        do_sample=False,
        use_cache=use_cache,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_logits=True,
    )
    return out.sequences, torch.stack(out.logits)


def test_generation_is_steered_like_a_hand_written_hook(backbone, family):
    sae, inputs = make_dictionary(), token_inputs(batch=2, seq=4)
    vector = 6.0 * sae.W_dec[3]
    clean_ids, clean_logits = generate(backbone.model, inputs)
    with steer(backbone, SITE, sae, add={3: 6.0}):
        ids, logits = generate(backbone.model, inputs)

    def by_hand(_module, _args, output):
        if isinstance(output, torch.Tensor):
            return output + vector
        return (output[0] + vector, *output[1:])

    handle = backbone.model.get_submodule(BLOCK[family]).register_forward_hook(by_hand)
    try:
        hand_ids, hand_logits = generate(backbone.model, inputs)
    finally:
        handle.remove()
    assert not torch.equal(ids, clean_ids)
    assert torch.equal(ids, hand_ids)
    torch.testing.assert_close(logits, hand_logits, **TOL)
    assert not torch.allclose(logits, clean_logits, atol=1e-3)


@pytest.mark.parametrize("edit", [{"add": {3: 6.0}}, {"clamp": {5: 4.0}, "ablate": [9]}])
def test_every_generated_position_is_edited_with_a_kv_cache(backbone, edit):
    """With a cache the hook sees one new token per step; without, the whole sequence."""
    sae, inputs = make_dictionary(), token_inputs(batch=2, seq=4)
    with steer(backbone, SITE, sae, **edit):
        cached_ids, cached = generate(backbone.model, inputs, use_cache=True)
        full_ids, full = generate(backbone.model, inputs, use_cache=False)
    assert torch.equal(cached_ids, full_ids)
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)


def test_hooks_are_removed_after_the_block_and_after_an_error(backbone):
    sae, inputs = make_dictionary(), token_inputs()
    clean = backbone(inputs).logits
    before = hook_count(backbone.model)
    with steer(backbone, SITE, sae, add={3: 5.0}, ablate=[4]):
        assert hook_count(backbone.model) == before + 1
    assert hook_count(backbone.model) == before
    with pytest.raises(RuntimeError, match="inside"):
        with steer(backbone, SITE, sae, clamp={2: 1.0}):
            raise RuntimeError("inside the block")
    assert hook_count(backbone.model) == before
    torch.testing.assert_close(backbone(inputs).logits, clean, rtol=0, atol=1e-6)


def test_a_float64_dictionary_steers_a_float32_model(backbone):
    sae, inputs = make_dictionary(dtype="float64"), token_inputs()
    clean = site_activation(backbone, inputs)
    codes = sae.encode(clean.double())
    with steer(backbone, SITE, sae, add={3: 2.0}, ablate=[6]):
        steered = site_activation(backbone, inputs)
        logits = backbone(inputs).logits
    assert steered.dtype == logits.dtype == torch.float32
    expected = clean.double() + 2.0 * sae.W_dec[3] - codes[..., 6, None] * sae.W_dec[6]
    torch.testing.assert_close(steered, expected.float(), **TOL)


def test_bad_edits_are_refused_with_the_fix(backbone):
    sae = make_dictionary()
    cases = [
        ({"add": {48: 1.0}}, ConfigError, "out of range"),
        ({"clamp": {2: 1.0}, "ablate": [2]}, ConfigError, "both clamped and ablated"),
        ({"add": {2: float("nan")}}, ConfigError, "non-finite"),
    ]
    for edit, error, message in cases:
        with pytest.raises(error, match=message), steer(backbone, SITE, sae, **edit):
            pass
    with pytest.raises(ConfigError, match="one site"), steer(backbone, "layers.*.resid_post", sae):
        pass
    wide = create_dictionary("topk", d_in=64, d_latent=8, k=2)
    with pytest.raises(ShapeMismatchError, match="64 wide but 'layers.1.resid_post' is 32"):
        with steer(backbone, SITE, wide, add={1: 1.0}):
            pass
    directions = torch.nn.Module()
    directions.W_dec = torch.nn.Parameter(torch.randn(4, 32))  # no encode: add only
    with (
        pytest.raises(ConfigError, match="no encode"),
        steer(backbone, SITE, directions, ablate=[1]),
    ):
        pass
    transcoder = create_dictionary(
        "standard", d_in=64, d_latent=8, d_out=32, apply_b_dec_to_input=False
    )
    with pytest.raises(ConfigError, match="transcoder"):
        with steer(backbone, SITE, transcoder, clamp={1: 1.0}):
            pass
    assert hook_count(backbone.model) == 0
