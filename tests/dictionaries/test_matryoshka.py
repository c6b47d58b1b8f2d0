"""Matryoshka SAEs: nested prefixes that each reconstruct, losses summed over prefixes."""

import copy
import json

import pytest
import torch

from lightning_interp import create_dictionary, load_dictionary
from lightning_interp.data import SparseSuperposition
from lightning_interp.dictionaries import (
    BatchTopKSAE,
    JumpReLUSAE,
    MatryoshkaBatchTopKConfig,
    TopKSAE,
)
from lightning_interp.dictionaries.matryoshka import default_matryoshka_widths
from lightning_interp.errors import ConfigError
from lightning_interp.zoo.formats import read_folder, write_folder

ARCHITECTURES = ["matryoshka_batchtopk", "matryoshka_topk"]
# The plain architecture each Matryoshka one adds its prefix losses to.
BASE = {"matryoshka_batchtopk": "batchtopk", "matryoshka_topk": "topk"}


def perturbed(architecture, **kwargs):
    torch.manual_seed(0)
    sae = create_dictionary(architecture, **{"d_in": 16, "d_latent": 64, "k": 4, **kwargs})
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return sae


def hand_prefix_losses(sae, x, codes, target=None):
    """Each prefix's squared error, decoded densely from ``codes`` by hand."""
    target = x if target is None else target
    losses = []
    for width in sae.config.matryoshka_widths:
        reconstruction = codes[:, :width] @ sae.W_dec[:width] + sae.b_dec
        if sae.config.skip_connection:
            reconstruction = reconstruction + x @ sae.W_skip.T
        losses.append((reconstruction - target).pow(2).sum(-1).mean())
    return losses


# ------------------------------------------------------------------ config
def test_default_widths_double_up_to_d_latent():
    assert default_matryoshka_widths(6144) == [384, 768, 1536, 3072, 6144]
    assert default_matryoshka_widths(128) == [8, 16, 32, 64, 128]
    assert default_matryoshka_widths(8) == [1, 2, 4, 8]
    assert default_matryoshka_widths(1) == [1]
    sae = create_dictionary("matryoshka_batchtopk", d_in=8, d_latent=96, k=2)
    assert sae.config.matryoshka_widths == [6, 12, 24, 48, 96]


@pytest.mark.parametrize(
    ("widths", "message"),
    [
        ([16, 8, 64], "strictly increasing"),
        ([8, 8, 64], "strictly increasing"),
        ([0, 8, 64], "positive"),
        ([8, 16, 32], "end at d_latent=64"),
        ([8, 16, 128], "end at d_latent=64"),
        ([], "empty"),
    ],
)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_bad_widths_are_refused_by_name(architecture, widths, message):
    with pytest.raises(ConfigError, match=message):
        create_dictionary(architecture, d_in=8, d_latent=64, k=2, matryoshka_widths=widths)


def test_widths_are_recorded_in_the_saved_config(tmp_path):
    sae = create_dictionary(
        "matryoshka_batchtopk", d_in=8, d_latent=32, k=2, matryoshka_widths=(4, 32)
    )
    sae.save_pretrained(tmp_path, inference_form=False)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == "matryoshka_batchtopk"
    assert config["matryoshka_widths"] == [4, 32]
    assert MatryoshkaBatchTopKConfig.from_dict(config) == sae.config


