"""Semi-NMF (Shafran et al. 2025): non-negative codes, monotone alternating updates, recovery."""

import pytest
import torch

from lightning_interp import ConfigError, create_dictionary, load_dictionary
from lightning_interp.data import mean_max_cosine_similarity
from lightning_interp.data.tokens import batch_contexts, iter_contexts
from lightning_interp.dictionaries import SemiNMF
from lightning_interp.dictionaries.snmf import nonnegative_codes
from lightning_interp.features.build import build_feature_store
from lightning_interp.features.layout import read_store
from lightning_interp.features.store import FeatureSettings
from tests.features import builder_helpers
from tests.helpers import loader, make_module, planted_data, quiet_trainer

# The tiny Llama's MLP hidden activations (64 neurons): the input of down_proj.
MLP_HIDDEN = "model.layers.1.mlp.down_proj:input"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def planted_semi_nmf(n, generator, atoms):
    """Rows ``C @ atoms`` with sparse non-negative ``C`` (about 15% of atoms per row)."""
    coefficients = torch.rand(n, len(atoms), generator=generator)
    return (coefficients * (torch.rand(n, len(atoms), generator=generator) < 0.15)) @ atoms


def random_atoms(n, d, seed):
    atoms = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return atoms / atoms.norm(dim=1, keepdim=True)


