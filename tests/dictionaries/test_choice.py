"""Mutual Choice and Feature Choice SAEs and aux_zipf: their defining properties."""

import math

import pytest
import torch

from lightning_interp import ConfigError, create_dictionary, load_dictionary
from lightning_interp.dictionaries import FeatureChoiceSAE, JumpReLUSAE, MutualChoiceSAE
from lightning_interp.dictionaries.choice import (
    feature_capacities,
    feature_choice,
    zipf_underuse,
)
from lightning_interp.dictionaries.topk import batch_topk, keep_topk
from tests.dictionaries.test_sparse_topk import pair, step


def randomized(architecture, d_in=8, d_latent=64, k=4, **kwargs):
    torch.manual_seed(0)
    sae = create_dictionary(architecture, d_in=d_in, d_latent=d_latent, k=k, **kwargs)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return sae


def all_positive(sae):
    """Every pre-activation positive: a selection cannot hide behind the ReLU."""
    with torch.no_grad():
        sae.b_enc.fill_(10.0)
    return sae


def test_created_with_sensible_defaults():
    mutual = create_dictionary("mutual_choice", d_in=16, d_latent=64, k=4)
    feature = create_dictionary("feature_choice", d_in=16, d_latent=64, k=4)
    assert isinstance(mutual, MutualChoiceSAE) and isinstance(feature, FeatureChoiceSAE)
    for sae in (mutual, feature):
        cfg = sae.config
        assert (cfg.aux_coefficient, cfg.effective_aux_k, cfg.density_momentum) == (1 / 32, 8, 0.99)
    assert feature.config.capacity_exponent == 0.0 and feature.threshold.shape == (64,)
    assert mutual.threshold.shape == ()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("density_momentum", 1.0, "density_momentum must be in \\[0, 1\\)"),
        ("capacity_exponent", -1.0, "capacity_exponent must be a finite number >= 0"),
        ("capacity_exponent", math.inf, "capacity_exponent must be a finite number"),
    ],
)
def test_bad_settings_are_refused(field, value, message):
    with pytest.raises(ConfigError, match=message):
        create_dictionary("feature_choice", d_in=8, d_latent=16, k=2, **{field: value})


@pytest.mark.parametrize("sparse", [True, False])
def test_mutual_choice_makes_exactly_k_times_n_matches_per_batch(sparse):
    sae = all_positive(randomized("mutual_choice", k=4))
    sae.sparse_training = sparse
    x = torch.randn(50, 8) * torch.linspace(0.2, 3.0, 50)[:, None]
    out = sae.forward_train(x)
    assert int((out.codes != 0).sum()) == 4 * 50
    counts = out.l0_per_row()
    assert counts.min() != counts.max()  # shared across the batch, not k per row
    with torch.no_grad():
        torch.testing.assert_close(out.codes, batch_topk(sae.encode_pre(x), 4))


@pytest.mark.parametrize("sparse", [True, False])
def test_feature_choice_never_exceeds_a_latents_cap(sparse):
    n, f, k = 50, 64, 5  # k * N / F = 3.9: caps of 4, and exactly 250 matches
    sae = all_positive(randomized("feature_choice", d_latent=f, k=k))
    sae.sparse_training = sparse
    x = torch.randn(n, 8)
    out = sae.forward_train(x)
    active = out.codes != 0
    per_latent = active.sum(0)
    assert int(per_latent.max()) == math.ceil(k * n / f) and int(active.sum()) == k * n
    assert out.l0_per_row().min() != out.l0_per_row().max()  # an adaptive L0 per token
    # Each latent chose its highest tokens.
    pre = sae.encode_pre(x).detach()
    kept = pre.masked_fill(~active, math.inf).min(0).values
    dropped = pre.masked_fill(active, -math.inf).max(0).values
    assert bool((kept >= dropped).all())


def test_zipf_capacities_share_the_budget_by_a_power_law():
    n, f, k = 40, 32, 4
    capacities = feature_capacities(k, n, f, exponent=1.0)
    assert float(capacities.sum()) == pytest.approx(k * n)
    assert float(capacities[0] / capacities[3]) == pytest.approx(4.0)  # (1 / 1) / (1 / 4)
    pre = torch.randn(n, f) + 5.0
    chosen = feature_choice(pre, capacities)
    per_latent = torch.bincount(chosen % f, minlength=f)
    assert int(per_latent.sum()) == k * n
    assert bool((per_latent >= capacities.floor()).all())
    assert bool((per_latent <= capacities.ceil()).all())


