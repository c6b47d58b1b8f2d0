"""CLT folders in circuit-tracer's layout, written by a helper following its key names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from lightning_interp.errors import DictionaryNotFoundError, UnknownFormatError
from lightning_interp.zoo.formats.clt_layouts import detect_clt_layout, read_clt_folder
from tests.circuits.test_clt import make_clt

N_LAYERS, D_MODEL, D_TRANSCODER = 3, 8, 12


def circuit_tracer_state(jump: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors as circuit-tracer's CrossLayerTranscoder holds them (its orientation)."""
    g = torch.Generator().manual_seed(seed)
    state = {
        "W_enc": torch.randn(N_LAYERS, D_TRANSCODER, D_MODEL, generator=g),
        "b_enc": torch.randn(N_LAYERS, D_TRANSCODER, generator=g) * 0.1,
        "b_dec": torch.randn(N_LAYERS, D_MODEL, generator=g) * 0.1,
    }
    for i in range(N_LAYERS):
        state[f"W_dec_{i}"] = torch.randn(D_TRANSCODER, N_LAYERS - i, D_MODEL, generator=g)
    if jump:
        state["threshold"] = torch.rand(N_LAYERS, D_TRANSCODER, generator=g)
    return state


def write_circuit_tracer(folder: Path, state: dict, hooks: dict | None = None) -> Path:
    """The files ``CrossLayerTranscoder.to_safetensors`` writes, plus a Hub ``config.yaml``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(N_LAYERS):
        enc = {
            f"W_enc_{i}": state["W_enc"][i].contiguous(),
            f"b_enc_{i}": state["b_enc"][i].contiguous(),
            f"b_dec_{i}": state["b_dec"][i].contiguous(),
        }
        if "threshold" in state:
            enc[f"threshold_{i}"] = state["threshold"][i].contiguous()
        save_file(enc, str(folder / f"W_enc_{i}.safetensors"))
        save_file({f"W_dec_{i}": state[f"W_dec_{i}"]}, str(folder / f"W_dec_{i}.safetensors"))
    if hooks is not None:
        config = {"model_kind": "cross_layer_transcoder", "model_name": "tiny", **hooks}
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


def circuit_tracer_forward(state: dict, x: torch.Tensor) -> torch.Tensor:
    """circuit-tracer's encode (einsum with W_enc [l, f, d]) and decode, ``x [l, n, d]``."""
    features = torch.einsum("lbd,lfd->lbf", x, state["W_enc"]) + state["b_enc"][:, None]
    if "threshold" in state:
        features = features * (features > state["threshold"][:, None])
    else:
        features = torch.relu(features)
    out = state["b_dec"][:, None].expand(N_LAYERS, x.shape[1], D_MODEL).clone()
    for source in range(N_LAYERS):
        for offset in range(N_LAYERS - source):
            out[source + offset] += features[source] @ state[f"W_dec_{source}"][:, offset]
    return out


@pytest.mark.parametrize("jump", [True, False])
def test_reads_circuit_tracer_layout_with_its_outputs(jump, tmp_path):
    state = circuit_tracer_state(jump)
    hooks = {"feature_input_hook": "ln2.hook_normalized", "feature_output_hook": "hook_mlp_out"}
    folder = write_circuit_tracer(tmp_path / "clt", state, hooks)
    assert detect_clt_layout(p.name for p in folder.iterdir()) == "circuit_tracer"
    clt = read_clt_folder(folder)
    assert clt.n_layers == N_LAYERS and clt.d_latent(0) == D_TRANSCODER
    assert clt.input_sites == [f"layers.{i}.mlp_in" for i in range(N_LAYERS)]
    assert clt.output_sites == [f"layers.{i}.mlp_out" for i in range(N_LAYERS)]
    assert clt.config.backbone == "tiny" and not clt.training
    x = torch.randn(N_LAYERS, 5, D_MODEL)
    with torch.no_grad():
        ours = clt(list(x)).transpose(0, 1)
    torch.testing.assert_close(ours, circuit_tracer_forward(state, x), atol=1e-4, rtol=1e-4)
    # Same tensors, our orientation: W_enc transposed, decoders as stored.
    torch.testing.assert_close(clt.encoder(1)[0], state["W_enc"][1].T)
    torch.testing.assert_close(clt.decoder(0, 2), state["W_dec_0"][:, 2])


def test_unmapped_hooks_keep_their_transformerlens_names(tmp_path):
    hooks = {"feature_input_hook": "hook_resid_mid", "feature_output_hook": "hook_mlp_out"}
    folder = write_circuit_tracer(tmp_path / "clt", circuit_tracer_state(True), hooks)
    assert read_clt_folder(folder).input_sites[2] == "blocks.2.hook_resid_mid"


def test_a_missing_layer_file_is_named(tmp_path):
    folder = write_circuit_tracer(tmp_path / "clt", circuit_tracer_state(True))
    (folder / "W_dec_2.safetensors").unlink()
    with pytest.raises(DictionaryNotFoundError, match="W_dec_0..W_dec_2"):
        read_clt_folder(folder)


def test_native_layout_is_detected_and_read(tmp_path):
    clt = make_clt("jumprelu")
    folder = clt.save(tmp_path / "native")
    loaded = read_clt_folder(folder)
    assert all(
        torch.equal(a, b)
        for a, b in zip(loaded.state_dict().values(), clt.state_dict().values(), strict=True)
    )
    with pytest.raises(UnknownFormatError, match="known layouts"):
        detect_clt_layout(["cfg.json", "sae.safetensors"])
