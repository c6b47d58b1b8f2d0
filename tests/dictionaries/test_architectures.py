"""Forward formulas and loss terms behave as each architecture's paper says."""

import pytest
import torch

from lightning_interp import (
    ConfigError,
    ShapeMismatchError,
    create_dictionary,
    list_architectures,
    load_dictionary,
)
from lightning_interp.dictionaries import (
    BatchTopKSAE,
    JumpReLUSAE,
    Provenance,
    get_dictionary_class,
)
from lightning_interp.dictionaries.init import geometric_median
from tests.helpers import example_kwargs, small_dictionary


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomize(dictionary):
    """Give every parameter non-trivial values so formulas are tested, not zeros."""
    with torch.no_grad():
        for name, p in dictionary.named_parameters():
            if name != "log_threshold":
                p.add_(0.1 * torch.randn_like(p))
    return dictionary


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(d_in=0, d_latent=8, k=2), "d_in must be a positive integer"),
        (dict(d_in=4, d_latent=8, k=9), "k must be an integer in \\[1, d_latent=8\\]"),
        (dict(d_in=4, d_latent=8, k=2, dtype="int8"), "unknown dtype"),
        (dict(d_in=4, d_latent=8, k=2, d_out=6), "apply_b_dec_to_input=True needs d_out"),
        (dict(d_in=4, d_latent=8, k=2, bogus=1), "unknown TopKConfig field.*bogus"),
        (dict(d_in=4, d_latent=8), "missing .*'k'"),
    ],
)
def test_bad_config_gets_a_clear_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        create_dictionary("topk", **kwargs)


@pytest.mark.parametrize("architecture", list_architectures())
def test_wrong_d_in_is_a_shape_error(architecture):
    dictionary = small_dictionary(architecture, d_in=16, d_latent=32)
    with pytest.raises(ShapeMismatchError, match="d_in=16.*got shape \\(3, 24\\)"):
        dictionary(torch.randn(3, 24))
    with pytest.raises(ShapeMismatchError, match="d_latent=32"):
        dictionary.decode(torch.randn(3, 31))


def test_standard_matches_reference_formula_and_l1_is_decoder_weighted():
    sae = randomize(small_dictionary("standard", d_in=8, d_latent=16, l1_coefficient=0.5))
    x = torch.randn(5, 8)
    codes = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    torch.testing.assert_close(sae.encode(x), codes)
    torch.testing.assert_close(sae(x), codes @ sae.W_dec + sae.b_dec)
    out = sae.forward_train(x)
    losses = sae.loss(x, out, sparsity_scale=0.5)
    l1 = (codes * sae.W_dec.norm(dim=1)).sum(-1).mean()
    torch.testing.assert_close(losses["l1"], l1)
    torch.testing.assert_close(losses["l1_loss"], 0.5 * 0.5 * l1)
    mse = (out.reconstruction - x).pow(2).sum(-1).mean()
    torch.testing.assert_close(losses["loss"], mse + 0.25 * l1)


def test_topk_has_exactly_k_active_latents_per_row():
    sae = randomize(small_dictionary("topk", d_in=8, d_latent=64, k=5))
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every pre-activation positive: the ReLU cannot hide a miss
    codes = sae.encode(torch.randn(50, 8))
    assert ((codes != 0).sum(-1) == 5).all()
    pre = sae.encode_pre(torch.randn(50, 8))
    kept = sae.activation(pre) != 0
    # The kept ones are the k largest.
    assert (pre.masked_fill(~kept, float("-inf")).max(-1).values >= pre.max(-1).values).all()
    smallest_kept = pre.masked_fill(~kept, float("inf")).min(-1).values
    largest_dropped = pre.masked_fill(kept, float("-inf")).max(-1).values
    assert (smallest_kept >= largest_dropped).all()


def test_topk_never_keeps_negative_pre_activations():
    sae = small_dictionary("topk", d_in=8, d_latent=16, k=8)
    with torch.no_grad():
        sae.b_enc.fill_(-100.0)
    assert (sae.encode(torch.randn(4, 8)) == 0).all()


def test_batchtopk_has_k_times_batch_active_in_the_batch_not_per_row():
    sae = small_dictionary("batchtopk", d_in=8, d_latent=64, k=4)
    with torch.no_grad():
        sae.b_enc.fill_(10.0)
    x = torch.randn(32, 8) * torch.linspace(0.1, 3, 32)[:, None]  # rows of different sizes
    out = sae.forward_train(x)
    per_row = (out.codes != 0).sum(-1)
    assert int(per_row.sum()) == 4 * 32
    assert per_row.min() != per_row.max()  # the budget is shared across rows