def test_zipf_capacities_above_the_batch_are_capped():
    capacities = feature_capacities(8, 10, 16, exponent=2.0)
    assert float(capacities.max()) == 10.0  # 8 * 10 / 1.58 = 50.5 tokens wanted; 10 exist
    pre = torch.randn(10, 16) + 5.0
    assert int((feature_choice(pre, capacities) % 16 == 0).sum()) == 10


def test_feature_choice_on_a_single_row_is_topk():
    pre = torch.randn(1, 64)
    chosen = feature_choice(pre, feature_capacities(5, 1, 64))
    codes = torch.zeros(64).index_put((chosen,), torch.relu(pre.flatten()[chosen]))
    torch.testing.assert_close(codes, keep_topk(pre, 5)[0].flatten())


# Ranked: 0.4, 0.2, 0.12 (latents 0, 2, 4) set the law; 0.05, 0.01 (1, 5) lie below; 3 is dead.
DENSITY = torch.tensor([0.4, 0.05, 0.2, 0.0, 0.12, 0.01])


def test_zipf_underuse_by_hand():
    # Least squares of log density on log rank over the upper half of the 5 live latents.
    x = [math.log(r) for r in (1, 2, 3)]
    y = [math.log(d) for d in (0.4, 0.2, 0.12)]
    mx, my = sum(x) / 3, sum(y) / 3
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / sum(
        (a - mx) ** 2 for a in x
    )
    fit = [math.exp(my + slope * (math.log(r) - mx)) for r in (1, 2, 3, 4, 5)]
    # fit is about 0.406, 0.192, 0.123, 0.090, 0.071 for ranks 1..5
    expected = [
        1 - 0.4 / fit[0],  # 0.016: the line through three points misses each a little
        1 - 0.05 / fit[3],  # 0.45
        0.0,  # 0.2 is above the fitted 0.192
        1.0,  # dead
        1 - 0.12 / fit[2],  # 0.027
        1 - 0.01 / fit[4],  # 0.86
    ]
    assert 0.2 > fit[1]
    torch.testing.assert_close(zipf_underuse(DENSITY), torch.tensor(expected))


def test_aux_zipf_loss_by_hand():
    sae = randomized("mutual_choice", d_in=6, d_latent=6, k=1, aux_k=2, aux_coefficient=0.5)
    with torch.no_grad():
        sae.feature_density.copy_(DENSITY)
    x = torch.randn(5, 6)
    out = sae.eval().forward_train(x)
    losses = sae.loss(x, out)
    underuse = zipf_underuse(DENSITY)  # all but latent 2 below the law
    with torch.no_grad():
        pre = sae.encode_pre(x)
        residual = x - out.reconstruction
        candidates = pre.masked_fill(underuse == 0, -math.inf)  # latent 2 cannot help
        values, latents = candidates.topk(2, dim=-1)
        predicted = torch.zeros_like(pre).scatter(-1, latents, torch.relu(values)) @ sae.W_dec
        variance = (residual - residual.mean(0)).pow(2).sum(-1).mean()
        normalised = (predicted - residual).pow(2).sum(-1).mean() / variance
        expected = 0.5 * min(float(underuse.sum()) / 2, 1.0) * normalised
    torch.testing.assert_close(losses["aux_zipf_loss"], expected)
    torch.testing.assert_close(losses["underused_fraction"], torch.tensor(5 / 6))


def test_aux_zipf_vanishes_on_a_zipf_law_and_turns_on_below_it():
    f = 200
    law = 0.3 * torch.arange(1, f + 1, dtype=torch.float64).pow(-1.1)
    density = law[torch.randperm(f, generator=torch.Generator().manual_seed(0))].float()
    sae = randomized("mutual_choice", d_latent=f, k=4, aux_coefficient=1.0).eval()
    with torch.no_grad():
        sae.feature_density.copy_(density)
    x = torch.randn(32, 8)
    assert float(sae.loss(x, sae.forward_train(x))["aux_zipf_loss"]) == 0.0
    # The rarest 20 fire a tenth as often as the law says: the low end the paper sees
    # fall below Zipf. They become the most underused, and the loss turns on.
    rarest = density.argsort()[:20]
    with torch.no_grad():
        sae.feature_density[rarest] *= 0.1
    underuse = sae.underuse()
    others = torch.ones(f, dtype=torch.bool).index_fill(0, rarest, False)
    assert float(underuse[rarest].min()) > 0.5 > float(underuse[others].max())
    assert float(sae.loss(x, sae.forward_train(x))["aux_zipf_loss"]) > 0


