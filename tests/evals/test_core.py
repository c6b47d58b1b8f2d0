"""The core eval's statistics equal direct computations; the eval runs on a tiny backbone."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_interp import create_dictionary
from lightning_interp.evals.core import CoreStatistics, reconstruct
from lightning_interp.evals.core import run as run_core
from lightning_interp.evals.registry import EvalContext
from tests.features.builder_helpers import SITE, tiny_setup


def test_core_statistics_equal_direct_computations():
    torch.manual_seed(0)
    sae = create_dictionary("topk", d_in=16, d_latent=64, k=4)
    x = torch.randn(300, 16) * torch.linspace(0.5, 3, 16) + 1.0
    stats = CoreStatistics(64)
    for chunk in x.split(70):  # streamed in uneven batches
        stats.update(chunk, *reconstruct(sae, chunk))
    got = stats.compute()
    codes, x_hat = reconstruct(sae, x)
    x, x_hat = x.double(), x_hat.double()
    fvu = (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    density = (codes != 0).double().mean(0)
    expected = {
        "explained_variance": 1 - fvu,
        "mse": (x - x_hat).pow(2).mean(),
        "cossim": torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).mean(),
        "l2_ratio": (x_hat.norm(dim=-1) / x.norm(dim=-1)).mean(),
        "relative_reconstruction_bias": x_hat.norm(dim=-1).pow(2).mean()
        / (x * x_hat).sum(-1).mean(),
        "l0": torch.tensor(4.0),
        "l1": codes.double().sum(-1).mean(),
        "dead_fraction": (density == 0).double().mean(),
        "dense_fraction_10pct": (density > 0.1).double().mean(),
        "dense_fraction_1pct": (density > 0.01).double().mean(),
    }
    for key, value in expected.items():
        assert got[key] == pytest.approx(float(value), rel=1e-5, abs=1e-7), key
    histogram = got["density_histogram"]
    assert sum(histogram["counts"]) + histogram["dead"] == 64
    assert histogram["dead"] == int((density == 0).sum())
    assert got["tokens"] == 300


def test_relative_reconstruction_bias_reads_shrinkage():
    """A reconstruction scaled by 0.8 has bias 0.8 and L2 ratio 0.8 (SAEBench's meaning)."""
    x = torch.randn(50, 8, dtype=torch.float64)
    stats = CoreStatistics(4)
    stats.update(x, torch.ones(50, 4), 0.8 * x)
    got = stats.compute()
    assert got["relative_reconstruction_bias"] == pytest.approx(0.8)
    assert got["l2_ratio"] == pytest.approx(0.8)
    assert got["cossim"] == pytest.approx(1.0)


def test_core_eval_on_a_tiny_backbone_states_its_window():
    backbone, sae, corpus = tiny_setup()
    text_file = None
    context = EvalContext(sae, backbone, SITE, text="unused", context_size=16, tokens=100)
    # The corpus is passed as text through a file-less source: use load_texts' list path.
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        text_file = Path(folder) / "corpus.txt"
        text_file.write_text("\n".join(corpus.texts), encoding="utf-8")
        context.text = str(text_file)
        result = run_core(context, contexts_per_capture=4, ce_contexts=4)
    metrics, settings = result["metrics"], result["settings"]
    assert settings["token_window"] == metrics["tokens"] == 100
    assert settings["ce_kl_contexts"] == 4
    assert metrics["l0"] == pytest.approx(3.0)  # k = 3 on every kept token
    assert metrics["dead_fraction"] >= 2 / 48  # latents 0 and 1 can never fire
    for key in ("ce_loss_recovered", "kl_div_score", "explained_variance", "cossim"):
        assert math.isfinite(metrics[key]), key
