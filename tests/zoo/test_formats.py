"""Foreign folders read into native dictionaries, checked against each library's formulas.

Each test writes a folder exactly as the other library writes it (tests/zoo/foreign_layouts),
reads it with ``read_folder`` (format auto-detected), and compares encode / decode /
forward with the formulas of that library's own source, written here from the raw tensors.
"""

import json

import pytest
import torch
from safetensors import safe_open

from lightning_interp import create_dictionary, load_dictionary
from lightning_interp._weights import PAIRED_CONFIG_KEY, REPLACED_CONFIG_KEY
from lightning_interp.dictionaries import JumpReLUSAE, TopKSAE
from lightning_interp.zoo.formats import FORMATS, convert, detect_format, read_folder, write_folder
from tests.zoo import foreign_layouts as fl
from tests.zoo.foreign_layouts import D_OUT, D, F

ATOL = 1e-5


@pytest.fixture(autouse=True)
def _seed():
    torch.set_num_threads(1)
    torch.manual_seed(0)


def topk_relu(pre, k):
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))


def jumprelu(pre, threshold):
    return torch.relu(pre) * (pre > threshold)


def assert_matches(dictionary, x, codes, reconstruction):
    torch.testing.assert_close(dictionary.encode(x), codes, atol=ATOL, rtol=0)
    torch.testing.assert_close(dictionary(x), reconstruction, atol=ATOL, rtol=0)
    assert (codes != 0).any() and (codes == 0).any()


# ------------------------------------------------------------------ SAELens
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens_standard(tmp_path, apply_b_dec):
    t = fl.saelens_tensors("standard")
    fl.write_saelens_v6(tmp_path, "standard", t, apply_b_dec_to_input=apply_b_dec)
    sae = read_folder(tmp_path)
    x = torch.randn(16, D)
    codes = torch.relu((x - t["b_dec"] * apply_b_dec) @ t["W_enc"] + t["b_enc"])
    assert_matches(sae, x, codes, codes @ t["W_dec"] + t["b_dec"])
    torch.testing.assert_close(sae.decode(codes), codes @ t["W_dec"] + t["b_dec"])
    prov = sae.config.provenance
    assert (prov.site, prov.backbone, prov.context_size) == ("layers.3.resid_post", "gpt2", 128)
    assert prov.dataset == "Skylion007/openwebtext" and prov.trained_as == "saelens:standard"
    assert prov.extra["hook_name"] == "blocks.3.hook_resid_post"


@pytest.mark.parametrize("rescale", [False, True])
def test_saelens_topk_and_decoder_norm_rescaling(tmp_path, rescale):
    t = fl.saelens_tensors("topk")
    fl.write_saelens_v6(tmp_path, "topk", t, k=4, rescale_acts_by_decoder_norm=rescale)
    sae = read_folder(tmp_path)
    assert isinstance(sae, TopKSAE) and sae.config.k == 4
    x = torch.randn(16, D)
    # SAELens TopKSAE.encode/decode: rank pre * ||W_dec_i||, decode codes / ||W_dec_i||.
    norms = t["W_dec"].norm(dim=-1) if rescale else torch.ones(F)
    codes = topk_relu(((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]) * norms, 4)
    assert_matches(sae, x, codes, (codes / norms) @ t["W_dec"] + t["b_dec"])
    assert sae.config.provenance.extra.get("folded_decoder_norm", False) is rescale