def test_batchtopk_learns_a_threshold_and_exports_jumprelu():
    sae = small_dictionary("batchtopk", d_in=8, d_latent=64, k=4).train()
    assert float(sae.threshold) < 0  # not yet estimated
    with pytest.raises(ConfigError, match="no threshold estimate"):
        sae.to_inference()
    x = torch.randn(256, 8)
    out = sae.forward_train(x)
    smallest = out.codes[out.codes > 0].min()
    torch.testing.assert_close(sae.threshold, smallest)
    exported = sae.to_inference()
    assert isinstance(exported, JumpReLUSAE)
    assert exported.config.provenance.trained_as == "batchtopk"
    assert exported.config.provenance.extra["k"] == 4
    torch.testing.assert_close(exported.threshold, torch.full((64,), float(sae.threshold)))
    # The exported JumpReLU and the BatchTopK in inference mode give the same codes.
    sae.eval()
    torch.testing.assert_close(exported.encode(x), sae.encode(x))


def test_jumprelu_threshold_receives_gradient_from_both_terms():
    sae = small_dictionary("jumprelu", d_in=8, d_latent=32, bandwidth=0.5, initial_threshold=0.2)
    x = torch.randn(64, 8)
    out = sae.forward_train(x)
    # Reconstruction term alone.
    out.reconstruction.pow(2).sum().backward(retain_graph=True)
    grad_from_mse = sae.log_threshold.grad.clone()
    assert grad_from_mse.abs().sum() > 0
    sae.zero_grad()
    # L0 term alone: its gradient goes to the threshold only.
    losses = sae.loss(x, out)
    losses["l0_loss"].backward()
    assert (sae.log_threshold.grad < 0).any()  # raising the threshold lowers L0
    assert sae.W_enc.grad is None or sae.W_enc.grad.abs().sum() == 0


def test_jumprelu_pseudo_derivative_matches_the_paper():
    sae = small_dictionary("jumprelu", d_in=4, d_latent=3, bandwidth=0.2, initial_threshold=1.0)
    pre = torch.tensor([[0.95, 1.5, 0.5]], requires_grad=True)
    codes = sae.activation(pre)
    torch.testing.assert_close(codes, torch.tensor([[0.0, 1.5, 0.0]]))
    codes.sum().backward()
    # d/dθ JumpReLU = -(θ/ε) K((z-θ)/ε): only the first latent is within ε/2 of θ=1.
    expected = torch.tensor([-(1.0 / 0.2), 0.0, 0.0]) * sae.threshold.detach()  # chain via exp
    torch.testing.assert_close(sae.log_threshold.grad, expected)
    torch.testing.assert_close(pre.grad, torch.tensor([[0.0, 1.0, 0.0]]))


def test_gated_matches_reference_and_aux_loss_does_not_train_the_decoder():
    sae = randomize(small_dictionary("gated", d_in=8, d_latent=16, l1_coefficient=1.0))
    x = torch.randn(10, 8)
    centred = x - sae.b_dec
    gate = centred @ sae.W_enc + sae.b_gate
    magnitude = centred @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag
    codes = (gate > 0).float() * torch.relu(magnitude)
    torch.testing.assert_close(sae.encode(x), codes)
    out = sae.forward_train(x)
    losses = sae.loss(x, out)
    losses["aux_loss"].backward()
    assert sae.W_dec.grad is None or sae.W_dec.grad.abs().sum() == 0
    assert sae.W_enc.grad.abs().sum() > 0
    assert not hasattr(sae, "b_enc")


def test_auxk_trains_only_dead_latents_and_vanishes_without_them():
    sae = randomize(small_dictionary("topk", d_in=8, d_latent=32, k=2, aux_k=4))
    x = torch.randn(64, 8)
    out = sae.forward_train(x)
    no_dead = sae.loss(x, out, dead_mask=torch.zeros(32, dtype=torch.bool))
    assert float(no_dead["auxk_loss"]) == 0.0
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:10] = True
    losses = sae.loss(x, out, dead_mask=dead)
    assert float(losses["auxk_loss"]) > 0
    sae.zero_grad()
    losses["auxk_loss"].backward()
    grad_cols = sae.W_enc.grad.abs().sum(0)
    assert (grad_cols[10:] == 0).all() and (grad_cols[:10] > 0).any()


