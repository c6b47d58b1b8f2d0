"""Matching-pursuit SAE: the pursuit's defining properties, SAELens's rule, and its format."""

import json

import pytest
import torch
from safetensors.torch import load_file

from lightning_interp import ConfigError, create_dictionary
from lightning_interp.dictionaries import MatchingPursuitSAE, Provenance
from lightning_interp.dictionaries.matching_pursuit import pursue
from lightning_interp.errors import UnsupportedFormatError
from lightning_interp.zoo.formats import read_folder, write_folder
from tests.zoo import foreign_layouts as fl

D, F = 12, 48


def mp(d_in=D, d_latent=F, *, unit=True, seed=0, **kwargs) -> MatchingPursuitSAE:
    """A float64 MP SAE with random atoms (unit rows unless ``unit=False``) and ``b_dec``."""
    torch.manual_seed(seed)
    sae = create_dictionary("mp", d_in=d_in, d_latent=d_latent, dtype="float64", **kwargs)
    with torch.no_grad():
        # Unit rows in float64 (initialised in float32): SAELens's rule takes them as unit.
        sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True))
        if not unit:  # norms from 0.5 to 2: the pursuit compares directions
            sae.W_dec.mul_(torch.rand(d_latent, 1, dtype=torch.float64) * 1.5 + 0.5)
        sae.b_dec.normal_(0, 0.3)
    return sae


def inputs(n=64, d=D, seed=1) -> torch.Tensor:
    return torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def saelens_pursuit(centred, w_dec, steps, threshold=0.0, duplicates=False):
    """SAELens's ``_encode_matching_pursuit`` (dense codes, autograd through every step)."""
    residual = centred
    acts = centred.new_zeros(centred.shape[0], w_dec.shape[0])
    previous = torch.zeros_like(acts, dtype=torch.bool)
    done = torch.zeros(centred.shape[0], dtype=torch.bool)
    for _ in range(steps):
        with torch.no_grad():
            picks = (residual @ w_dec.T).relu().max(dim=1, keepdim=True).indices
        selected = w_dec[picks.squeeze(1)]
        values = (residual * selected).sum(-1, keepdim=True).relu() * (~done)[:, None]
        acts = acts.scatter_add(1, picks, values)
        residual = residual - values * selected
        with torch.no_grad():
            support = acts != 0
            if duplicates:
                done = done | (support == previous).all(1)
                previous = support
            if threshold > 0:
                done = done | (residual.norm(dim=-1) < threshold)
            if done.all():
                break
    return acts


def along_atoms_removed(grad, w_dec):
    """The gradient without its component along each (unit) row, as training applies it."""
    return grad - (grad * w_dec).sum(1, keepdim=True) * w_dec


@pytest.mark.parametrize(
    "settings",
    [dict(k=6), dict(k=12, residual_threshold=1.0, stop_on_duplicate_support=True)],
    ids=["k-steps", "saelens-stopping"],
)
@pytest.mark.parametrize("sparse", [True, False])
def test_codes_and_gradients_follow_saelens(settings, sparse):
    sae = mp(**settings)
    sae.sparse_training = sparse
    x = inputs().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = sae.W_dec.detach().clone().requires_grad_(True)
    b_ref = sae.b_dec.detach().clone().requires_grad_(True)
    reference = saelens_pursuit(
        x_ref - b_ref,
        w_ref,
        settings["k"],
        settings.get("residual_threshold", 0.0),
        settings.get("stop_on_duplicate_support", False),
    )
    torch.testing.assert_close(sae.encode(x), reference, rtol=0, atol=1e-10)
    l0 = (reference != 0).sum(-1)
    if "residual_threshold" in settings:  # the stopping rules really stopped some rows
        assert int(l0.min()) < settings["k"]
    # The squared error in float64 (Dictionary.loss reduces in float32).
    (sae.forward_train(x).reconstruction - x).pow(2).sum(-1).mean().backward()
    (reference @ w_ref + b_ref - x_ref).pow(2).sum(-1).mean().backward()
    torch.testing.assert_close(sae.b_dec.grad, b_ref.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-10)
    w = sae.W_dec.detach()
    torch.testing.assert_close(
        along_atoms_removed(sae.W_dec.grad, w),
        along_atoms_removed(w_ref.grad, w),
        rtol=1e-9,
        atol=1e-10,
    )


