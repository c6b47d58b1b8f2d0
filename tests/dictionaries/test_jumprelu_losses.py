"""JumpReLU sparsity losses: step L0, Anthropic's tanh and pre-activation losses, quadratic L0.

Each loss is checked against a hand computation on three rows of three latents with threshold
1 (so ``d/d log_threshold = d/d threshold``) and bandwidth 0.2: a pre-activation is inside
the straight-through kernel when it is within 0.1 of the threshold.
"""

import math

import pytest
import torch

from lightning_interp import ConfigError, create_dictionary
from lightning_interp.dictionaries import DictionaryOutput

PRE = [
    [0.95, 1.5, 0.5],  # L0 1; latent 0 inside the kernel (inactive)
    [1.05, 0.2, 1.3],  # L0 2; latent 0 inside the kernel (active)
    [1.3, 1.02, 1.4],  # L0 3; latent 1 inside the kernel (active)
]
EPS = 0.2


def tiny(**kwargs):
    """A float64 JumpReLU SAE with 3 latents, thresholds 1 and unit decoder rows."""
    return create_dictionary(
        "jumprelu",
        d_in=4,
        d_latent=3,
        dtype="float64",
        bandwidth=EPS,
        initial_threshold=1.0,
        **kwargs,
    )


def losses_on(sae, *, dead_mask=None, sparsity_scale=1.0):
    """The sparsity terms on ``PRE`` (a leaf, so its gradient can be read)."""
    pre = torch.tensor(PRE, dtype=torch.float64, requires_grad=True)
    codes = sae.activation(pre)
    out = DictionaryOutput(codes @ sae.W_dec + sae.b_dec, codes, pre)
    x = torch.zeros(3, 4, dtype=torch.float64)
    terms = sae.sparsity_losses(
        x, out, target=x, sparsity_scale=sparsity_scale, dead_mask=dead_mask
    )
    return terms, pre


def test_step_is_the_default_and_the_l0_through_the_estimator():
    sae = tiny(sparsity_coefficient=0.5)
    assert sae.config.sparsity_loss_mode == "step"
    terms, pre = losses_on(sae, sparsity_scale=0.5)
    assert float(terms["l0"]) == 2.0  # (1 + 2 + 3) / 3, exact counts
    assert float(terms["l0_loss"].detach()) == 0.5 * 0.5 * 2.0
    assert set(terms) == {"l0", "l0_loss"}  # no pre-activation loss unless configured
    terms["l0_loss"].backward()
    # d/dt = -(1/eps) * (entries in the kernel) / N, times the coefficient and the warm-up.
    expected = torch.tensor([-5 * 2 / 3, -5 * 1 / 3, 0.0], dtype=torch.float64) * 0.25
    torch.testing.assert_close(sae.log_threshold.grad, expected)
    assert pre.grad is None or not pre.grad.any()  # the encoder learns nothing from L0


def test_quadratic_pulls_l0_towards_the_target_from_both_sides():
    sae = tiny(sparsity_loss_mode="quadratic", target_l0=2.0)
    terms, pre = losses_on(sae)
    # (2/T)(L0 - T)^2 per row: 1, 0, 1.
    torch.testing.assert_close(terms["l0_loss"], torch.tensor(2 / 3, dtype=torch.float64))
    assert float(terms["l0"]) == 2.0
    terms["l0_loss"].backward()
    # dLoss/dL0_i = (4/T)(L0_i - T)/N = -2/3, 0, 2/3. Row 0 (too sparse) lowers threshold 0,
    # row 2 (too dense) raises threshold 1.
    expected = torch.tensor([-5 * (-2 / 3), -5 * (2 / 3), 0.0], dtype=torch.float64)
    torch.testing.assert_close(sae.log_threshold.grad, expected)
    assert pre.grad is None or not pre.grad.any()


def test_tanh_penalty_and_its_gradients():
    sae = tiny(sparsity_loss_mode="tanh", tanh_scale=4.0)
    terms, pre = losses_on(sae)
    codes = [[0.0, 1.5, 0.0], [1.05, 0.0, 1.3], [1.3, 1.02, 1.4]]
    per_row = [sum(math.tanh(4 * f) for f in row) for row in codes]
    torch.testing.assert_close(
        terms["l0_loss"], torch.tensor(sum(per_row) / 3, dtype=torch.float64)
    )
    assert float(terms["l0"]) == 2.0  # still the true L0, for logging
    terms["l0_loss"].backward()

    def dtanh(f):  # d/df tanh(4 f) with unit decoder norms
        return 4 / math.cosh(4 * f) ** 2

    # The encoder learns through the active latents: 4 sech^2(4 f) / N.
    expected_pre = [[dtanh(f) / 3 if f else 0.0 for f in row] for row in codes]
    torch.testing.assert_close(pre.grad, torch.tensor(expected_pre, dtype=torch.float64))
    # The thresholds through the JumpReLU estimator, -(t/eps) K * dLoss/df, also from the
    # inactive entry in the kernel (row 0, latent 0, where d/df tanh(4f) = 4).
    latent0 = -5 * (dtanh(0.0) + dtanh(1.05)) / 3
    latent1 = -5 * dtanh(1.02) / 3
    expected = torch.tensor([latent0, latent1, 0.0], dtype=torch.float64)
    torch.testing.assert_close(sae.log_threshold.grad, expected)
    # The decoder norms: d/dW_i = sum_rows 4 f sech^2(4 f) W_i / ||W_i|| / N.
    scale = [sum(4 * row[i] / math.cosh(4 * row[i]) ** 2 for row in codes) / 3 for i in range(3)]
    expected_w = torch.tensor(scale, dtype=torch.float64)[:, None] * sae.W_dec.detach()
    torch.testing.assert_close(sae.W_dec.grad, expected_w)