def test_unit_norm_decoder_helpers():
    sae = randomize(small_dictionary("topk", d_in=8, d_latent=32, k=2))
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(32, 1) + 0.5)
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.remove_parallel_decoder_grad_()
    torch.testing.assert_close((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(32))


def test_geometric_median_resists_outliers_and_b_dec_init():
    inliers = torch.randn(500, 4) * 0.1 + torch.tensor([1.0, 2.0, 3.0, 4.0])
    outliers = torch.full((20, 4), 1000.0)
    sample = torch.cat([inliers, outliers])
    median = geometric_median(sample)
    assert (median - torch.tensor([1.0, 2.0, 3.0, 4.0])).norm() < 0.1
    assert (sample.mean(0) - torch.tensor([1.0, 2.0, 3.0, 4.0])).norm() > 10
    sae = small_dictionary("topk", d_in=4, d_latent=8, k=2)
    sae.initialize_b_dec_(sample)
    torch.testing.assert_close(sae.b_dec.detach(), median)
    sae.initialize_b_dec_(sample, method="mean")
    torch.testing.assert_close(sae.b_dec.detach(), sample.mean(0))


def test_transcoder_reads_one_width_and_writes_another():
    tc = create_dictionary("topk", d_in=8, d_latent=32, d_out=12, k=3, apply_b_dec_to_input=False)
    x = torch.randn(5, 8)
    assert tc(x).shape == (5, 12)
    out = tc.forward_train(x)
    losses = tc.loss(x, out, target=torch.randn(5, 12))
    assert losses["loss"].isfinite()


@pytest.mark.parametrize("architecture", list_architectures())
def test_bf16_activations_meet_fp32_weights(architecture):
    dictionary = small_dictionary(architecture, d_in=8, d_latent=32)
    x = torch.randn(16, 8, dtype=torch.bfloat16)
    assert dictionary(x).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dictionary.forward_train(x)
        losses = dictionary.loss(x, out, dead_mask=torch.ones(32, dtype=torch.bool))
    assert losses["loss"].dtype == torch.float32 and losses["loss"].isfinite()
    losses["loss"].backward()
    # Every gradient in the parameters' dtype (a codebook has no W_enc: its codes are keys).
    grads = [p.grad for p in dictionary.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 for g in grads)


def test_batchtopk_threshold_is_left_alone_in_eval_mode():
    sae = small_dictionary("batchtopk", d_in=8, d_latent=32, k=2).eval()
    sae.forward_train(torch.randn(16, 8))
    assert isinstance(sae, BatchTopKSAE) and float(sae.threshold) < 0


# ---------------------------------------------------------------- scale folding
D_IN, D_OUT, F = 8, 6, 48


def scaled_dictionary(architecture, *, scale_in, scale_out=None, **overrides):
    """A randomised float64 dictionary (of any registered architecture) trained on scaled data.

    Float64 keeps every pre-activation far (in ulps) from the thresholds and TopK ties, so
    folding cannot flip a latent on any CPU and the comparison below can be tight.
    """
    torch.manual_seed(0)
    provenance = Provenance(
        normalization="expected_norm", activation_scale=scale_in, activation_scale_out=scale_out
    )
    kwargs = {**example_kwargs(architecture), **overrides}
    dictionary = create_dictionary(
        architecture, d_in=D_IN, d_latent=F, dtype="float64", provenance=provenance, **kwargs
    )
    with torch.no_grad():
        for name, p in dictionary.named_parameters():
            if name != "log_threshold":
                p.add_(0.3 * torch.randn_like(p))
    return dictionary.eval()


FOLDING_CASES = {
    "autoencoder": dict(scale_in=0.37),
    "transcoder": dict(scale_in=0.37, scale_out=2.5, d_out=D_OUT, apply_b_dec_to_input=False),
    "skip-transcoder": dict(
        scale_in=0.37, scale_out=2.5, d_out=D_OUT, apply_b_dec_to_input=False, skip_connection=True
    ),
}


@pytest.mark.parametrize("case", sorted(FOLDING_CASES))
@pytest.mark.parametrize("architecture", list_architectures())
def test_folded_scales_take_raw_activations(architecture, case):
    kwargs = FOLDING_CASES[case]
    if "d_out" in kwargs and not get_dictionary_class(architecture).supports_transcoding:
        pytest.skip(f"{architecture} is autoencoder-only (supports_transcoding=False)")
    trained = scaled_dictionary(architecture, **kwargs)
    scale_in = kwargs["scale_in"]
    scale_out = kwargs.get("scale_out") or scale_in
    folded = trained.with_scale_folded()
    x = 3.0 * torch.randn(64, D_IN, dtype=torch.float64)  # raw activations
    with torch.no_grad():
        codes = trained.encode(scale_in * x)
        active = (codes != 0).double().mean()
        assert 0 < active < 1  # some latents fire, some do not: the comparison means something
        torch.testing.assert_close(folded.encode(x), codes, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(
            folded(x), trained(scale_in * x) / scale_out, rtol=1e-10, atol=1e-10
        )
    provenance = folded.config.provenance
    assert (provenance.activation_scale, provenance.activation_scale_out) == (1.0, None)
    assert provenance.extra["folded_activation_scale"] == scale_in
    assert provenance.extra.get("folded_activation_scale_out", scale_in) == scale_out
    # Folding twice is folding once: the copy records that it takes raw activations.
    torch.testing.assert_close(folded.with_scale_folded()(x), folded(x), rtol=0, atol=0)


def test_two_scales_survive_a_save_and_load(tmp_path):
    trained = scaled_dictionary("jumprelu", **FOLDING_CASES["skip-transcoder"])
    trained.save_pretrained(tmp_path)
    loaded = load_dictionary(tmp_path)
    x = torch.randn(32, D_IN, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained(0.37 * x) / 2.5, rtol=1e-10, atol=1e-10)
    assert loaded.config.provenance.extra["folded_activation_scale_out"] == 2.5
