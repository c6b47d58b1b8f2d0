"""Variational TopK SAE: the KL term, reparameterised sampling, and the mean at inference."""

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from lightning_interp import ConfigError, create_dictionary
from lightning_interp.dictionaries import TopKSAE
from lightning_interp.dictionaries.topk import keep_topk
from lightning_interp.dictionaries.variational import (
    LOG_VAR_MAX,
    LOG_VAR_MIN,
    gaussian_kl,
    keep_top_magnitude,
    reparameterize,
)


def randomized(**kwargs):
    """A float64 variational TopK SAE with every parameter moved off its initial value."""
    torch.manual_seed(0)
    sae = create_dictionary("variational_topk", d_in=8, d_latent=32, k=4, dtype="float64", **kwargs)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return sae


def by_hand(sae, x):
    """Mean pre-activations and log-variances from the weights."""
    centred = x - sae.b_dec
    return centred @ sae.W_enc + sae.b_enc, centred @ sae.W_enc_log_var + sae.b_enc_log_var


def test_kl_is_the_closed_form_gaussian_divergence():
    mean = torch.randn(5, 7, dtype=torch.float64)
    log_var = torch.empty(5, 7, dtype=torch.float64).uniform_(LOG_VAR_MIN, LOG_VAR_MAX)
    reference = kl_divergence(Normal(mean, (0.5 * log_var).exp()), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(gaussian_kl(mean, log_var), reference)
    # Zero exactly at the prior.
    assert float(gaussian_kl(torch.zeros(3), torch.zeros(3))) == 0.0


def test_kl_gradient_is_the_analytic_one():
    mean = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    log_var = torch.empty(5, 7, dtype=torch.float64).uniform_(-5.0, 1.5).requires_grad_()
    gaussian_kl(mean, log_var).sum().backward()
    # d/dmu = mu, d/dlog_var = (exp(log_var) - 1) / 2.
    torch.testing.assert_close(mean.grad, mean.detach())
    torch.testing.assert_close(log_var.grad, 0.5 * (log_var.detach().exp() - 1.0))
    # Outside the clamp the log-variance gets no gradient (as when sampling).
    outside = torch.tensor([LOG_VAR_MIN - 1.0, LOG_VAR_MAX + 1.0], requires_grad=True)
    gaussian_kl(torch.zeros(2), outside).backward()
    assert not outside.grad.any()


def test_the_dictionary_kl_term_and_its_gradient():
    sae = randomized(kl_coefficient=0.3)
    x = torch.randn(16, 8, dtype=torch.float64)
    out = sae.forward_train(x)
    losses = sae.loss(x, out, sparsity_scale=0.5)
    pre, log_var = by_hand(sae, x)
    mean = torch.relu(pre)
    kl = gaussian_kl(mean, log_var).mean()
    torch.testing.assert_close(losses["kl"], kl.detach())
    torch.testing.assert_close(losses["kl_loss"], 0.3 * 0.5 * kl)
    sae.zero_grad()
    losses["kl_loss"].backward()
    # Through the encoders: d/db_enc = c * mean(relu(pre)), d/db_log_var = c * mean((s^2-1)/2)
    # where the log-variance is inside the clamp (and 0 outside).
    c = 0.3 * 0.5
    torch.testing.assert_close(sae.b_enc.grad, c * mean.detach().mean(0))
    log_var = log_var.detach()
    inside = (log_var > LOG_VAR_MIN) & (log_var < LOG_VAR_MAX)
    assert inside.any() and not inside.all()  # both cases are exercised
    expected = c * (0.5 * (log_var.exp() - 1.0) * inside).mean(0)
    torch.testing.assert_close(sae.b_enc_log_var.grad, expected)
    # The KL alone does not train the decoder.
    assert sae.W_dec.grad is None or not sae.W_dec.grad.any()


def test_sampling_is_reparameterised():
    mean = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    log_var = torch.randn(4, 6, dtype=torch.float64).clamp(-3, 1).requires_grad_()
    noise = torch.randn(4, 6, dtype=torch.float64)
    z = reparameterize(mean, log_var, noise)
    torch.testing.assert_close(z, mean + (0.5 * log_var).exp() * noise)
    z.sum().backward()
    torch.testing.assert_close(mean.grad, torch.ones_like(mean))
    torch.testing.assert_close(log_var.grad, 0.5 * (0.5 * log_var.detach()).exp() * noise)


def test_training_codes_are_the_top_k_of_a_sample_and_train_the_variance():
    sae = randomized().train()
    x = torch.randn(16, 8, dtype=torch.float64)
    torch.manual_seed(1)
    out = sae.forward_train(x)
    torch.manual_seed(1)  # the same draw: the forward pass takes nothing else from the RNG
    noise = torch.randn(16, 32, dtype=torch.float64)
    pre, log_var = by_hand(sae, x)
    z = torch.relu(pre) + (0.5 * log_var.clamp(LOG_VAR_MIN, LOG_VAR_MAX)).exp() * noise
    torch.testing.assert_close(out.codes, keep_top_magnitude(z, 4))
    assert ((out.codes != 0).sum(-1) == 4).all()
    assert (out.codes < 0).any()  # kept by magnitude, with their signs, as the reference
    # The log-variance reaches the reconstruction only through the noise: its encoder
    # learns from the reconstruction error alone.
    out.reconstruction.sub(x).pow(2).sum().backward()
    assert sae.W_enc_log_var.grad.abs().sum() > 0 and sae.b_enc_log_var.grad.abs().sum() > 0


def test_eval_mode_is_deterministic_and_uses_the_mean():
    sae = randomized()
    x = torch.randn(16, 8, dtype=torch.float64)
    sae.train()
    assert not torch.equal(sae.forward_train(x).codes, sae.forward_train(x).codes)
    sae.eval()
    first, second = sae.forward_train(x), sae.forward_train(x)
    assert torch.equal(first.codes, second.codes)
    assert torch.equal(first.reconstruction, second.reconstruction)
    torch.testing.assert_close(first.codes, keep_topk(by_hand(sae, x)[0], 4)[0])
    # encode (inference) uses the mean whatever the mode.
    sae.train()
    assert torch.equal(sae.encode(x), first.codes)


def test_inference_form_is_a_topk_sae_with_the_mean_encoder(tmp_path):
    sae = randomized()
    inference = sae.to_inference()
    assert type(inference) is TopKSAE
    assert inference.config.provenance.trained_as == "variational_topk"
    assert inference.config.k == 4 and inference.config.aux_k == sae.config.aux_k
    assert not any("log_var" in name for name in inference.export_tensors())
    x = torch.randn(16, 8, dtype=torch.float64)
    assert torch.equal(inference.encode(x), sae.eval().encode(x))
    # Saved in training form it keeps the variance encoder.
    sae.save_pretrained(tmp_path, inference_form=False)
    from lightning_interp import load_dictionary

    again = load_dictionary(tmp_path)
    assert again.architecture == "variational_topk"
    torch.testing.assert_close(again.W_enc_log_var, sae.W_enc_log_var, rtol=0, atol=0)


def test_initial_posterior_variance_and_parameter_count():
    sae = create_dictionary("variational_topk", d_in=8, d_latent=32, k=4, log_var_init=-3.0)
    assert not sae.W_enc_log_var.any()
    assert torch.equal(sae.b_enc_log_var, torch.full((32,), -3.0))
    expected = sum(p.numel() for p in sae.parameters())
    assert sae.config.weight_count() == expected


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kl_coefficient": -1.0}, "kl_coefficient must be >= 0"),
        ({"log_var_init": 3.0}, "log_var_init must be in \\[-6.0, 2.0\\]"),
        ({"kl_coefficient": "1"}, "kl_coefficient must be a number"),
    ],
)
def test_bad_settings_are_one_line_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        create_dictionary("variational_topk", d_in=4, d_latent=8, k=2, **kwargs)
    assert "\n" not in str(info.value)