# ---------------------------------------------------------------- codes
@pytest.mark.parametrize("k", [None, 1, 3, 12, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_codes_are_never_negative_and_at_most_k(k, dtype):
    snmf = create_dictionary("snmf", d_in=8, d_latent=16, k=k, dtype=dtype)
    x = 3 * torch.randn(64, 8, dtype=dtype)
    codes = snmf.encode(x)
    assert codes.dtype == dtype and bool((codes >= 0).all())
    assert int((codes > 0).sum(-1).max()) <= (k or 16)
    sparse = snmf.encode_sparse(x)  # only the positive codes are kept
    assert bool((sparse.values[sparse.mask] > 0).all())
    assert torch.equal(sparse.counts(), (codes > 0).sum(-1))
    out = snmf.fit_step(x)
    assert bool((out.codes >= 0).all())


def test_codes_solve_the_nonnegative_least_squares_problem():
    # KKT conditions of min_{g>=0} |x - gF|^2 (gradient gQ - P): zero where g > 0, and
    # non-negative where g = 0. Features undercomplete (8 in 16 dims): a unique optimum.
    features = random_atoms(8, 16, seed=1).double()
    x = torch.randn(32, 16, dtype=torch.float64)
    projections = x @ features.T
    codes = nonnegative_codes(projections, features, k=None, iterations=1000)
    gradient = codes @ features @ features.T - projections
    scale = projections.abs().max()
    assert bool((codes >= 0).all())
    assert float(gradient[codes > 1e-3].abs().max()) < 1e-4 * scale
    assert float(gradient[codes <= 1e-3].min()) > -1e-3 * scale
    # The same optimum as an exact solver (scipy's active-set NNLS).
    scipy_optimize = pytest.importorskip("scipy.optimize")
    for row in range(4):
        exact, _ = scipy_optimize.nnls(features.T.numpy(), x[row].numpy())
        torch.testing.assert_close(codes[row], torch.from_numpy(exact), atol=1e-4, rtol=0)


def test_k_sparse_codes_are_the_least_squares_fit_on_their_support():
    snmf = create_dictionary("snmf", d_in=16, d_latent=32, k=3, dtype="float64")
    snmf.config = snmf.config.replace(code_iterations=2000)
    x = torch.randn(20, 16, dtype=torch.float64)
    codes = snmf.encode(x)
    residual = x - snmf.b_dec - codes @ snmf.W_dec
    gradient = residual @ snmf.W_dec.T  # -1/2 d|r|^2/dg
    on_support = codes > 1e-3  # codes still decaying to 0 are not at an optimum yet
    assert bool((on_support.sum(-1) <= 3).all())
    assert float(gradient[on_support].abs().max()) < 1e-5


def test_codes_do_not_depend_on_a_common_scale_of_input_and_features():
    features = random_atoms(24, 12, seed=2).double()
    projections = torch.randn(10, 12, dtype=torch.float64) @ features.T
    codes = nonnegative_codes(projections, features, k=4, iterations=15)
    scaled = nonnegative_codes(projections / 9.0, features / 3.0, k=4, iterations=15)
    torch.testing.assert_close(scaled, codes, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- fitting
@pytest.mark.parametrize("k", [None, 3])
def test_full_batch_objective_never_increases(k):
    atoms = random_atoms(12, 32, seed=3)
    x = planted_semi_nmf(1024, torch.Generator().manual_seed(3), atoms).double()
    snmf = create_dictionary("snmf", d_in=32, d_latent=12, k=k, dtype="float64")
    trace = snmf.fit_full_batch(x, iterations=60)
    assert trace.shape == (61,) and float(trace[-1]) < 0.5 * float(trace[0])
    # Ding et al. (2010): least squares for F, the multiplicative step for G, both monotone
    # (up to the 1e-6 ridge). With k the support stays the one encode chose.
    assert float((trace[1:] - trace[:-1]).max()) <= 1e-6 * float(trace[0])
    assert bool((snmf.encode(x) >= 0).all())


def test_online_fit_recovers_planted_features():
    atoms = random_atoms(16, 32, seed=4)
    generator = torch.Generator().manual_seed(4)
    # The paper's uncentred form: X = C F with C >= 0 and no bias.
    snmf = create_dictionary("snmf", d_in=32, d_latent=24, k=3, b_dec_init="zeros", fit_b_dec=False)
    for _ in range(100):
        snmf.fit_step(planted_semi_nmf(256, generator, atoms))
    assert mean_max_cosine_similarity(snmf.W_dec, atoms) > 0.99
    x = planted_semi_nmf(2048, generator, atoms)
    fvu = (snmf(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert float(fvu) < 0.1
    assert not snmf.b_dec.any()  # fit_b_dec=False leaves the bias alone
    torch.testing.assert_close(snmf.W_dec.norm(dim=1), torch.ones(24))


def test_two_identical_ranks_compute_the_features_of_one():
    # fit_step sums its statistics over ranks: a batch seen twice weighs twice, and the
    # least-squares features stay those of one rank.
    x = planted_data().sample(256, generator=torch.Generator().manual_seed(5))[0]
    single = create_dictionary("snmf", d_in=32, d_latent=16, k=2)
    double = create_dictionary("snmf", d_in=32, d_latent=16, k=2)
    double.load_state_dict(single.state_dict())
    for _ in range(3):
        torch.manual_seed(6)  # the same re-seeded rows for both
        single.fit_step(x)
        torch.manual_seed(6)
        double.fit_step(x, reduce=lambda tensor, op: 2 * tensor)
    torch.testing.assert_close(double.W_dec, single.W_dec, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(double.fit_gram, 2 * single.fit_gram, rtol=1e-4, atol=1e-3)


def test_neuron_fraction_keeps_the_papers_share_of_neurons():
    snmf = create_dictionary("snmf", d_in=32, d_latent=16, k=2, neuron_fraction=0.25)
    x = planted_data().sample(512, generator=torch.Generator().manual_seed(7))[0]
    for _ in range(3):
        snmf.fit_step(x)
    assert int((snmf.W_dec != 0).sum(-1).max()) <= 8  # ceil(0.25 * 32) neurons per feature
    indices, weights = snmf.top_neurons(5, n=8)
    row = snmf.W_dec[5].detach()
    assert set(indices.tolist()) == set(row.nonzero().squeeze(1).tolist())
    torch.testing.assert_close(weights, row[indices])
    assert bool((weights.abs()[:-1] >= weights.abs()[1:]).all())


def test_top_neurons_rejects_a_wrong_feature_or_count():
    snmf = create_dictionary("snmf", d_in=8, d_latent=4)
    with pytest.raises(ConfigError, match="feature must be in \\[0, 4\\)"):
        snmf.top_neurons(4)
    with pytest.raises(ConfigError, match="n must be in \\[1, d_in=8\\]"):
        snmf.top_neurons(0, n=9)


# ---------------------------------------------------------------- training and files
def test_trainer_fits_without_gradients_or_optimizer_steps():
    module = make_module(create_dictionary("snmf", d_in=32, d_latent=64, k=4))
    trainer = quiet_trainer(max_steps=30)
    trainer.fit(module, loader(planted_data(), 256, 30, seed=1))
    assert int(module.learner.tokens_seen) == 30 * 256
    assert trainer.global_step == 30
    # The optimizer never stepped (no Adam state), yet the features moved to the data.
    assert not trainer.optimizers[0].state
    assert mean_max_cosine_similarity(module.dictionary.W_dec, planted_data().atoms) > 0.8
    assert all(p.grad is None for p in module.dictionary.parameters())


def test_statistics_are_checkpointed_but_not_exported(tmp_path):
    snmf = create_dictionary("snmf", d_in=32, d_latent=16, k=2)
    snmf.fit_step(planted_data().sample(256)[0])
    assert snmf.fit_gram.any() and "fit_gram" in snmf.state_dict()
    assert sorted(snmf.export_tensors()) == ["W_dec", "b_dec"]
    snmf.save_pretrained(tmp_path)
    loaded = load_dictionary(tmp_path)
    assert isinstance(loaded, SemiNMF) and not loaded.fit_gram.any()
    assert float(loaded.fit_fresh) == 0  # fitted features: a next fit_step does not restart them
    x = torch.randn(8, 32)
    torch.testing.assert_close(loaded.encode(x), snmf.encode(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(d_out=6, apply_b_dec_to_input=False), "no transcoder form"),
        (dict(skip_connection=True), "no transcoder form"),
        (dict(apply_b_dec_to_input=False), "keep apply_b_dec_to_input=true"),
        (dict(neuron_fraction=0.0), "neuron_fraction must be in \\(0, 1\\]"),
        (dict(code_iterations=0), "code_iterations must be >= 1"),
        (dict(stat_decay=1.5), "stat_decay must be in \\[0, 1\\]"),
        (dict(k=17), "k must be an integer in \\[1, d_latent=16\\]"),
    ],
)
def test_bad_settings_get_a_clear_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        create_dictionary("snmf", d_in=8, d_latent=16, **kwargs)


def test_feature_store_shows_snmf_features_like_any_dictionary(tmp_path, monkeypatch):
    backbone, _, corpus = builder_helpers.tiny_setup()
    # Fitted as the paper does: on one matrix of the corpus's MLP activations in memory.
    contexts = iter_contexts(corpus.documents(), backbone.tokenizer, corpus.context_size)
    _, ids, mask = next(batch_contexts(contexts, 8))
    acts = backbone.capture({"input_ids": ids, "attention_mask": mask}, MLP_HIDDEN)[MLP_HIDDEN]
    rows = acts.reshape(-1, acts.shape[-1])[mask.reshape(-1).bool()]
    snmf = create_dictionary("snmf", d_in=64, d_latent=12, k=3)
    snmf.fit_step(rows)
    snmf.fit_full_batch(rows, iterations=20)
    settings = FeatureSettings(top_k=3, window=4, quantile_bins=2, per_quantile=1, correlated=3)
    out = tmp_path / "store"
    build_feature_store(
        snmf, backbone, corpus, out, site=MLP_HIDDEN, settings=settings, progress=False
    )
    store = read_store(out)
    monkeypatch.setattr(builder_helpers, "SITE", MLP_HIDDEN)  # the dense reference, same site
    dense = builder_helpers.dense_pass(backbone, snmf, corpus)
    # Inputs: each feature's firing counts, maxima and top example are its positive codes.
    assert torch.equal(store["stats"]["count"], (dense.codes > 0).sum(0))
    torch.testing.assert_close(store["stats"]["max_activation"], dense.codes.max(0).values)
    best = int(dense.codes.sum(0).argmax())
    top_row = int(dense.codes[:, best].argmax())
    assert int(store["contexts"]["top_source"][best, 0]) == int(dense.source[top_row])
    # Neurons: the feature's row over the 64 MLP neurons, largest weights first.
    neurons, weights = snmf.top_neurons(best, n=5)
    assert neurons.shape == (5,) and bool((neurons < 64).all())
    assert float(weights.abs().min()) >= float(snmf.W_dec[best].abs().sort().values[-5])