@pytest.mark.parametrize("architecture", ["mutual_choice", "feature_choice"])
def test_aux_zipf_is_auxk_when_only_dead_latents_fall_below_the_law(architecture):
    # A Zipf law on latents 0..11, latents 12..15 dead: aux_zipf weighs exactly AuxK's set.
    sae = randomized(architecture, d_latent=16, k=2, aux_k=3).eval()
    density = torch.cat([0.5 / torch.arange(1.0, 13.0), torch.zeros(4)])
    with torch.no_grad():
        sae.feature_density.copy_(density)
    reference = create_dictionary("batchtopk", d_in=8, d_latent=16, k=2, aux_k=3).eval()
    reference.load_state_dict(
        {k: v for k, v in sae.state_dict().items() if k not in ("feature_density", "threshold")},
        strict=False,
    )
    x = torch.randn(24, 8)
    out = sae.forward_train(x)
    ours = sae.loss(x, out)["aux_zipf_loss"]
    theirs = reference.loss(x, out, dead_mask=density == 0)["auxk_loss"]
    torch.testing.assert_close(ours, theirs)
    ours.backward()  # only the dead latents' encoder columns receive its gradient
    assert bool((sae.W_enc.grad[:, :12] == 0).all() and (sae.W_enc.grad[:, 12:] != 0).any())


@pytest.mark.parametrize("architecture", ["mutual_choice", "feature_choice"])
def test_the_trainers_dead_latents_always_count_as_underused(architecture):
    sae = randomized(architecture, d_latent=16, k=2)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[3] = True
    assert float(sae.underuse(dead)[3]) == 1.0  # before any density estimate: AuxK
    sae.train().forward_train(torch.randn(64, 8))
    assert float(sae.underuse(dead)[3]) == 1.0


@pytest.mark.parametrize(
    ("architecture", "kwargs"),
    [("mutual_choice", {}), ("feature_choice", {}), ("feature_choice", {"capacity_exponent": 1.0})],
)
def test_sparse_training_path_equals_the_dense_one(architecture, kwargs):
    sparse, dense = pair(architecture, k=4, aux_k=12, **kwargs)
    x = torch.randn(64, 16) + 0.5
    dead = torch.arange(96) % 7 == 0
    history = zip(step(sparse, x, dead_mask=dead), step(dense, x, dead_mask=dead), strict=True)
    for (s_losses, s_grads), (d_losses, d_grads) in history:
        assert float(d_losses["aux_zipf_loss"]) > 0
        for name in d_losses:
            torch.testing.assert_close(s_losses[name], d_losses[name], rtol=1e-5, atol=1e-6)
        for name in d_grads:
            torch.testing.assert_close(s_grads[name], d_grads[name], rtol=1e-4, atol=1e-6)
    for name, buffer in dense.named_buffers():
        torch.testing.assert_close(dict(sparse.named_buffers())[name], buffer)


def test_feature_choice_thresholds_are_per_latent_and_export_as_jumprelu(tmp_path):
    sae = randomized("feature_choice", d_latent=64, k=4).train()
    x = torch.randn(128, 8)
    codes = sae.forward_train(x).codes.detach()
    smallest = codes.masked_fill(codes <= 0, math.inf).min(0).values
    chose = torch.isfinite(smallest)
    torch.testing.assert_close(sae.threshold[chose], smallest[chose])
    assert sae.threshold.unique().numel() > 1  # one threshold per latent
    sae.eval()
    exported = sae.to_inference()
    assert isinstance(exported, JumpReLUSAE)
    assert exported.config.provenance.trained_as == "feature_choice"
    assert exported.config.provenance.extra["k"] == 4
    torch.testing.assert_close(exported.threshold, sae.threshold)
    x = torch.randn(40, 8)
    torch.testing.assert_close(exported.encode(x), sae.encode(x))
    # Inference codes one token at a time: a row's codes do not depend on the batch.
    torch.testing.assert_close(sae.encode(x[:1]), sae.encode(x)[:1])
    sae.save_pretrained(tmp_path)
    assert isinstance(load_dictionary(tmp_path), JumpReLUSAE)


def test_mutual_choice_exports_one_threshold_as_jumprelu():
    sae = randomized("mutual_choice", k=4).train()
    sae.forward_train(torch.randn(64, 8))
    exported = sae.eval().to_inference()
    assert isinstance(exported, JumpReLUSAE)
    assert exported.config.provenance.trained_as == "mutual_choice"
    torch.testing.assert_close(exported.threshold, sae.threshold.expand(64))


@pytest.mark.parametrize("architecture", ["mutual_choice", "feature_choice"])
def test_an_untrained_choice_sae_saves_its_training_form(architecture, tmp_path):
    sae = randomized(architecture).eval()
    assert sae.to_inference() is sae
    sae.save_pretrained(tmp_path)
    loaded = load_dictionary(tmp_path)
    assert type(loaded) is type(sae)
    x = torch.randn(20, 8)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=0, atol=0)