@pytest.mark.parametrize("exported_from", ["jumprelu", "batchtopk", "matryoshka"])
def test_saelens_jumprelu_and_batchtopk_exports(tmp_path, exported_from):
    t = fl.saelens_tensors("jumprelu")
    if exported_from != "jumprelu":  # BatchTopK/Matryoshka save one constant threshold
        t["threshold"] = torch.full((F,), 0.3)
    fl.write_saelens_v6(tmp_path, "jumprelu", t)
    sae = read_folder(tmp_path)
    assert isinstance(sae, JumpReLUSAE)
    x = torch.randn(16, D)
    codes = jumprelu((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"], t["threshold"])
    assert_matches(sae, x, codes, codes @ t["W_dec"] + t["b_dec"])


def test_saelens_gated(tmp_path):
    t = fl.saelens_tensors("gated")
    fl.write_saelens_v6(tmp_path, "gated", t)
    sae = read_folder(tmp_path)
    x = torch.randn(16, D)
    centred = x - t["b_dec"]
    gate = centred @ t["W_enc"] + t["b_gate"]
    magnitude = centred @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"]
    codes = (gate > 0) * torch.relu(magnitude)
    assert_matches(sae, x, codes, codes @ t["W_dec"] + t["b_dec"])


SAELENS_TRANSCODERS = [
    "transcoder",
    "skip_transcoder",
    "jumprelu_transcoder",
    "jumprelu_skip_transcoder",  # SAELens 6.54; found missing by test_peer_crosscheck.py
]


@pytest.mark.parametrize("architecture", SAELENS_TRANSCODERS)
def test_saelens_transcoders(tmp_path, architecture):
    t = fl.saelens_tensors(architecture, d_out=D_OUT)
    fl.write_saelens_v6(tmp_path, architecture, t)
    sae = read_folder(tmp_path)
    x = torch.randn(16, D)
    pre = x @ t["W_enc"] + t["b_enc"]  # SAELens Transcoder.process_sae_in: no b_dec
    codes = jumprelu(pre, t["threshold"]) if "jumprelu" in architecture else torch.relu(pre)
    expected = codes @ t["W_dec"] + t["b_dec"]
    if "skip" in architecture:
        expected = expected + x @ t["W_skip"].T
    assert_matches(sae, x, codes, expected)
    assert sae.d_out == D_OUT and not sae.config.apply_b_dec_to_input
    assert sae.config.skip_connection is ("skip" in architecture)
    prov = sae.config.provenance
    assert (prov.site, prov.site_out) == ("layers.3.mlp_in", "layers.3.mlp_out")


def test_saelens_pre_6_flat_config_with_scaling_factor(tmp_path):
    t = fl.saelens_tensors("topk")
    t["scaling_factor"] = torch.rand(F) + 0.5  # pre-6.0 finetuning scaling of the codes
    fl.write_saelens_legacy(tmp_path, t, k=3)
    sae = read_folder(tmp_path)
    x = torch.randn(16, D)
    codes = topk_relu((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"], 3)
    assert_matches(sae, x, codes, (codes * t["scaling_factor"]) @ t["W_dec"] + t["b_dec"])
    assert sae.config.provenance.site == "layers.1.resid_pre"
    assert sae.config.provenance.dataset == "NeelNanda/pile-10k"


def test_saelens_expected_norm_scaling_is_folded(tmp_path):
    t = fl.saelens_tensors("standard")
    fl.write_saelens_v6(tmp_path, "standard", t, normalize_activations="expected_average_only_in")
    (tmp_path / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 2.5}))
    sae = read_folder(tmp_path)
    x = torch.randn(16, D)
    # Trained on 2.5 * x: the folded dictionary must equal SAE(2.5 x) / 2.5 on raw inputs.
    codes = torch.relu((2.5 * x - t["b_dec"]) @ t["W_enc"] + t["b_enc"])
    assert_matches(sae, x, codes, (codes @ t["W_dec"] + t["b_dec"]) / 2.5)
    assert sae.config.provenance.extra["folded_activation_scale"] == 2.5


def test_saelens_per_input_normalization_is_reported(tmp_path):
    t = fl.saelens_tensors("standard")
    fl.write_saelens_v6(tmp_path, "standard", t, normalize_activations="layer_norm")
    with pytest.warns(UserWarning, match="layer_norm"):
        sae = read_folder(tmp_path)
    assert sae.config.provenance.normalization == "layer_norm"


def test_saelens_hook_z_maps_to_attn_z(tmp_path):
    t = fl.saelens_tensors("standard")
    fl.write_saelens_v6(tmp_path, "standard", t, reshape_activations="hook_z")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = "blocks.4.attn.hook_z"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    sae = read_folder(tmp_path)
    assert sae.config.provenance.site == "layers.4.attn_z"
    assert sae.config.provenance.extra["reshape_activations"] == "hook_z"


# ------------------------------------------------------------------ SAELens writer
def trained_like(architecture, **kwargs):
    sae = create_dictionary(architecture, d_in=D, d_latent=F, **kwargs)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    if architecture == "batchtopk":
        sae.train().forward_train(torch.randn(64, D))
    return sae.eval()


WRITABLE = [
    ("standard", {}),
    ("topk", {"k": 4}),
    ("batchtopk", {"k": 4}),
    ("jumprelu", {}),
    ("gated", {}),
    ("standard", {"d_out": D_OUT, "apply_b_dec_to_input": False, "skip_connection": True}),
    ("jumprelu", {"d_out": D_OUT, "apply_b_dec_to_input": False}),
    ("jumprelu", {"d_out": D_OUT, "apply_b_dec_to_input": False, "skip_connection": True}),
]


@pytest.mark.parametrize(("architecture", "kwargs"), WRITABLE)
def test_native_saelens_native_round_trip_is_exact(tmp_path, architecture, kwargs):
    sae = trained_like(architecture, **kwargs)
    sae.save_pretrained(tmp_path / "native")
    convert(tmp_path / "native", tmp_path / "saelens", to_format="saelens")
    convert(tmp_path / "saelens", tmp_path / "back")
    back, expected = load_dictionary(tmp_path / "back"), sae.to_inference()
    assert type(back) is type(expected) and back.config == expected.config
    for name, tensor in expected.export_tensors().items():
        torch.testing.assert_close(back.export_tensors()[name], tensor, rtol=0, atol=0)


@pytest.mark.parametrize(("architecture", "kwargs"), WRITABLE)
def test_saelens_writer_layout(tmp_path, architecture, kwargs):
    sae = trained_like(architecture, **kwargs)
    write_folder(sae, tmp_path, format="saelens")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    head = ["d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations"]
    assert list(cfg)[:8] == [*head, "reshape_activations", "metadata"]  # SAEConfig field order
    assert list(cfg)[-1] == "architecture" and cfg["metadata"]["sae_lens_version"].startswith("6.")
    expected = {"W_enc": (D, F), "W_dec": (F, sae.d_out), "b_dec": (sae.d_out,)}
    with safe_open(str(tmp_path / "sae_weights.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        # SAELens's save_file passes no metadata and its loader ignores it: ours holds only
        # the pairing keys that make the two-file write crash-consistent.
        assert set(f.metadata()) == {PAIRED_CONFIG_KEY, REPLACED_CONFIG_KEY}
    assert expected.items() <= shapes.items()
    if cfg["architecture"] == "transcoder" or "transcoder" in cfg["architecture"]:
        assert cfg["d_out"] == D_OUT and cfg["apply_b_dec_to_input"] is False
    # A SAELens-layout folder without our stash still reads back to the same function.
    del cfg["metadata"]["lightning_interp"]
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    x = torch.randn(16, D)
    torch.testing.assert_close(read_folder(tmp_path)(x), sae.to_inference()(x), atol=ATOL, rtol=0)


def test_saelens_writer_maps_sites_to_transformerlens(tmp_path):
    from lightning_interp.dictionaries.config import Provenance

    prov = Provenance(backbone="gpt2", site="layers.7.resid_post", context_size=64)
    write_folder(
        create_dictionary("topk", d_in=D, d_latent=F, k=2, provenance=prov),
        tmp_path,
        format="saelens",
    )
    metadata = json.loads((tmp_path / "cfg.json").read_text())["metadata"]
    assert (metadata["hook_name"], metadata["model_name"], metadata["context_size"]) == (
        "blocks.7.hook_resid_post",
        "gpt2",
        64,
    )


# ------------------------------------------------------------------ sparsify
def test_sparsify_topk_sae(tmp_path):
    folder = tmp_path / "layers.5"
    t = fl.write_sparsify(folder, k=3)
    sae = read_folder(folder)
    x = torch.randn(16, D)
    # sparsify: relu(linear(x - b_dec)) then top-k; decode top_acts @ W_dec (no transpose).
    codes = topk_relu(torch.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"]), 3)
    assert_matches(sae, x, codes, codes @ t["W_dec"] + t["b_dec"])
    prov = sae.config.provenance
    assert (prov.site, prov.backbone, prov.context_size) == (
        "layers.5.resid_post",
        "EleutherAI/pythia-70m",
        2048,
    )
    # SAELens's sparsify_disk_loader sets apply_b_dec_to_input = not normalize_decoder (False
    # here) and transposes W_dec; sparsify centres the input, so the uncentred codes differ.
    uncentred = topk_relu(torch.relu(x @ t["encoder.weight"].T + t["encoder.bias"]), 3)
    assert not torch.allclose(sae.encode(x), uncentred)


def test_sparsify_skip_transcoder(tmp_path):
    folder = tmp_path / "layers.2.mlp"
    t = fl.write_sparsify(folder, k=4, transcode=True, skip=True)
    sae = read_folder(folder)
    x = torch.randn(16, D)
    codes = topk_relu(torch.relu(x @ t["encoder.weight"].T + t["encoder.bias"]), 4)
    assert_matches(sae, x, codes, codes @ t["W_dec"] + t["b_dec"] + x @ t["W_skip"].T)
    prov = sae.config.provenance
    assert (prov.site, prov.site_out) == ("layers.2.mlp_in", "layers.2.mlp_out")
    assert prov.extra["hookpoint"] == "layers.2.mlp"


def test_sparsify_mlp_sae_site(tmp_path):
    fl.write_sparsify(tmp_path / "layers.8.mlp", k=2)
    assert read_folder(tmp_path / "layers.8.mlp").config.provenance.site == "layers.8.mlp_out"


# ------------------------------------------------------------------ dictionary_learning
def dl_reference(dict_class, s, x):
    """dictionary_learning's own encode/decode for each class (dictionary.py, trainers/*)."""
    if dict_class in ("AutoEncoder", "AutoEncoderNew"):
        b = s["bias"] if dict_class == "AutoEncoder" else torch.zeros(D)
        codes = torch.relu((x - b) @ s["encoder.weight"].T + s["encoder.bias"])
        out_bias = s["bias"] if dict_class == "AutoEncoder" else s["decoder.bias"]
        return codes, codes @ s["decoder.weight"].T + out_bias
    if dict_class == "GatedAutoEncoder":
        x_enc = (x - s["decoder_bias"]) @ s["encoder.weight"].T
        codes = (x_enc + s["gate_bias"] > 0) * torch.relu(s["r_mag"].exp() * x_enc + s["mag_bias"])
        return codes, codes @ s["decoder.weight"].T + s["decoder_bias"]
    if dict_class == "JumpReluAutoEncoder":  # apply_b_dec_to_input=False
        pre = x @ s["W_enc"] + s["b_enc"]
        codes = torch.relu(pre * (pre > s["threshold"]))
        return codes, codes @ s["W_dec"] + s["b_dec"]
    w_enc = s["W_enc"] if "W_enc" in s else s["encoder.weight"].T
    b_enc = s["b_enc"] if "b_enc" in s else s["encoder.bias"]
    w_dec = s["W_dec"] if "W_dec" in s else s["decoder.weight"].T
    acts = torch.relu((x - s["b_dec"]) @ w_enc + b_enc)
    codes = (
        topk_relu(acts, int(s["k"]))
        if dict_class == "AutoEncoderTopK"
        else acts * (acts > s["threshold"])
    )
    return codes, codes @ w_dec + s["b_dec"]


DL_CLASSES = [
    ("AutoEncoder", "standard"),
    ("AutoEncoderNew", "standard"),
    ("AutoEncoderTopK", "topk"),
    # SAELens's dictionary_learning loader reads BatchTopK as a dense ReLU SAE (threshold
    # dropped); the reference here keeps relu(pre) only above the learned threshold.
    ("BatchTopKSAE", "jumprelu"),
    ("MatryoshkaBatchTopKSAE", "jumprelu"),
    ("JumpReluAutoEncoder", "jumprelu"),
    ("GatedAutoEncoder", "gated"),
]


@pytest.mark.parametrize(("dict_class", "ours"), DL_CLASSES)
def test_dictionary_learning(tmp_path, dict_class, ours):
    state = fl.dictionary_learning_state(dict_class)
    # The April-update trainer writes dict_class "AutoEncoder" for its AutoEncoderNew.
    label = "AutoEncoder" if dict_class == "AutoEncoderNew" else dict_class
    fl.write_dictionary_learning(tmp_path, label, state)
    sae = read_folder(tmp_path)
    assert sae.architecture == ours
    x = torch.randn(16, D)
    assert_matches(sae, x, *dl_reference(dict_class, state, x))
    prov = sae.config.provenance
    assert (prov.site, prov.backbone, prov.context_size) == (
        "layers.3.resid_post",
        "EleutherAI/pythia-70m-deduped",
        128,
    )
    assert prov.trained_as == f"dictionary_learning:{label}"


def test_dictionary_learning_jumprelu_is_not_centred(tmp_path):
    # SAELens's dictionary_learning loader hard-codes apply_b_dec_to_input=True; the
    # JumpReluAutoEncoder it came from never centres its input.
    fl.write_dictionary_learning(
        tmp_path, "JumpReluAutoEncoder", fl.dictionary_learning_state("JumpReluAutoEncoder")
    )
    assert read_folder(tmp_path).config.apply_b_dec_to_input is False


def test_dictionary_learning_batchtopk_without_threshold_keeps_batch_selection(tmp_path):
    state = fl.dictionary_learning_state("BatchTopKSAE", k=2, threshold=-1.0)
    fl.write_dictionary_learning(tmp_path, "BatchTopKSAE", state, k=2)
    sae = read_folder(tmp_path)
    assert sae.architecture == "batchtopk" and float(sae.threshold) < 0
    x = torch.randn(16, D)
    assert int((sae.encode(x) != 0).sum()) == 2 * 16  # k * batch, not a dense ReLU


# ------------------------------------------------------------------ Gemma Scope
def test_gemma_scope_v1(tmp_path):
    t = fl.write_gemma_scope_v1(tmp_path)
    sae = read_folder(tmp_path)
    x = torch.randn(16, D)
    codes = jumprelu(x @ t["W_enc"] + t["b_enc"], t["threshold"])
    assert_matches(sae, x, codes, codes @ t["W_dec"] + t["b_dec"])


@pytest.mark.parametrize("affine", [False, True])
def test_gemma_scope_v2_transcoder(tmp_path, affine):
    t = fl.write_gemma_scope_v2(tmp_path, affine=affine)
    sae = read_folder(tmp_path)
    x = torch.randn(16, D)
    codes = jumprelu(x @ t["w_enc"] + t["b_enc"], t["threshold"])
    expected = codes @ t["w_dec"] + t["b_dec"]
    if affine:  # Gemma Scope 2's reference forward: recon + x @ affine_skip_connection
        expected = expected + x @ t["affine_skip_connection"]
        # Copied unchanged into a W_skip applied as x @ W_skip.T, the skip would be transposed.
        assert not torch.allclose(
            x @ t["affine_skip_connection"], x @ t["affine_skip_connection"].T
        )
    assert_matches(sae, x, codes, expected)
    prov = sae.config.provenance
    assert prov.site == "layers.5.mlp_in"
    assert prov.site_out == "model.layers.5.post_feedforward_layernorm:output"
    assert prov.backbone == "google/gemma-3-1b-pt"


# ------------------------------------------------------------------ OpenAI
@pytest.mark.parametrize(("activation", "tied"), [("ReLU", False), ("ReLU", True), ("TopK", False)])
def test_openai(tmp_path, activation, tied):
    state = fl.openai_state(activation, tied=tied)
    torch.save(state, tmp_path / "6.pt")
    if activation == "TopK":
        with pytest.warns(UserWarning, match="layer_norm"):
            sae = read_folder(tmp_path)
        assert sae.config.provenance.normalization == "layer_norm"
    else:
        sae = read_folder(tmp_path)
    x = torch.randn(16, D)
    pre = (x - state["pre_bias"]) @ state["encoder.weight"].T + state["latent_bias"]
    codes = topk_relu(pre, 3) if activation == "TopK" else torch.relu(pre)
    decoder = state["encoder.weight"].T if tied else state["decoder.weight"]
    assert_matches(sae, x, codes, codes @ decoder.T + state["pre_bias"])


# ------------------------------------------------------------------ detection
@pytest.mark.parametrize(
    ("files", "name"),
    [
        ({"config.json", "model.safetensors"}, "native"),
        ({"cfg.json", "sae_weights.safetensors", "sparsity.safetensors"}, "saelens"),
        ({"cfg.json", "sae.safetensors"}, "sparsify"),
        ({"ae.pt", "config.json"}, "dictionary_learning"),
        ({"params.npz"}, "gemma_scope"),
        ({"params.safetensors", "config.json"}, "gemma_scope"),
        ({"12.pt"}, "openai"),
    ],
)
def test_detect_format(files, name):
    assert detect_format(files) == name
    assert detect_format(f"some/folder/{f}" for f in files) == name
    assert set(FORMATS) == {
        "native",
        "saelens",
        "sparsify",
        "dictionary_learning",
        "gemma_scope",
        "openai",
    }