# ------------------------------------------------------------------ the loss
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_loss_is_the_sum_of_every_prefix_loss(architecture, sparse):
    sae = perturbed(architecture)
    sae.sparse_training = sparse
    x = torch.randn(48, 16) + 0.5
    out = sae.forward_train(x)
    losses = sae.loss(x, out)  # no dead latents: no AuxK term
    by_hand = hand_prefix_losses(sae, x, out.codes)
    widths = sae.config.matryoshka_widths
    assert len(widths) == 5 and len(by_hand) == 5
    for width, expected in zip(widths[:-1], by_hand, strict=False):
        torch.testing.assert_close(losses[f"prefix_{width}_mse_loss"], expected)
    torch.testing.assert_close(losses["mse_loss"], by_hand[-1])
    total_by_hand = torch.stack(by_hand).sum()
    torch.testing.assert_close(losses["loss"], total_by_hand)
    # The fused prefix-loss backward gives plain autograd's gradients through the same codes.
    params = list(sae.parameters())
    grads = torch.autograd.grad(losses["loss"], params, retain_graph=True)
    for grad, expected in zip(grads, torch.autograd.grad(total_by_hand, params), strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_selection_and_auxk_are_the_base_architectures(architecture):
    # The prefixes change the loss, never which latents fire: selection runs over the
    # whole latent set, and the AuxK loss reads the full reconstruction's residual.
    sae = perturbed(architecture)
    base = create_dictionary(BASE[architecture], d_in=16, d_latent=64, k=4)
    base.load_state_dict(sae.state_dict())
    x = torch.randn(48, 16)
    dead = torch.arange(64) % 3 == 0
    out, base_out = sae.forward_train(x), base.forward_train(x)
    torch.testing.assert_close(out.codes, base_out.codes, rtol=0, atol=0)
    losses, base_losses = sae.loss(x, out, dead_mask=dead), base.loss(x, base_out, dead_mask=dead)
    for name in ("mse_loss", "auxk_loss"):
        torch.testing.assert_close(losses[name], base_losses[name])
    assert float(losses["auxk_loss"].detach()) > 0
    prefixes = sum(v for k, v in losses.items() if k.startswith("prefix_"))
    torch.testing.assert_close(losses["loss"], base_losses["loss"] + prefixes)
    if architecture == "matryoshka_batchtopk":
        torch.testing.assert_close(sae.threshold, base.threshold)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_sparse_gradients_equal_dense_with_an_empty_group_and_a_skip(architecture):
    # The first group (latents 0..3) never fires: its sparse group is empty. A skip
    # connection enters every prefix. The generic test covers the plain case.
    sparse = perturbed(architecture, skip_connection=True, apply_b_dec_to_input=False, d_out=12)
    with torch.no_grad():
        sparse.b_enc[:4] = -100.0
        sparse.W_skip.normal_(0, 0.1)
    dense = copy.deepcopy(sparse)
    dense.sparse_training = False
    x, y = torch.randn(40, 16), torch.randn(40, 12)
    dead = torch.arange(64) % 2 == 0
    grads = []
    for sae in (sparse, dense):
        out = sae.forward_train(x)
        losses = sae.loss(x, out, target=y, dead_mask=dead)
        torch.testing.assert_close(
            losses["loss"],
            torch.stack(hand_prefix_losses(sae, x, out.codes, y)).sum() + losses["auxk_loss"],
        )
        losses["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in sae.named_parameters()})
    assert sparse.forward_train(x).pattern is not None
    for name, grad in grads[1].items():
        torch.testing.assert_close(grads[0][name], grad, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ the defining property
def fit(sae, data, steps=150, batch=256):
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(1)
    x0 = data.sample(2048, generator=generator)[0]
    sae.initialize_b_dec_(x0, "mean")
    for _ in range(steps):
        x = data.sample(batch, generator=generator)[0]
        sae.loss(x, sae.forward_train(x))["loss"].backward()
        sae.remove_parallel_decoder_grad_()
        optimizer.step()
        optimizer.zero_grad()
        sae.normalize_decoder_()
    return sae.eval()


def prefix_fvus(sae, x):
    with torch.no_grad():
        errors = (sae.prefix_reconstructions(x) - x).pow(2).sum(-1).mean(-1)
    return (errors / (x - x.mean(0)).pow(2).sum(-1).mean()).tolist()


@pytest.fixture
def one_thread():
    # Tiny matmuls: a second thread only adds contention on a shared machine (30x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_each_nested_prefix_reconstructs(architecture, one_thread):
    # 48 planted features with Zipf frequencies (1/rank): the 6 most frequent carry ~55% of
    # the variance, so a 6-latent prefix that holds them can reach an FVU near 0.45, while
    # 6 arbitrary latents of a 96-latent SAE would leave ~0.9.
    torch.manual_seed(0)
    data = SparseSuperposition(
        d=24, n_features=48, firing_probability=3 / 48, zipf_exponent=1.0, seed=0
    )
    sae = create_dictionary(
        architecture, d_in=24, d_latent=96, k=3, matryoshka_widths=[6, 12, 24, 96]
    )
    fit(sae, data)
    x = data.sample(4096, generator=torch.Generator().manual_seed(7))[0]
    fvus = prefix_fvus(sae, x)
    assert all(b < a for a, b in zip(fvus, fvus[1:], strict=False)), fvus
    assert fvus[0] < 0.7 and fvus[-1] < 0.3, fvus
    torch.testing.assert_close(sae.prefix_reconstructions(x)[-1], sae(x), rtol=1e-5, atol=1e-5)
    # The general (frequent) features went to the first prefix, the rare ones to the last.
    with torch.no_grad():
        firing_rate = (sae.encode(x) > 0).float().mean(0)
    assert firing_rate[:6].mean() > 5 * firing_rate[24:].mean(), firing_rate


# ------------------------------------------------------------------ inference and export
def trained(architecture):
    sae = perturbed(architecture).train()
    sae.forward_train(torch.randn(64, 16))  # BatchTopK: estimate the threshold
    return sae.eval()


def test_batchtopk_flavour_exports_as_jumprelu_keeping_its_widths(tmp_path):
    sae = trained("matryoshka_batchtopk")
    exported = sae.to_inference()
    assert isinstance(exported, JumpReLUSAE) and isinstance(sae, BatchTopKSAE)
    provenance = exported.config.provenance
    assert provenance.trained_as == "matryoshka_batchtopk"
    assert provenance.extra == {"k": 4, "matryoshka_widths": [4, 8, 16, 32, 64]}
    x = torch.randn(20, 16)
    torch.testing.assert_close(exported(x), sae(x), rtol=0, atol=0)
    write_folder(sae, tmp_path, format="saelens")
    assert json.loads((tmp_path / "cfg.json").read_text())["architecture"] == "jumprelu"
    torch.testing.assert_close(read_folder(tmp_path)(x), sae(x), rtol=1e-6, atol=1e-6)


def test_topk_flavour_exports_as_topk(tmp_path):
    sae = trained("matryoshka_topk")
    exported = sae.to_inference()
    assert type(exported) is TopKSAE and exported.config.k == 4
    assert exported.config.provenance.trained_as == "matryoshka_topk"
    x = torch.randn(20, 16)
    torch.testing.assert_close(exported(x), sae(x), rtol=0, atol=0)
    write_folder(sae, tmp_path / "saelens", format="saelens")
    cfg = json.loads((tmp_path / "saelens" / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["k"]) == ("topk", 4)
    torch.testing.assert_close(read_folder(tmp_path / "saelens")(x), sae(x), rtol=0, atol=1e-6)
    sae.save_pretrained(tmp_path / "training", inference_form=False)
    again = load_dictionary(tmp_path / "training")
    assert again.architecture == "matryoshka_topk" and again.config == sae.config
