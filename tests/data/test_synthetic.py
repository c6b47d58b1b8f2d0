"""Tests of the planted-dictionary data generator and the recovery score."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_interp.data import (
    SparseSuperposition,
    SyntheticActivations,
    mean_max_cosine_similarity,
)
from lightning_interp.errors import ConfigError, ShapeMismatchError


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def indicator_correlation(fires: torch.Tensor) -> torch.Tensor:
    """Pearson correlation matrix of the boolean firing indicators, ``[F, F]``."""
    return torch.corrcoef(fires.double().T)


# ---------------------------------------------------------------------- determinism
def test_same_seed_gives_same_atoms_and_samples():
    kwargs = dict(d=16, n_features=40, correlation=0.3, offset_norm=1.0, noise_std=0.1)
    a = SparseSuperposition(**kwargs, seed=7)
    b = SparseSuperposition(**kwargs, seed=7)
    assert torch.equal(a.atoms, b.atoms)
    assert torch.equal(a.offset, b.offset)
    assert torch.equal(a.factors, b.factors)
    xa, ca = a.sample(64, generator=seeded(3))
    xb, cb = b.sample(64, generator=seeded(3))
    assert torch.equal(xa, xb) and torch.equal(ca, cb)
    xc, _ = a.sample(64, generator=seeded(4))
    assert not torch.equal(xa, xc)


def test_different_seed_gives_different_atoms():
    a = SparseSuperposition(d=16, n_features=40, seed=0)
    b = SparseSuperposition(d=16, n_features=40, seed=1)
    assert not torch.allclose(a.atoms, b.atoms)


def test_atoms_are_unit_norm():
    data = SparseSuperposition(d=24, n_features=100, seed=0)
    assert data.atoms.shape == (100, 24)
    torch.testing.assert_close(data.atoms.norm(dim=1), torch.ones(100))


def test_sample_without_generator_is_reproducible_under_manual_seed():
    data = SparseSuperposition(d=8, n_features=16, seed=0)
    torch.manual_seed(0)
    first = data.sample(5)[0]
    after_first = torch.randn(4)
    torch.manual_seed(0)
    torch.testing.assert_close(data.sample(5)[0], first, rtol=0, atol=0)
    # The global stream continues deterministically (it is drawn from, never re-seeded).
    torch.testing.assert_close(torch.randn(4), after_first, rtol=0, atol=0)


# ---------------------------------------------------------------------- statistics
def test_mean_active_features_matches_firing_probability():
    n_features, p = 64, 0.05
    data = SparseSuperposition(d=32, n_features=n_features, firing_probability=p, seed=0)
    _, coefficients = data.sample(20_000, generator=seeded(0))
    active = (coefficients != 0).double()
    assert float(active.sum(1).mean()) == pytest.approx(p * n_features, rel=0.03)
    # Every feature fires at about the same rate without a Zipf exponent.
    assert float(active.mean(0).min()) > 0.6 * p and float(active.mean(0).max()) < 1.4 * p
    assert bool((coefficients >= 0).all())


def test_x_is_coefficients_times_atoms_plus_offset_without_noise():
    data = SparseSuperposition(d=16, n_features=48, offset_norm=2.5, noise_std=0.0, seed=2)
    x, coefficients = data.sample(256, generator=seeded(1))
    assert x.shape == (256, 16) and coefficients.shape == (256, 48)
    assert float(data.offset.norm()) == pytest.approx(2.5, rel=1e-5)
    torch.testing.assert_close(x, coefficients @ data.atoms + data.offset)


def test_noise_has_the_requested_standard_deviation():
    data = SparseSuperposition(d=16, n_features=48, noise_std=0.3, seed=2)
    x, coefficients = data.sample(4096, generator=seeded(1))
    residual = x - coefficients @ data.atoms - data.offset
    assert float(residual.std()) == pytest.approx(0.3, rel=0.05)


def test_child_never_fires_without_its_parent():
    n_parents, children = 3, 4
    data = SparseSuperposition(
        d=16,
        n_features=32,
        firing_probability=0.2,
        n_parents=n_parents,
        children_per_parent=children,
        child_probability=0.5,
        seed=0,
    )
    expected_parent = torch.full((32,), -1, dtype=torch.long)
    for p in range(n_parents):
        expected_parent[n_parents + p * children : n_parents + (p + 1) * children] = p
    assert torch.equal(data.parent, expected_parent)

    _, coefficients = data.sample(5000, generator=seeded(0))
    fires = coefficients != 0
    is_child = data.parent >= 0
    child_fires = fires[:, is_child]
    parent_fires = fires[:, data.parent[is_child]]
    assert child_fires.any()
    assert not (child_fires & ~parent_fires).any()
    # Given its parent, a child fires with child_probability.
    conditional = child_fires.sum(0).double() / parent_fires.sum(0).double()
    assert float(conditional.mean()) == pytest.approx(0.5, abs=0.05)


def test_correlation_raises_cofiring_of_features_sharing_factors():
    kwargs = dict(d=16, n_features=32, firing_probability=0.1, correlation_rank=2, seed=0)
    correlated = SparseSuperposition(**kwargs, correlation=0.8)
    independent = SparseSuperposition(**kwargs, correlation=0.0)
    # Pairs whose factor loadings point the same way share most of their latent Gaussian.
    similarity = correlated.factors @ correlated.factors.T
    sharing = (similarity > 0.5) & ~torch.eye(32, dtype=torch.bool)
    assert int(sharing.sum()) > 20

    def cofiring(data):
        _, coefficients = data.sample(10_000, generator=seeded(0))
        return float(indicator_correlation(coefficients != 0)[sharing].mean())

    with_correlation, without = cofiring(correlated), cofiring(independent)
    assert abs(without) < 0.02
    assert with_correlation > 0.15
    assert with_correlation > without + 0.1


def test_correlation_keeps_the_marginal_firing_rate():
    data = SparseSuperposition(d=16, n_features=32, firing_probability=0.1, correlation=0.8)
    _, coefficients = data.sample(10_000, generator=seeded(0))
    assert float((coefficients != 0).double().mean()) == pytest.approx(0.1, rel=0.05)


def test_zipf_exponent_makes_early_features_fire_more():
    data = SparseSuperposition(d=16, n_features=32, firing_probability=0.05, zipf_exponent=1.0)
    _, coefficients = data.sample(5000, generator=seeded(0))
    rates = (coefficients != 0).double().mean(0)
    assert float(rates[0]) > 5 * float(rates[-1])
    assert float(rates[0]) > float(rates[15]) > float(rates[-1])
    # The mean rate is still firing_probability.
    assert float(rates.mean()) == pytest.approx(0.05, rel=0.1)
    flat = SparseSuperposition(d=16, n_features=32, zipf_exponent=0.0)
    assert torch.allclose(flat.probabilities, torch.full((32,), 0.05))


# ---------------------------------------------------------------------- dataset
def test_synthetic_activations_yields_batches_of_the_right_shape():
    data = SparseSuperposition(d=12, n_features=24, seed=0)
    dataset = SyntheticActivations(data, batch_size=32, num_batches=5, seed=1)
    assert len(dataset) == 5
    batches = list(dataset)
    assert len(batches) == 5
    assert all(b.shape == (32, 12) and b.dtype == torch.float32 for b in batches)
    # Batches within an epoch differ.
    assert not torch.equal(batches[0], batches[1])


def test_synthetic_activations_epochs_differ_and_runs_repeat():
    data = SparseSuperposition(d=12, n_features=24, seed=0)
    dataset = SyntheticActivations(data, batch_size=16, num_batches=3, seed=1)
    first_epoch = torch.stack(list(dataset))
    second_epoch = torch.stack(list(dataset))
    assert not torch.equal(first_epoch, second_epoch)

    again = SyntheticActivations(data, batch_size=16, num_batches=3, seed=1)
    torch.testing.assert_close(torch.stack(list(again)), first_epoch, rtol=0, atol=0)
    other_seed = SyntheticActivations(data, batch_size=16, num_batches=3, seed=2)
    assert not torch.equal(torch.stack(list(other_seed)), first_epoch)


def test_synthetic_activations_through_a_dataloader():
    data = SparseSuperposition(d=12, n_features=24, seed=0)
    direct = torch.stack(list(SyntheticActivations(data, 8, 4, seed=3)))
    loader = DataLoader(SyntheticActivations(data, 8, 4, seed=3), batch_size=None)
    torch.testing.assert_close(torch.stack(list(loader)), direct, rtol=0, atol=0)


def test_workers_split_an_epoch_instead_of_repeating_it():
    data = SparseSuperposition(d=12, n_features=24, seed=0)
    direct = torch.stack(list(SyntheticActivations(data, 8, 6, seed=3)))
    loader = DataLoader(SyntheticActivations(data, 8, 6, seed=3), batch_size=None, num_workers=2)
    split = torch.stack(list(loader))
    assert split.shape == direct.shape
    # Workers interleave batches; the set of batches is the same as a single process's.
    assert sorted(map(float, split.sum((1, 2)))) == sorted(map(float, direct.sum((1, 2))))


def test_set_epoch_chooses_the_epoch():
    data = SparseSuperposition(d=12, n_features=24, seed=0)
    dataset = SyntheticActivations(data, 8, 2, seed=3)
    first = torch.stack(list(dataset))
    list(dataset)
    dataset.set_epoch(0)
    torch.testing.assert_close(torch.stack(list(dataset)), first, rtol=0, atol=0)


# ---------------------------------------------------------------------- recovery score
def test_mean_max_cosine_is_one_for_permuted_rescaled_atoms():
    data = SparseSuperposition(d=32, n_features=64, seed=0)
    generator = seeded(0)
    permutation = torch.randperm(64, generator=generator)
    scales = torch.rand(64, 1, generator=generator) * 5 + 0.1
    learned = data.atoms[permutation] * scales
    assert mean_max_cosine_similarity(learned, data.atoms) == pytest.approx(1.0, abs=1e-5)


def test_mean_max_cosine_ignores_extra_learned_atoms():
    data = SparseSuperposition(d=32, n_features=64, seed=0)
    extra = torch.randn(200, 32, generator=seeded(1))
    learned = torch.cat([extra[:100], data.atoms.flip(0), extra[100:]])
    assert mean_max_cosine_similarity(learned, data.atoms) == pytest.approx(1.0, abs=1e-5)


def test_mean_max_cosine_is_low_for_random_directions():
    planted = torch.randn(64, 512, generator=seeded(0))
    learned = torch.randn(128, 512, generator=seeded(1))
    score = mean_max_cosine_similarity(learned, planted)
    assert -1.0 <= score < 0.5
    assert score > 0.0  # a max over 128 directions is positive


def test_mean_max_cosine_partial_recovery():
    data = SparseSuperposition(d=256, n_features=40, seed=0)
    half = data.atoms[:20]
    score = mean_max_cosine_similarity(half, data.atoms)
    # Half are matched exactly; the others only meet near-orthogonal atoms in 256 dims.
    assert 0.5 < score < 0.75


def test_mean_max_cosine_rejects_width_mismatch():
    with pytest.raises(ShapeMismatchError, match="width"):
        mean_max_cosine_similarity(torch.randn(10, 8), torch.randn(10, 9))


# ---------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(d=0, n_features=8),
        dict(d=8, n_features=0),
        dict(d=-1, n_features=8),
        dict(d=8, n_features=8, firing_probability=0.0),
        dict(d=8, n_features=8, firing_probability=1.5),
        dict(d=8, n_features=8, correlation=1.0),
        dict(d=8, n_features=8, correlation=-0.1),
        dict(d=8, n_features=8, n_parents=3, children_per_parent=2),
        dict(d=8, n_features=8, correlation=0.5, correlation_rank=0),
        dict(d=8, n_features=8, child_probability=1.5),
        dict(d=8, n_features=8, noise_std=-1.0),
        dict(d=8, n_features=8, magnitude_std=-0.1),
        dict(d=8, n_features=8, offset_norm=-2.0),
    ],
)
def test_invalid_arguments_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        SparseSuperposition(**kwargs)


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        SparseSuperposition(d=8, n_features=8, firing_probability=0.0)


def test_largest_valid_hierarchy_is_accepted():
    data = SparseSuperposition(d=8, n_features=9, n_parents=3, children_per_parent=2)
    assert int((data.parent >= 0).sum()) == 6
