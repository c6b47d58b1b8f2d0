"""Tests of the torchmetrics metrics against plain-torch float64 references, and under DDP."""

from __future__ import annotations

import datetime
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_interp.metrics import (
    L0,
    DeadLatentFraction,
    DenseLatentFraction,
    FractionOfVarianceUnexplained,
    ReconstructionExplainedVariance,
)
from lightning_interp.metrics.functional import fraction_of_variance_unexplained

D = 8


# ---------------------------------------------------------------------- references
def reference_fvu(reconstruction: torch.Tensor, target: torch.Tensor) -> float:
    x = target.double().reshape(-1, target.shape[-1])
    xh = reconstruction.double().reshape(-1, target.shape[-1])
    return float((x - xh).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def reference_l0(codes: torch.Tensor) -> float:
    flat = codes.reshape(-1, codes.shape[-1])
    return float((flat != 0).double().sum(-1).mean())


def reference_frequencies(codes: torch.Tensor) -> torch.Tensor:
    flat = codes.reshape(-1, codes.shape[-1])
    return (flat != 0).double().mean(0)


def noisy_pair(n: int, d: int = D, *, offset: float = 3.0, noise: float = 0.5, seed: int = 0):
    """Targets with a non-zero mean and a reconstruction with some error."""
    generator = torch.Generator().manual_seed(seed)
    target = torch.randn(n, d, generator=generator) * torch.linspace(0.5, 2.0, d) + offset
    reconstruction = target + noise * torch.randn(n, d, generator=generator)
    return reconstruction, target


def sparse_codes(n: int, d_latent: int, p: float = 0.2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, d_latent, generator=generator) < p
    return torch.randn(n, d_latent, generator=generator) * mask


# ---------------------------------------------------------------------- FVU
@pytest.mark.parametrize("num_features", [None, D])
def test_fvu_over_uneven_batches_matches_pooled_reference(num_features):
    reconstruction, target = noisy_pair(100)
    metric = FractionOfVarianceUnexplained(num_features=num_features)
    for lo, hi in [(0, 7), (7, 40), (40, 41), (41, 100)]:
        metric.update(reconstruction[lo:hi], target[lo:hi])
    expected = reference_fvu(reconstruction, target)
    assert float(metric.compute()) == pytest.approx(expected, rel=1e-6)
    # Not the mean of per-batch FVUs: pooling is what makes it well defined.
    assert 0.0 < expected < 1.0


def test_fvu_pooled_value_differs_from_mean_of_batch_values():
    reconstruction, target = noisy_pair(60)
    target[:30] *= 10  # the first half has far more variance than the second
    reconstruction = target + 0.5 * torch.randn_like(target)
    metric = FractionOfVarianceUnexplained(num_features=D)
    batch_values = []
    for rows in (slice(0, 30), slice(30, 60)):
        # forward() returns the batch's own FVU and accumulates the pooled state.
        batch_values.append(float(metric(reconstruction[rows], target[rows])))
        expected = reference_fvu(reconstruction[rows], target[rows])
        assert batch_values[-1] == pytest.approx(expected, rel=1e-6)
    pooled = float(metric.compute())
    assert pooled == pytest.approx(reference_fvu(reconstruction, target), rel=1e-6)
    assert pooled != pytest.approx(sum(batch_values) / 2, rel=1e-2)


@pytest.mark.parametrize("num_features", [None, D])
def test_fvu_of_perfect_reconstruction_is_zero(num_features):
    _, target = noisy_pair(50)
    metric = FractionOfVarianceUnexplained(num_features=num_features)
    metric.update(target[:20], target[:20])
    metric.update(target[20:], target[20:])
    assert float(metric.compute()) == 0.0


@pytest.mark.parametrize("offset", [0.0, 5.0])
def test_fvu_of_predicting_the_mean_is_one(offset):
    _, target = noisy_pair(80, offset=offset)
    mean = target.double().mean(0).float().expand_as(target)
    metric = FractionOfVarianceUnexplained(num_features=D)
    metric.update(mean[:33], target[:33])
    metric.update(mean[33:], target[33:])
    assert float(metric.compute()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("num_features", [None, D])
def test_fvu_flattens_3d_inputs(num_features):
    reconstruction, target = noisy_pair(4 * 5 + 3 * 5)
    first = (reconstruction[:20].reshape(4, 5, D), target[:20].reshape(4, 5, D))
    second = (reconstruction[20:].reshape(3, 5, D), target[20:].reshape(3, 5, D))
    metric = FractionOfVarianceUnexplained(num_features=num_features)
    metric.update(*first)
    metric.update(*second)
    assert float(metric.compute()) == pytest.approx(reference_fvu(reconstruction, target), rel=1e-6)
    assert int(metric.count) == 35


def test_fvu_accepts_bf16_and_accumulates_in_float64():
    reconstruction, target = noisy_pair(512, offset=2.0, noise=0.3)
    fp32 = FractionOfVarianceUnexplained(num_features=D)
    bf16 = FractionOfVarianceUnexplained(num_features=D)
    for chunk in range(4):
        rows = slice(128 * chunk, 128 * (chunk + 1))
        fp32.update(reconstruction[rows], target[rows])
        bf16.update(reconstruction[rows].bfloat16(), target[rows].bfloat16())
    for state in ("squared_error", "target_sum", "target_sq_sum", "count"):
        assert getattr(bf16, state).dtype == torch.float64
    # Exact on the bf16-rounded values; close to the fp32 answer (bf16 rounding only).
    expected_bf16 = reference_fvu(reconstruction.bfloat16(), target.bfloat16())
    assert float(bf16.compute()) == pytest.approx(expected_bf16, rel=1e-6)
    assert float(bf16.compute()) == pytest.approx(float(fp32.compute()), rel=2e-2)


def test_fvu_is_precise_with_a_large_mean():
    # Variance is 1e-6 of the raw second moment: a float32 accumulator loses it.
    generator = torch.Generator().manual_seed(1)
    target = 1000.0 + torch.randn(4096, D, generator=generator)
    reconstruction = target + 0.1 * torch.randn(4096, D, generator=generator)
    metric = FractionOfVarianceUnexplained(num_features=D)
    for t, r in zip(target.split(1000), reconstruction.split(1000), strict=True):
        metric.update(r, t)
    assert float(metric.compute()) == pytest.approx(reference_fvu(reconstruction, target), rel=1e-5)


# A mean 1000x the spread in float32 (float64 sums keep the variance), and bf16 inputs.
@pytest.mark.parametrize(("dtype", "offset"), [(torch.float32, 1000.0), (torch.bfloat16, 3.0)])
def test_functional_fvu_is_the_metric_on_one_batch(dtype, offset):
    reconstruction, target = noisy_pair(3 * 7, offset=offset)
    reconstruction = reconstruction.reshape(3, 7, D).to(dtype)
    target = target.reshape(3, 7, D).to(dtype)
    value = fraction_of_variance_unexplained(reconstruction, target)
    assert value.dtype == torch.float32 and value.shape == ()
    assert float(value) == pytest.approx(reference_fvu(reconstruction, target), rel=1e-5)
    # The class accumulates the functional's own statistics: the same numbers, bit for bit.
    for num_features in (None, D):
        metric = FractionOfVarianceUnexplained(num_features=num_features)
        assert torch.equal(metric(reconstruction, target), value)


def test_functional_fvu_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        fraction_of_variance_unexplained(torch.zeros(4, D), torch.zeros(4, D + 1))
    with pytest.raises(ValueError, match="at least one dimension"):
        fraction_of_variance_unexplained(torch.zeros(()), torch.zeros(()))


@pytest.mark.parametrize("num_features", [None, D])
def test_explained_variance_is_one_minus_fvu(num_features):
    reconstruction, target = noisy_pair(90, noise=0.8)
    fvu = FractionOfVarianceUnexplained(num_features=num_features)
    explained = ReconstructionExplainedVariance(num_features=num_features)
    for lo, hi in [(0, 25), (25, 90)]:
        fvu.update(reconstruction[lo:hi], target[lo:hi])
        explained.update(reconstruction[lo:hi], target[lo:hi])
    assert float(explained.compute()) == pytest.approx(1.0 - float(fvu.compute()), abs=1e-6)
    assert float(explained.compute()) == pytest.approx(
        1.0 - reference_fvu(reconstruction, target), abs=1e-6
    )
    assert explained.higher_is_better is True and fvu.higher_is_better is False


@pytest.mark.parametrize("num_features", [None, D])
def test_fvu_reset_clears_state(num_features):
    old_reconstruction, old_target = noisy_pair(40, noise=2.0, seed=1)
    reconstruction, target = noisy_pair(30, noise=0.2, seed=2)
    metric = FractionOfVarianceUnexplained(num_features=num_features)
    metric.update(old_reconstruction, old_target)
    metric.reset()
    assert float(metric.squared_error) == 0.0 and float(metric.count) == 0.0
    # An unknown width resets to a 0-d zero that broadcasts on the next update.
    assert metric.target_sum.shape == ((num_features,) if num_features else ())
    assert not metric.target_sum.any() and not metric.target_sq_sum.any()
    metric.update(reconstruction, target)
    assert float(metric.compute()) == pytest.approx(reference_fvu(reconstruction, target), rel=1e-6)


def test_fvu_shape_mismatch_raises_value_error():
    metric = FractionOfVarianceUnexplained()
    with pytest.raises(ValueError, match="same shape"):
        metric.update(torch.randn(4, D), torch.randn(4, D + 1))
    with pytest.raises(ValueError, match="same shape"):
        metric.update(torch.randn(4, 2, D), torch.randn(8, D))


def test_fvu_width_other_than_num_features_raises_value_error():
    metric = FractionOfVarianceUnexplained(num_features=D)
    with pytest.raises(ValueError):
        metric.update(torch.randn(16, 1), torch.randn(16, 1))


def test_fvu_forward_without_num_features():
    reconstruction, target = noisy_pair(20)
    metric = FractionOfVarianceUnexplained()
    value = metric(reconstruction, target)
    assert float(value) == pytest.approx(reference_fvu(reconstruction, target), rel=1e-6)


# ---------------------------------------------------------------------- L0
def test_l0_on_known_codes():
    codes = torch.tensor(
        [
            [0.0, 1.0, 2.0, 0.0],
            [0.0, 0.0, 0.0, 0.0],
            [-1.0, 0.5, 0.0, 3.0],  # negative values are active too
        ]
    )
    metric = L0()
    metric.update(codes)
    assert float(metric.compute()) == pytest.approx(5 / 3)
    metric.update(torch.ones(1, 4))
    assert float(metric.compute()) == pytest.approx(9 / 4)


def test_l0_over_batches_and_3d_codes_matches_reference():
    codes = sparse_codes(60, 32, p=0.15)
    metric = L0()
    metric.update(codes[:12].reshape(3, 4, 32))
    metric.update(codes[12:])
    assert float(metric.compute()) == pytest.approx(reference_l0(codes), rel=1e-6)
    metric.reset()
    assert float(metric.active) == 0.0 and float(metric.rows) == 0.0
    metric.update(torch.zeros(5, 32))
    assert float(metric.compute()) == 0.0


# ---------------------------------------------------------------------- dead / dense
def test_dead_fraction_counts_latents_that_never_fire():
    d_latent = 20
    dead = [0, 3, 7, 19]
    codes = torch.randn(50, d_latent) + 10.0  # every entry non-zero
    codes[:, dead] = 0.0
    metric = DeadLatentFraction(d_latent)
    metric.update(codes[:10])
    metric.update(codes[10:].reshape(4, 10, d_latent))
    assert float(metric.compute()) == pytest.approx(len(dead) / d_latent)


def test_dead_fraction_window_spans_batches_until_reset():
    d_latent = 10
    first = torch.zeros(8, d_latent)
    first[:, :4] = 1.0
    second = torch.zeros(8, d_latent)
    second[3, 4:6] = 2.0  # latents 4 and 5 fire once, in the second batch only
    metric = DeadLatentFraction(d_latent)
    metric.update(first)
    assert float(metric.compute()) == pytest.approx(0.6)
    metric.update(second)
    assert float(metric.compute()) == pytest.approx(0.4)
    metric.reset()
    metric.update(second)
    assert float(metric.compute()) == pytest.approx(0.8)


def test_dense_fraction_uses_a_strict_threshold():
    d_latent, rows = 5, 100
    # Latent j fires on the first `fires[j]` rows.
    fires = [0, 5, 10, 11, 100]
    codes = torch.zeros(rows, d_latent)
    for j, count in enumerate(fires):
        codes[:count, j] = 1.0
    metric = DenseLatentFraction(d_latent, threshold=0.1)
    metric.update(codes[:37])
    metric.update(codes[37:])
    # Frequencies 0, .05, .10, .11, 1.0: only the last two are above 0.1.
    assert float(metric.compute()) == pytest.approx(2 / 5)
    assert torch.allclose(metric.frequencies(), reference_frequencies(codes))
    looser = DenseLatentFraction(d_latent, threshold=0.04)
    looser.update(codes)
    assert float(looser.compute()) == pytest.approx(4 / 5)


def test_dense_fraction_matches_reference_on_random_codes():
    d_latent = 64
    generator = torch.Generator().manual_seed(3)
    p = torch.linspace(0.0, 0.5, d_latent)
    codes = (torch.rand(400, d_latent, generator=generator) < p).float()
    metric = DenseLatentFraction(d_latent, threshold=0.2)
    for chunk in codes.split(150):
        metric.update(chunk)
    expected = float((reference_frequencies(codes) > 0.2).double().mean())
    assert float(metric.compute()) == pytest.approx(expected)


@pytest.mark.parametrize("metric_class", [DeadLatentFraction, DenseLatentFraction])
def test_firing_metrics_reject_wrong_width(metric_class):
    metric = metric_class(16)
    with pytest.raises(ValueError, match="last dimension 16"):
        metric.update(torch.ones(4, 15))
    with pytest.raises(ValueError):
        metric_class(0)


@pytest.mark.parametrize("threshold", [-0.1, 1.5])
def test_dense_fraction_rejects_threshold_outside_unit_interval(threshold):
    with pytest.raises(ValueError, match="threshold"):
        DenseLatentFraction(8, threshold=threshold)


# ---------------------------------------------------------------------- DDP
DDP_ROWS = 100
DDP_SPLIT = 37  # rank 0 gets rows [0, 37), rank 1 rows [37, 100): uneven on purpose
DDP_LATENT = 24
DDP_DENSE_THRESHOLD = 0.4


def ddp_data() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    reconstruction, target = noisy_pair(DDP_ROWS, seed=5)
    codes = sparse_codes(DDP_ROWS, DDP_LATENT, p=0.1, seed=6)
    codes[:, 0:3] = 0.0  # dead everywhere
    codes[:DDP_SPLIT, 3:6] = 0.0  # fire only on rank 1: dead on rank 0 alone
    codes[DDP_SPLIT:, 6:9] = 0.0
    codes[:DDP_SPLIT, 6:9] = 1.0  # every rank-0 row: dense on rank 0 alone, not overall
    codes[:, 9] = 1.0  # dense everywhere
    return {"reconstruction": reconstruction, "target": target, "codes": codes}


def build_metrics() -> dict[str, torch.nn.Module]:
    return {
        "fvu": FractionOfVarianceUnexplained(num_features=D),
        "fvu_lazy_width": FractionOfVarianceUnexplained(),
        "fvu_rank0_only": FractionOfVarianceUnexplained(num_features=D),
        "explained_variance": ReconstructionExplainedVariance(num_features=D),
        "l0": L0(),
        "dead": DeadLatentFraction(DDP_LATENT),
        "dense": DenseLatentFraction(DDP_LATENT, threshold=DDP_DENSE_THRESHOLD),
    }


def feed(metrics, data: dict[str, torch.Tensor], rows: slice, batch_size: int, rank: int) -> None:
    reconstruction, target, codes = (data[k][rows] for k in ("reconstruction", "target", "codes"))
    for r, t, c in zip(
        reconstruction.split(batch_size),
        target.split(batch_size),
        codes.split(batch_size),
        strict=True,
    ):
        for name in ("fvu", "fvu_lazy_width", "explained_variance"):
            metrics[name].update(r, t)
        if rank == 0:
            metrics["fvu_rank0_only"].update(r, t)
        for name in ("l0", "dead", "dense"):
            metrics[name].update(c)


def ddp_worker(rank: int, world_size: int, port: int, data_path: str, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        data = torch.load(data_path)
        metrics = build_metrics()
        rows = slice(0, DDP_SPLIT) if rank == 0 else slice(DDP_SPLIT, DDP_ROWS)
        feed(metrics, data, rows, batch_size=16 if rank == 0 else 25, rank=rank)
        # compute() gathers and sums the states of both ranks (same order on every rank).
        results = {name: float(metric.compute()) for name, metric in metrics.items()}
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_metrics_sync_across_two_ddp_processes(tmp_path):
    data = ddp_data()
    data_path, out_path = str(tmp_path / "data.pt"), str(tmp_path / "results.json")
    torch.save(data, data_path)

    mp.spawn(ddp_worker, args=(2, free_port(), data_path, out_path), nprocs=2, join=True)
    assert os.path.exists(out_path)
    with open(out_path) as f:
        results = json.load(f)

    single = build_metrics()
    feed(single, data, slice(0, DDP_ROWS), batch_size=DDP_ROWS, rank=1)
    single["fvu_rank0_only"].update(data["reconstruction"][:DDP_SPLIT], data["target"][:DDP_SPLIT])
    expected = {name: float(metric.compute()) for name, metric in single.items()}
    for name, value in expected.items():
        assert results[name] == pytest.approx(value, rel=1e-6, abs=1e-7), name

    # Against the plain-torch references, too, so a sync that double counts cannot pass.
    rec, target, codes = data["reconstruction"], data["target"], data["codes"]
    assert results["fvu"] == pytest.approx(reference_fvu(rec, target), rel=1e-6)
    assert results["fvu_rank0_only"] == pytest.approx(
        reference_fvu(rec[:DDP_SPLIT], target[:DDP_SPLIT]), rel=1e-6
    )
    assert results["l0"] == pytest.approx(reference_l0(codes), rel=1e-6)
    frequencies = reference_frequencies(codes)
    assert results["dead"] == pytest.approx(float((frequencies == 0).double().mean()))
    assert results["dead"] == pytest.approx(3 / DDP_LATENT)  # 3..5 revived by rank 1
    assert results["dense"] == pytest.approx(
        float((frequencies > DDP_DENSE_THRESHOLD).double().mean())
    )
    assert results["dense"] == pytest.approx(1 / DDP_LATENT)  # only latent 9 overall