def test_pre_act_loss_pulls_dead_latents_towards_firing():
    sae = tiny(pre_act_loss_coefficient=0.5)
    dead = torch.tensor([True, False, True])
    terms, pre = losses_on(sae, dead_mask=dead, sparsity_scale=0.0)
    # Row 0: relu(1 - 0.95) + relu(1 - 0.5) on the dead latents; rows 1 and 2 fire on both.
    torch.testing.assert_close(
        terms["pre_act_loss"], torch.tensor(0.5 * 0.55 / 3, dtype=torch.float64)
    )
    terms["pre_act_loss"].backward()  # not scaled by the sparsity warm-up, as in SAELens
    g = 0.5 / 3
    expected_pre = torch.zeros(3, 3, dtype=torch.float64)
    expected_pre[0, 0] = expected_pre[0, 2] = -g  # raise the dead latents' pre-activations
    torch.testing.assert_close(pre.grad, expected_pre)
    torch.testing.assert_close(
        sae.log_threshold.grad, torch.tensor([g, 0.0, g], dtype=torch.float64)
    )  # and lower their thresholds; the live latent 1 is left alone
    # Without dead latents there is nothing to revive.
    none, _ = losses_on(sae, dead_mask=torch.zeros(3, dtype=torch.bool))
    assert float(none["pre_act_loss"]) == 0.0


def test_pre_act_loss_is_added_to_the_total():
    sae = tiny(pre_act_loss_coefficient=1.0, sparsity_coefficient=0.0)
    x = torch.randn(8, 4, dtype=torch.float64)
    out = sae.forward_train(x)
    losses = sae.loss(x, out, dead_mask=torch.ones(3, dtype=torch.bool))
    assert float(losses["pre_act_loss"].detach()) > 0
    torch.testing.assert_close(losses["loss"], losses["mse_loss"] + losses["pre_act_loss"])


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"sparsity_loss_mode": "tanh"}, {"sparsity_loss_mode": "quadratic", "target_l0": 4.0}],
)
def test_every_mode_trains_under_bf16_autocast(kwargs):
    torch.manual_seed(0)
    sae = create_dictionary(
        "jumprelu",
        d_in=8,
        d_latent=32,
        initial_threshold=0.1,
        pre_act_loss_coefficient=1e-3,
        **kwargs,
    )
    x = torch.randn(64, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae.forward_train(x)
        losses = sae.loss(x, out, dead_mask=torch.ones(32, dtype=torch.bool))
    assert losses["loss"].dtype == torch.float32 and losses["loss"].isfinite()
    losses["loss"].backward()
    assert sae.log_threshold.grad.isfinite().all() and sae.log_threshold.grad.any()


def train_l0(mode_kwargs, initial_threshold):
    """L0 after 200 Adam steps on one batch of Gaussian rows (about 24 latents of 64 fire
    at threshold 0.3, about 3.4 at 1.6)."""
    torch.manual_seed(0)
    sae = create_dictionary(
        "jumprelu",
        d_in=16,
        d_latent=64,
        bandwidth=0.1,
        initial_threshold=initial_threshold,
        sparsity_coefficient=0.1,
        **mode_kwargs,
    )
    x = torch.randn(256, 16)
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-2)
    for _ in range(200):
        losses = sae.loss(x, sae.forward_train(x))
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    with torch.no_grad():
        return float((sae.encode(x) != 0).sum(-1).float().mean())


def test_quadratic_settles_near_its_target_from_both_sides():
    quadratic = {"sparsity_loss_mode": "quadratic", "target_l0": 8.0}
    from_dense = train_l0(quadratic, initial_threshold=0.3)
    from_sparse = train_l0(quadratic, initial_threshold=1.6)
    assert 6.0 < from_dense < 11.0 and 6.0 < from_sparse < 11.0, (from_dense, from_sparse)
    # The step loss only ever pushes L0 down: from the sparse side it stays well below.
    assert train_l0({}, initial_threshold=1.6) < from_sparse - 2.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sparsity_loss_mode": "cubic"}, "sparsity_loss_mode must be one of"),
        ({"sparsity_loss_mode": "quadratic"}, "set target_l0"),
        ({"target_l0": 4.0}, "only read by sparsity_loss_mode='quadratic'"),
        ({"sparsity_loss_mode": "quadratic", "target_l0": 0.0}, "target_l0 must be in \\(0, "),
        ({"sparsity_loss_mode": "quadratic", "target_l0": 9.0}, "d_latent=8\\]"),
        ({"sparsity_loss_mode": "tanh", "tanh_scale": 0.0}, "tanh_scale must be > 0"),
        ({"pre_act_loss_coefficient": -1.0}, "pre_act_loss_coefficient must be >= 0"),
        ({"target_l0": "4"}, "target_l0 must be a number"),
    ],
)
def test_bad_loss_settings_are_one_line_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        create_dictionary("jumprelu", d_in=4, d_latent=8, **kwargs)
    assert "\n" not in str(info.value)


def test_loss_settings_survive_a_save_and_load(tmp_path):
    from lightning_interp import load_dictionary

    sae = create_dictionary(
        "jumprelu",
        d_in=4,
        d_latent=8,
        sparsity_loss_mode="quadratic",
        target_l0=3.0,
        pre_act_loss_coefficient=3e-6,
    )
    sae.save_pretrained(tmp_path)
    assert load_dictionary(tmp_path).config == sae.config
