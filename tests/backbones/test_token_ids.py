"""Token ids the model's embedding cannot look up are refused with a typed, one-line error."""

import pytest
import torch

from lightning_interp.backbones import Backbone
from lightning_interp.errors import LightningInterpError, TokenIdError
from tests.backbones.tiny_models import VOCAB, build

# (builder, a site the forward reaches): every family that takes token ids.
TOKEN_FAMILIES = {
    "gpt2": ("gpt2", "layers.1.resid_post"),
    "gpt_neox": ("gpt_neox", "layers.1.resid_post"),
    "llama": ("llama", "layers.1.resid_post"),
    "gemma2": ("gemma2", "layers.1.resid_post"),
    "bert": ("bert", "layers.1.resid_post"),
    "clip_text": ("clip", "text.layers.1.resid_post"),
}


@pytest.mark.parametrize("family", sorted(TOKEN_FAMILIES))
@pytest.mark.parametrize("bad_id", [VOCAB, VOCAB + 1000, -1])
def test_out_of_vocabulary_ids_raise_a_typed_error(family, bad_id):
    builder, site = TOKEN_FAMILIES[family]
    backbone = Backbone(build(builder))
    assert backbone.vocab_size == VOCAB
    ids = torch.tensor([[1, 2, bad_id, 3]])
    with pytest.raises(TokenIdError) as caught:
        backbone.capture({"input_ids": ids}, site)
    message = str(caught.value)
    assert f"vocab size {VOCAB}" in message and "\n" not in message
    if bad_id >= 0:
        assert f"max id {bad_id}" in message
    else:
        assert "min id -1" in message
    # Catchable as what torch raises today (IndexError) and as bad input (ValueError).
    assert isinstance(caught.value, IndexError) and isinstance(caught.value, ValueError)
    assert isinstance(caught.value, LightningInterpError)
    if builder != "clip":  # the plain forward checks too (CLIP's needs pixels as well)
        with pytest.raises(TokenIdError):
            backbone(ids)


def test_the_last_id_of_the_vocabulary_is_accepted():
    backbone = Backbone(build("gpt2"))
    acts = backbone.capture(torch.tensor([[0, VOCAB - 1]]), "layers.0.resid_post")
    assert acts["layers.0.resid_post"].shape == (1, 2, 32)


def test_the_bound_follows_a_resized_embedding():
    model = build("gpt2")
    backbone = Backbone(model)
    model.resize_token_embeddings(VOCAB + 8)
    assert backbone.vocab_size == VOCAB + 8
    backbone.capture(torch.tensor([[VOCAB + 7]]), "layers.0.resid_post")


def test_models_without_token_ids_are_not_checked():
    backbone = Backbone(build("clip_vision"))
    assert backbone.vocab_size is None
    pixels = torch.randn(1, 3, 32, 32)
    assert backbone.capture({"pixel_values": pixels}, "vision.layers.0.resid_post")


def test_ids_are_checked_on_every_call_even_once_encoded():
    backbone = Backbone(build("gpt2"))
    encoded = backbone.encode(torch.tensor([[1, 2, 3]]))
    backbone(encoded)  # valid ids pass
    encoded["input_ids"][0, 1] = VOCAB  # changed in place after the check
    with pytest.raises(TokenIdError, match=f"max id {VOCAB}"):
        backbone(encoded)
    with pytest.raises(TokenIdError):
        backbone({"input_ids": encoded["input_ids"].clone()})  # a new tensor is checked