def test_residual_norm_never_increases_over_the_steps():
    base = mp(unit=False, k=10)
    x = inputs()
    errors = []
    for steps in range(1, 11):
        sae = create_dictionary("mp", d_in=D, d_latent=F, dtype="float64", k=steps)
        sae.load_state_dict(base.state_dict())
        with torch.no_grad():
            errors.append((x - sae(x)).norm(dim=-1))
    errors = torch.stack(errors)  # [steps, rows]
    assert bool((errors[1:] <= errors[:-1] + 1e-12).all())
    assert float(errors[-1].mean()) < 0.5 * float(errors[0].mean())


def test_each_step_removes_its_coefficient_squared():
    torch.manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(F, D, dtype=torch.float64), dim=1)
    residual = inputs()
    indices, _ = pursue(residual, directions, 8)
    for t in range(8):
        atom = directions[indices[:, t]]
        step = (residual * atom).sum(-1).clamp_min(0)
        after = residual - step[:, None] * atom
        drop = residual.pow(2).sum(-1) - after.pow(2).sum(-1)
        torch.testing.assert_close(drop, step.square(), rtol=1e-9, atol=1e-12)
        # The pick is the atom with the largest inner product with the residual.
        torch.testing.assert_close(
            (residual @ directions.T).max(1).values, (residual * atom).sum(-1)
        )
        residual = after


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_orthonormal_dictionary_recovers_exact_sparse_codes(dtype, tolerance):
    generator = torch.Generator().manual_seed(0)
    rows = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64, generator=generator))[0]
    codes = torch.zeros(50, 16, dtype=torch.float64)
    for row in codes:  # 1 to 4 active latents of sizes 0.5..2
        active = torch.randperm(16, generator=generator)[: int(torch.randint(1, 5, ()))]
        row[active] = torch.rand(len(active), dtype=torch.float64, generator=generator) * 1.5 + 0.5
    sae = create_dictionary("mp", d_in=16, d_latent=16, k=4, dtype=dtype)
    bias = torch.randn(16, dtype=torch.float64, generator=generator)
    with torch.no_grad():
        sae.W_dec.copy_(rows.T)
        sae.b_dec.copy_(bias)
    x = (codes @ rows.T + bias).to(dtype)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), codes.to(dtype), rtol=0, atol=tolerance)
        torch.testing.assert_close(sae(x), x, rtol=0, atol=tolerance)


@pytest.mark.parametrize(
    "stopping", [{}, dict(residual_threshold=1.0, stop_on_duplicate_support=True)]
)
def test_gram_updates_equal_recomputed_correlations(stopping):
    recompute = mp(k=10, unit=False, **stopping)
    gram = mp(k=10, unit=False, **stopping)
    recompute.use_gram, gram.use_gram = False, True
    x = inputs(n=200)
    with torch.no_grad():
        torch.testing.assert_close(gram.encode(x), recompute.encode(x), rtol=0, atol=1e-10)
    directions = torch.nn.functional.normalize(recompute.W_dec.detach(), dim=1)
    centred = x - recompute.b_dec.detach()
    by_gram = pursue(centred, directions, 10, gram=directions @ directions.T, **stopping)
    by_matmul = pursue(centred, directions, 10, **stopping)
    for a, b in zip(by_gram, by_matmul, strict=True):
        assert torch.equal(a, b)


def test_the_inference_gram_cache_follows_the_weights():
    sae = mp(k=5).eval()
    sae.use_gram = True
    x = inputs()
    with torch.no_grad():
        sae.encode(x)
        assert sae._gram_cache is not None
        sae.W_dec.data[:4] = -sae.W_dec.data[:4]  # .data edits bypass the version counter
        fresh = mp(k=5)
        fresh.load_state_dict(sae.state_dict())
        fresh.use_gram = False
        torch.testing.assert_close(sae.encode(x), fresh.encode(x), rtol=0, atol=1e-10)
    assert sae.train()._gram_cache is None


