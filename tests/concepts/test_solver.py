"""The elastic-net path solver reaches its target sparsity and solves its objective."""

import warnings

import pytest
import torch

from lightning_interp.concepts import elastic_net_objective, fit_sparse_linear
from lightning_interp.concepts.solver import lambda_max, prior_bias, zero_gradient
from lightning_interp.errors import ConfigError


def problem(n=400, f=30, informative=4, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, f, generator=g)
    w = torch.zeros(classes, f)
    w[:, :informative] = 3 * torch.randn(classes, informative, generator=g)
    y = (x @ w.T + 0.5 * torch.randn(n, classes, generator=g)).argmax(-1)
    return x, y


@pytest.mark.parametrize("target", [0.05, 0.1, 0.3])
def test_path_stops_at_the_target_density(target):
    x, y = problem()
    fit = fit_sparse_linear(x, y, 3, target_density=target)
    nonzero = int((fit.weight != 0).sum())
    assert 0 < nonzero <= target * fit.weight.numel()
    densities = [d for _, d, _ in fit.path]
    # lambda_max: the solver checks the KKT condition of W = 0 and returns exact zeros.
    assert densities[0] == 0.0
    assert densities[-1] > target  # the path went one step past the target, then stopped
    assert fit.density == nonzero / fit.weight.numel()


def test_sparse_fit_keeps_informative_features_and_accuracy():
    x, y = problem()
    # The informative features enter the path first ...
    first = fit_sparse_linear(x, y, 3, target_density=0.05)
    assert set(first.weight.nonzero()[:, 1].tolist()) <= set(range(4))
    # ... and a layer with 9 of 90 weights classifies well (chance: about 1/3).
    fit = fit_sparse_linear(x, y, 3, target_density=0.1)
    accuracy = float(((x @ fit.weight.T + fit.bias).argmax(-1) == y).float().mean())
    assert accuracy > 0.85


@pytest.mark.parametrize("seed", range(5))
def test_tied_gradients_leave_no_weight_at_lambda_max(seed):
    """Duplicated and rescaled columns tie the largest gradients: W = 0 must still come out."""
    x, y = problem(f=12, seed=seed)
    x = torch.cat([x, x[:, :4], -x[:, :4]], dim=1)  # |grad| ties across the copies
    for alpha in (0.99, 0.5, 1.0):
        start = lambda_max(x, y, 3, alpha)
        for lam in (start, start * (1 + 1e-7), 10 * start):
            fit = fit_sparse_linear(x, y, 3, lam=lam, alpha=alpha, target_density=None)
            assert not fit.weight.any(), (alpha, lam)
            # ... and that zero is optimal: the KKT condition holds at the returned point.
            grad = zero_gradient(x, y, 3, prior_bias(y, 3))
            assert float(grad.abs().max()) <= lam * alpha * (1 + 1e-12)
            torch.testing.assert_close(fit.bias.double(), prior_bias(y, 3))
        path = fit_sparse_linear(x, y, 3, alpha=alpha, target_density=0.1).path
        assert path[0][:2] == (start, 0.0)


def test_lambda_max_prunes_everything():
    x, y = problem()
    lam = lambda_max(x, y, 3, alpha=0.99)
    fit = fit_sparse_linear(x, y, 3, lam=lam * 1.01, target_density=None)
    assert int((fit.weight != 0).sum()) == 0
    fit = fit_sparse_linear(x, y, 3, lam=lam * 0.7, target_density=None)
    assert int((fit.weight != 0).sum()) > 0


def test_fixed_lambda_matches_sklearn_saga_objective():
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, y = problem(n=300, f=10)
    lam, alpha = 0.02, 0.7
    ours = fit_sparse_linear(
        x, y, 3, lam=lam, alpha=alpha, target_density=None, max_iter=5000, tol=1e-9
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = sklearn.LogisticRegression(
            penalty="elasticnet",
            solver="saga",
            l1_ratio=alpha,
            C=1 / (len(y) * lam),
            tol=1e-10,
            max_iter=20_000,
        ).fit(x.double().numpy(), y.numpy())
    ref_w = torch.from_numpy(ref.coef_).float()
    ref_b = torch.from_numpy(ref.intercept_).float()
    ours_obj = elastic_net_objective(x, y, ours.weight, ours.bias, lam, alpha)
    ref_obj = elastic_net_objective(x, y, ref_w, ref_b, lam, alpha)
    assert ours_obj <= ref_obj + 1e-6
    torch.testing.assert_close(ours.weight, ref_w, atol=2e-2, rtol=0)
    # Supports agree, except possibly on a weight sitting at the threshold, where two
    # solvers (and two CPUs' roundings) may leave it either just zero or just not.
    disagree = (ours.weight != 0) != (ref_w.abs() > 1e-6)
    assert (ours.weight[disagree].abs() < 1e-3).all()
    assert (ref_w[disagree].abs() < 1e-3).all()


def test_bad_arguments_are_typed_errors():
    x, y = problem()
    with pytest.raises(ConfigError, match="exactly one of"):
        fit_sparse_linear(x, y, 3, target_density=0.1, lam=0.1)
    with pytest.raises(ConfigError, match="labels must lie"):
        fit_sparse_linear(x, y + 5, 3)
