"""Sparse probing recovers a planted label direction; splits are balanced and seeded."""

from __future__ import annotations

import torch

from lightning_interp import create_dictionary
from lightning_interp.evals.core import reconstruct
from lightning_interp.evals.sparse_probing import evaluate_task, one_vs_rest, split


def _planted(seed: int = 0):
    """Pooled activations whose label lies along one direction ``u``, and ``u`` itself."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(240) % 2
    u = torch.nn.functional.normalize(torch.randn(16, generator=generator), dim=0)
    acts = torch.randn(240, 16, generator=generator) + 3.5 * labels[:, None] * u
    return acts, labels, u


def _dictionary(u: torch.Tensor | None):
    torch.manual_seed(1)
    sae = create_dictionary("topk", d_in=16, d_latent=32, k=4)
    if u is not None:
        with torch.no_grad():  # latent 7 reads (and writes) exactly the label direction
            sae.W_enc[:, 7] = 4 * u
            sae.b_enc[7] = 0
            sae.W_dec[7] = u
    return sae


def test_a_planted_label_latent_matches_the_dense_probe_at_k1():
    acts, labels, u = _planted()
    planted = evaluate_task(acts, reconstruct(_dictionary(u), acts)[0], labels, seed=0)
    assert planted["llm_test_accuracy"] > 0.85
    assert planted["sae_top_1_test_accuracy"] >= planted["llm_test_accuracy"] - 0.05
    # Without the planted latent no single latent carries the label.
    control = evaluate_task(acts, reconstruct(_dictionary(None), acts)[0], labels, seed=0)
    assert control["sae_top_1_test_accuracy"] < planted["sae_top_1_test_accuracy"] - 0.1
    assert set(planted) >= {f"sae_top_{k}_test_accuracy" for k in (1, 2, 5, 20)}


def test_one_vs_rest_is_balanced_and_draws_from_every_other_class():
    labels = torch.tensor([0] * 10 + [1] * 30 + [2] * 30)
    rows, y = one_vs_rest(labels, 0, torch.Generator().manual_seed(0))
    assert int(y.sum()) == 10 and len(y) == 20
    negatives = labels[rows[y == 0]]
    assert set(negatives.tolist()) == {1, 2}


def test_split_is_stratified_disjoint_and_seeded():
    labels = torch.tensor([0] * 20 + [1] * 10)
    train, test = split(labels, 0.3, seed=3)
    assert set(train.tolist()).isdisjoint(test.tolist())
    assert len(train) + len(test) == 30
    assert (labels[test] == 0).sum() == 6 and (labels[test] == 1).sum() == 3
    again = split(labels, 0.3, seed=3)
    assert torch.equal(again[0], train) and torch.equal(again[1], test)
