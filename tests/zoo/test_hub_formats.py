"""Foreign layouts on the Hub load by repo id + site: sparsify and SAELens repos."""

import json

import torch
from safetensors.torch import save

from lightning_interp import load_dictionary
from lightning_interp.zoo.formats import write_folder
from tests.zoo.helpers import assert_same_weights, make_sae

D, F, K = 8, 32, 4


def sparsify_files(hookpoint, seed):
    """One hookpoint folder as sparsify lays it out: cfg.json + sae.safetensors."""
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "encoder.weight": torch.randn(F, D, generator=g),
        "encoder.bias": torch.randn(F, generator=g) * 0.1,
        "W_dec": torch.randn(F, D, generator=g),
        "b_dec": torch.randn(D, generator=g) * 0.1,
    }
    cfg = {
        "activation": "topk",
        "expansion_factor": F // D,
        "normalize_decoder": True,
        "num_latents": F,
        "k": K,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": D,
    }
    files = {
        f"{hookpoint}/cfg.json": json.dumps(cfg).encode(),
        f"{hookpoint}/sae.safetensors": save(tensors),
    }
    return files, tensors


def sparsify_encode(tensors, x):
    """sparsify's encoder: ReLU of the affine map of the centred input, then top-k."""
    pre = torch.relu((x - tensors["b_dec"]) @ tensors["encoder.weight"].T + tensors["encoder.bias"])
    values, indices = pre.topk(K, dim=-1)
    return torch.zeros_like(pre).scatter_(-1, indices, values)


def test_sparsify_repo_loads_one_hookpoint(hub):
    files, wanted = {}, None
    for i in range(3):
        folder, tensors = sparsify_files(f"layers.{i}", seed=i)
        files.update(folder)
        wanted = tensors if i == 1 else wanted
    sha = hub.add_files("EleutherAI/sae-tiny-8x", files)

    sae = load_dictionary("EleutherAI/sae-tiny-8x", site="layers.1")
    assert sae.config.provenance.revision == sha
    x = torch.randn(16, D)
    torch.testing.assert_close(sae.encode(x), sparsify_encode(wanted, x))
    reconstruction = sparsify_encode(wanted, x) @ wanted["W_dec"] + wanted["b_dec"]
    torch.testing.assert_close(sae(x), reconstruction, rtol=1e-5, atol=1e-5)
    downloaded = sorted(
        p.rsplit("/", 2)[-2] + "/" + p.rsplit("/", 1)[-1] for p in hub.state.downloads()
    )
    assert downloaded == ["layers.1/cfg.json", "layers.1/sae.safetensors"]


def test_saelens_repo_loads_by_site(hub, tmp_path):
    saes = {
        hook: make_sae(f"layers.{i}.resid_pre", seed=10 + i)
        for i, hook in enumerate(["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"])
    }
    files = {".gitattributes": b"", "README.md": b"# SAEs\n"}
    for hook, sae in saes.items():
        folder = write_folder(sae, tmp_path / hook, format="saelens")
        files.update({f"{hook}/{p.name}": p.read_bytes() for p in folder.iterdir()})
    hub.add_files("someone/gpt2-saes", files)

    loaded = load_dictionary("someone/gpt2-saes", site="blocks.1.hook_resid_pre")
    assert_same_weights(loaded, saes["blocks.1.hook_resid_pre"])
    x = torch.randn(6, D)
    torch.testing.assert_close(loaded(x), saes["blocks.1.hook_resid_pre"](x))
    assert all("blocks.1.hook_resid_pre" in p for p in hub.state.downloads())
