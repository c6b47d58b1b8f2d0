"""The replacement model reproduces the original forward and exposes features and errors."""

from __future__ import annotations

import pytest
import torch

from lightning_interp.circuits import PerLayerTranscoders
from lightning_interp.errors import ConfigError
from tests.circuits import _tiny

IDS = torch.tensor([3, 7, 1, 9, 4, 2])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_forward_reproduces_original_logits(family):
    model = getattr(_tiny, family)()
    rm = _tiny.replacement(model, _tiny.random_transcoders())
    with torch.no_grad():
        original = model(input_ids=IDS[None]).logits
    run = rm.run(IDS)
    torch.testing.assert_close(run.logits, original[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rm.forward(IDS), original, atol=1e-5, rtol=1e-5)
    # Imperfect transcoders: the error term is what makes the forward exact.
    assert min(e.abs().max() for e in run.errors) > 1e-3
    for layer in range(2):
        torch.testing.assert_close(
            run.reconstructions[layer] + run.errors[layer], run.mlp_out[layer]
        )
        expected = rm.transcoders.encode(layer, run.mlp_in[layer])
        torch.testing.assert_close(run.activations[layer], expected)


def test_exact_transcoders_have_zero_error():
    model = _tiny.gpt2()
    run = _tiny.replacement(model, _tiny.exact_transcoders(model)).run(IDS)
    for error, out in zip(run.errors, run.mlp_out, strict=True):
        assert error.abs().max() <= 1e-5 * out.abs().max()


def test_held_errors_with_replayed_freeze_reproduce_the_run():
    model = _tiny.llama()
    rm = _tiny.replacement(model, _tiny.random_transcoders())
    run = rm.run(IDS)
    logits = rm.forward(
        IDS, error_fn=lambda layer, _o, _r: run.errors[layer][None], freeze=_tiny.replay(run)
    )
    torch.testing.assert_close(logits[0], run.logits, atol=1e-4, rtol=1e-4)


def test_layer_count_mismatch_is_refused():
    model = _tiny.gpt2(n_layer=3)
    with pytest.raises(ConfigError, match="blocks"):
        _tiny.replacement(model, _tiny.random_transcoders(n_layers=2))


def test_meta_names_backbone_and_transcoders():
    model = _tiny.gpt2()
    meta = _tiny.replacement(model, _tiny.random_transcoders()).meta()
    assert meta["transcoder_class"] == PerLayerTranscoders.__name__
    assert meta["input_sites"] == ["layers.0.mlp_in", "layers.1.mlp_in"]
    assert meta["family"] == "gpt2"