def test_repeated_picks_add_up_and_the_sparse_path_merges_them():
    # Two atoms 0.6 rad apart in a plane and inputs between them: MP zig-zags between the
    # two (each residual is orthogonal to the last pick and leans towards the other). The
    # other atoms point out of the plane and are never picked.
    atoms = torch.zeros(8, 3, dtype=torch.float64)
    atoms[:2, 0], atoms[:2, 1] = torch.tensor([0.0, 0.6]).cos(), torch.tensor([0.0, 0.6]).sin()
    atoms[2:, 2] = -1.0
    sae = create_dictionary("mp", d_in=3, d_latent=8, k=6, dtype="float64")
    with torch.no_grad():
        sae.W_dec.copy_(atoms)
    theta = torch.linspace(0.1, 0.5, 16, dtype=torch.float64)
    x = torch.stack([theta.cos(), theta.sin(), torch.zeros_like(theta)], 1) * 3.0
    codes = sae.encode(x)
    assert bool(((codes != 0).sum(-1) == 2).all())  # six steps, two latents
    sparse = sae.encode_sparse(x)
    torch.testing.assert_close(sparse.to_dense(), codes.detach())
    assert bool((sparse.counts() == 2).all())
    out = sae.forward_train(x)
    assert out.indices is None and out.pattern.nnz == 2 * 16
    torch.testing.assert_close(out.codes, codes)
    sae.loss(x, out)["loss"].backward()
    sparse_grad = sae.W_dec.grad.clone()
    sae.zero_grad()
    sae.sparse_training = False
    sae.loss(x, sae.forward_train(x))["loss"].backward()
    torch.testing.assert_close(sparse_grad, sae.W_dec.grad, rtol=1e-9, atol=1e-12)


def test_a_transcoder_pursues_over_its_encoder_columns():
    tc = create_dictionary("mp", d_in=8, d_latent=32, d_out=6, k=1, apply_b_dec_to_input=False)
    assert not tc.tied and {n for n, _ in tc.named_parameters()} == {"W_enc", "W_dec", "b_dec"}
    x = torch.randn(20, 8)
    scores = x @ tc.W_enc / tc.W_enc.norm(dim=0)
    best = scores.argmax(-1)
    expected = torch.zeros(20, 32).scatter(
        1, best[:, None], (x @ tc.W_enc).gather(1, best[:, None])
    )
    torch.testing.assert_close(tc.encode(x), expected.clamp_min(0))
    tc.loss(x, tc.forward_train(x), target=torch.randn(20, 6))["loss"].backward()
    assert tc.W_enc.grad.abs().sum() > 0 and tc.W_dec.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="tied=True .*needs d_out == d_in"):
        create_dictionary(
            "mp", d_in=8, d_latent=32, d_out=6, k=1, tied=True, apply_b_dec_to_input=False
        )
    # Untied on an autoencoder starts tied: the same codes as the tied dictionary.
    torch.manual_seed(0)
    tied = create_dictionary("mp", d_in=8, d_latent=32, k=3)
    torch.manual_seed(0)
    untied = create_dictionary("mp", d_in=8, d_latent=32, k=3, tied=False)
    torch.testing.assert_close(untied.encode(x), tied.encode(x))


def test_config_and_api_errors_name_the_fix():
    with pytest.raises(ConfigError, match="residual_threshold must be a finite number >= 0"):
        create_dictionary("mp", d_in=4, d_latent=8, k=2, residual_threshold=-1.0)
    sae = create_dictionary("mp", d_in=4, d_latent=8, k=2)
    assert set(sae.export_tensors()) == {"W_dec", "b_dec"}  # tied, as SAELens saves it
    with pytest.raises(ConfigError, match="no pointwise activation.*call encode"):
        sae.activation(sae.encode_pre(torch.randn(3, 4)))


