"""Cross-layer transcoders: config, memory, the transcoder-set view, losses, PLTs, files."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_interp.circuits import CLTConfig, CrossLayerTranscoder, TranscoderSet, clt_memory
from lightning_interp.errors import ConfigError, CorruptFileError, DictionaryNotFoundError

KINDS = {"jumprelu": {}, "topk": {"k": 3}, "batchtopk": {"k": 3}}


def make_clt(activation="topk", n_layers=3, d_in=8, d_latent=16, **kw) -> CrossLayerTranscoder:
    torch.manual_seed(0)
    config = CLTConfig(
        n_layers=n_layers,
        d_in=d_in,
        d_latent=d_latent,
        activation=activation,
        **{**KINDS[activation], **kw},
    )
    clt = CrossLayerTranscoder(config)
    with torch.no_grad():  # non-zero biases and thresholds, so every term is exercised
        for p in [*clt.b_enc, clt.b_dec]:
            p.uniform_(-0.1, 0.1)
    return clt


def batch(clt: CrossLayerTranscoder, rows=12, seed=1) -> tuple[list, list]:
    g = torch.Generator().manual_seed(seed)
    n, d_in, d_out = clt.n_layers, clt.config.d_in, clt.config.output_width
    return (
        [torch.randn(rows, d_in, generator=g) for _ in range(n)],
        [torch.randn(rows, d_out, generator=g) for _ in range(n)],
    )


# ---------------------------------------------------------------- config and memory
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"d_latent": [4, 4]}, "one per layer"),
        ({"activation": "topk"}, "needs k"),
        ({"k": 2}, "only read by"),
        ({"input_sites": ["a"]}, "one per layer"),
        ({"output_scales": [1.0, 0.0, 1.0]}, "finite number > 0"),
    ],
)
def test_config_refuses_inconsistent_fields(fields, message):
    with pytest.raises(ConfigError, match=message):
        CLTConfig(**{"n_layers": 3, "d_in": 8, "d_latent": 4, **fields})


def test_memory_of_a_12_layer_clt_at_16x():
    memory = clt_memory(12, 768, 16 * 768)
    assert memory["decoder_blocks"] == 78  # 12 * 13 / 2 source -> target pairs
    assert memory["decoder_parameters"] == 78 * 12288 * 768
    assert memory["encoder_parameters"] == 12 * (768 * 12288 + 12288)
    assert memory["training_bytes"] == 4 * 4 * memory["parameters"]  # fp32 weights+grad+Adam
    assert round(memory["training_bytes"] / 1e9, 1) == 13.6
    plt = clt_memory(12, 768, 16 * 768, cross_layer=False)
    assert plt["decoder_blocks"] == 12 and plt["parameters"] < memory["parameters"] / 3


@pytest.mark.parametrize("cross_layer", [True, False])
def test_memory_counts_the_parameters_a_clt_allocates(cross_layer):
    clt = make_clt("jumprelu", n_layers=4, d_in=8, d_latent=16, cross_layer=cross_layer)
    counted = clt_memory(4, 8, 16, cross_layer=cross_layer)["parameters"]
    assert counted == sum(p.numel() for p in clt.parameters())


# ---------------------------------------------------------------- the transcoder-set view
@pytest.mark.parametrize("activation", sorted(KINDS))
def test_reconstruction_is_the_transcoder_set_sum(activation):
    clt = make_clt(activation).eval()
    inputs, _ = batch(clt)
    assert isinstance(clt, TranscoderSet)
    with torch.no_grad():
        if activation == "batchtopk":
            clt.train().forward_train(inputs)  # estimate the inference thresholds
            clt.eval()
        reconstruction = clt(inputs)
        for t in range(clt.n_layers):
            total = clt.output_bias(t).clone()
            for s in range(clt.n_layers):
                decoder = clt.decoder(s, t)
                assert (decoder is None) == (s > t)
                if decoder is not None:
                    total = total + clt.encode(s, inputs[s]) @ decoder
            torch.testing.assert_close(total, reconstruction[:, t], atol=1e-5, rtol=1e-5)


def test_scales_are_folded_into_the_transcoder_set_view():
    clt = make_clt("jumprelu")
    inputs, _ = batch(clt)
    scaled = clt.config.replace(input_scales=[2.0, 0.5, 3.0], output_scales=[4.0, 1.0, 0.25])
    clt.config = scaled
    with torch.no_grad():
        trained_units = clt([x * s for x, s in zip(inputs, scaled.input_scales, strict=True)])
        for t in range(3):
            raw = clt.output_bias(t) + sum(
                clt.encode(s, inputs[s]) @ clt.decoder(s, t) for s in range(t + 1)
            )
            torch.testing.assert_close(raw, trained_units[:, t] / scaled.output_scales[t])
            w_enc, b_enc = clt.encoder(t)
            pre = inputs[t] @ w_enc + b_enc
            torch.testing.assert_close(clt.activation(t, pre), clt.encode(t, inputs[t]))


# ---------------------------------------------------------------- losses and gradients
@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
@pytest.mark.parametrize(
    ("d_latent", "automatic"),
    [
        (16, [False] * 3),  # too narrow for the sparse kernels to pay off: dense
        ([16, 256, 256], [False, True, True]),  # chosen per layer (256 >= 32 * k)
    ],
)
def test_sparse_training_path_matches_dense_autograd(activation, d_latent, automatic):
    results = {}
    for sparse in (True, False, None):  # forced sparse, forced dense, automatic (default)
        clt = make_clt(activation, d_latent=d_latent, aux_k=4)
        clt.sparse_training = sparse
        paths = [clt.uses_sparse_path(layer) for layer in range(3)]
        assert paths == (automatic if sparse is None else [sparse] * 3)
        inputs, targets = batch(clt)
        out = clt.forward_train(inputs)
        assert [out.is_sparse(layer) for layer in range(3)] == paths
        dead = [torch.arange(w) % 3 == 0 for w in clt.config.widths]  # AuxK too
        terms = clt.loss(inputs, targets, out, dead_masks=dead)
        terms["loss"].backward()
        results[sparse] = terms, {n: p.grad.clone() for n, p in clt.named_parameters()}
    dense_terms, dense_grads = results[False]
    for sparse in (True, None):
        terms, grads = results[sparse]
        for key in ("reconstruction_loss", "auxk_loss", "loss"):
            torch.testing.assert_close(terms[key], dense_terms[key], atol=1e-5, rtol=1e-5)
        for name, grad in dense_grads.items():
            torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4)


def test_without_gradients_or_for_jumprelu_the_path_is_dense():
    clt = make_clt("topk", d_latent=512)
    assert clt.uses_sparse_path(0)
    with torch.no_grad():
        assert not clt.uses_sparse_path(0)
    jump = make_clt("jumprelu", d_latent=512)
    jump.sparse_training = True
    assert not jump.uses_sparse_path(0)


def test_jumprelu_penalty_weights_codes_by_concatenated_decoder_norms():
    clt = make_clt("jumprelu", sparsity_coefficient=0.5, tanh_scale=2.0)
    inputs, targets = batch(clt)
    out = clt.forward_train(inputs)
    terms = clt.loss(inputs, targets, out, sparsity_scale=0.5)
    expected = 0.0
    for layer in range(3):
        # ||W_dec,i|| over every layer feature i writes to (the paper's concatenation).
        norms = torch.cat([clt.decoder(layer, t) for t in range(layer, 3)], dim=1).norm(dim=1)
        codes = out.codes(layer)
        expected += torch.tanh(2.0 * codes * norms).sum(-1).mean()
    torch.testing.assert_close(terms["sparsity_loss"], 0.5 * 0.5 * expected)
    terms["loss"].backward()
    for name, p in clt.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


@pytest.mark.parametrize("mode", ["fvu", "mse"])
def test_reconstruction_loss_sums_over_output_layers(mode):
    clt = make_clt("topk", reconstruction_loss=mode)
    inputs, targets = batch(clt)
    out = clt.forward_train(inputs)
    terms = clt.loss(inputs, targets, out)
    per_layer = []
    for t, y in enumerate(targets):
        error = (out.reconstruction[:, t] - y).pow(2).sum(-1).mean()
        variance = (y - y.mean(0)).pow(2).sum(-1).mean()
        per_layer.append(error / variance if mode == "fvu" else error)
        torch.testing.assert_close(terms[f"fvu/{t}"], error / variance)
    torch.testing.assert_close(terms["reconstruction_loss"], sum(per_layer))


# ---------------------------------------------------------------- PLT as a special case
@pytest.mark.parametrize("activation", sorted(KINDS))
def test_plt_is_a_set_of_per_layer_transcoders(activation):
    clt = make_clt(activation, cross_layer=False).eval()
    inputs, _ = batch(clt)
    assert [tuple(w.shape) for w in clt.W_dec] == [(16, 1, 8)] * 3
    with torch.no_grad():
        if activation == "batchtopk":
            clt.train().forward_train(inputs)
            clt.eval()
        reconstruction = clt(inputs)
        for layer in range(3):
            assert clt.decoder(0, layer) is None or layer == 0
            transcoder = clt.layer_transcoder(layer).eval()
            assert transcoder.config.provenance.site == f"layers.{layer}.mlp_in"
            torch.testing.assert_close(transcoder(inputs[layer]), reconstruction[:, layer])
    with pytest.raises(ConfigError, match="cross_layer=False"):
        make_clt(activation).layer_transcoder(0)


def test_a_clt_without_cross_layer_writes_equals_the_plt():
    clt, plt = make_clt("jumprelu"), make_clt("jumprelu", cross_layer=False)
    shared = {k: v for k, v in clt.state_dict().items() if not k.startswith("W_dec")}
    plt.load_state_dict(shared, strict=False)
    with torch.no_grad():
        for s in range(3):
            clt.W_dec[s][:, 1:] = 0.0  # writes past the own layer removed
            plt.W_dec[s].copy_(clt.W_dec[s][:, :1])
    inputs, _ = batch(clt)
    with torch.no_grad():
        torch.testing.assert_close(clt(inputs), plt(inputs))


# ---------------------------------------------------------------- files
@pytest.mark.parametrize("activation", sorted(KINDS))
def test_save_load_round_trip_is_bitwise(activation, tmp_path):
    clt = make_clt(activation, d_latent=[16, 12, 8])
    inputs, _ = batch(clt)
    clt.train().forward_train(inputs)  # BatchTopK: thresholds estimated, saved as buffers
    clt.config = clt.config.replace(input_scales=[2.0, 1.0, 0.5], backbone="tiny")
    loaded = CrossLayerTranscoder.load(clt.save(tmp_path / "clt"))
    assert loaded.config == clt.config and not loaded.training
    original = clt.state_dict()
    assert original.keys() == loaded.state_dict().keys()
    for name, tensor in loaded.state_dict().items():
        assert tensor.dtype == original[name].dtype and torch.equal(tensor, original[name])
    with torch.no_grad():
        assert torch.equal(loaded.eval()(inputs), clt.eval()(inputs))


def test_load_refuses_missing_or_mismatched_files(tmp_path):
    folder = make_clt().save(tmp_path / "clt")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "d_latent": 4}))
    with pytest.raises(CorruptFileError, match="does not match"):
        CrossLayerTranscoder.load(folder)
    (folder / "clt.safetensors").unlink()
    with pytest.raises(DictionaryNotFoundError, match="clt.safetensors"):
        CrossLayerTranscoder.load(folder)