def test_folding_a_scale_moves_the_threshold_to_raw_units():
    sae = mp(k=12, residual_threshold=0.4, stop_on_duplicate_support=True)
    sae.config = sae.config.replace(provenance=Provenance(activation_scale=0.37))
    folded = sae.with_scale_folded()
    assert folded.config.residual_threshold == pytest.approx(0.4 / 0.37)
    x = 3.0 * inputs()
    with torch.no_grad():
        codes = sae.encode(0.37 * x)
        assert int((codes != 0).sum(-1).min()) < 12  # the threshold stopped some rows
        torch.testing.assert_close(folded.encode(x), codes, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- SAELens's format
def test_saelens_export_round_trips(tmp_path):
    sae = mp(d_in=8, d_latent=32, k=5, residual_threshold=0.2, stop_on_duplicate_support=True)
    write_folder(sae, tmp_path, format="saelens")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "matching_pursuit"
    assert (cfg["max_iterations"], cfg["residual_threshold"]) == (5, 0.2)
    assert cfg["stop_on_duplicate_support"] is True
    assert set(load_file(tmp_path / "sae_weights.safetensors")) == {"W_dec", "b_dec"}
    loaded = read_folder(tmp_path)
    assert isinstance(loaded, MatchingPursuitSAE) and loaded.config == sae.config
    x = inputs(d=8)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=0, atol=0)


@pytest.mark.parametrize("max_iterations", [5, None])
def test_reads_a_saelens_matching_pursuit_folder(tmp_path, max_iterations):
    torch.manual_seed(0)
    w_dec = torch.nn.functional.normalize(torch.randn(fl.F, fl.D), dim=1)
    tensors = {"W_dec": w_dec, "b_dec": torch.randn(fl.D) * 0.3}
    extra = {} if max_iterations is None else {"max_iterations": max_iterations}
    fl.write_saelens_v6(tmp_path, "matching_pursuit", tensors, **extra)
    sae = read_folder(tmp_path)
    steps = max_iterations or fl.D  # SAELens's default: d_in
    assert (sae.config.k, sae.config.residual_threshold) == (steps, 1e-2)
    assert sae.config.stop_on_duplicate_support
    x = torch.randn(40, fl.D)
    reference = saelens_pursuit(x - tensors["b_dec"], w_dec, steps, 1e-2, True)
    torch.testing.assert_close(sae.encode(x), reference, rtol=1e-5, atol=1e-5)


def test_saelens_refuses_what_its_pursuit_would_compute_differently(tmp_path):
    tensors = {"W_dec": torch.randn(fl.F, fl.D) * 3, "b_dec": torch.randn(fl.D)}
    fl.write_saelens_v6(tmp_path / "rows", "matching_pursuit", tensors)
    with pytest.raises(UnsupportedFormatError, match="unit-norm decoder rows"):
        read_folder(tmp_path / "rows")
    unused = {
        "W_dec": torch.nn.functional.normalize(tensors["W_dec"], dim=1),
        "b_dec": torch.ones(8),
    }
    fl.write_saelens_v6(tmp_path / "bias", "matching_pursuit", unused, apply_b_dec_to_input=False)
    assert not read_folder(tmp_path / "bias").b_dec.any()  # SAELens never adds it
    scaled = mp(d_in=8, d_latent=32, k=3)
    scaled.config = scaled.config.replace(provenance=Provenance(activation_scale=4.0))
    with pytest.raises(UnsupportedFormatError, match="unit-norm decoder rows.*format='native'"):
        write_folder(scaled, tmp_path / "scaled", format="saelens")
    uncentred = mp(d_in=8, d_latent=32, k=3, apply_b_dec_to_input=False)
    with pytest.raises(UnsupportedFormatError, match="non-zero b_dec"):
        write_folder(uncentred, tmp_path / "uncentred", format="saelens")
    transcoder = create_dictionary(
        "mp", d_in=8, d_latent=32, d_out=6, k=2, apply_b_dec_to_input=False
    )
    with pytest.raises(UnsupportedFormatError, match="no architecture for a mp dictionary"):
        write_folder(transcoder, tmp_path / "transcoder", format="saelens")
