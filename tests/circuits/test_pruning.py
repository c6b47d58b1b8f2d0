"""Influence, pruning and graph scores on hand-built graphs (circuit-tracer's definitions)."""

from __future__ import annotations

import pytest
import torch

from lightning_interp.circuits.pruning import (
    edge_scores,
    find_threshold,
    graph_scores,
    influence,
    logit_weights,
    node_influence,
    normalize_adjacency,
    prune_graph,
)
from lightning_interp.errors import ConfigError, InvalidGraphError
from tests.circuits.graph_builders import make_graph, random_graph


def brute_force_influence(graph) -> list[float]:
    """Sum, over every path from a node to a logit, of the product of normalised weights."""
    a = normalize_adjacency(graph.adjacency).tolist()
    n = len(graph.nodes)
    weights = logit_weights(graph).tolist()

    def paths_from(node: int) -> float:  # sum over paths node -> ... -> end of weight(end)*prod
        return sum(a[t][node] * (weights[t] + paths_from(t)) for t in range(n) if a[t][node])

    return [paths_from(i) for i in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_influence_equals_the_sum_over_enumerated_paths(seed):
    graph = random_graph(seed)
    expected = torch.tensor(brute_force_influence(graph), dtype=torch.float64)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(node_influence(graph), expected, rtol=1e-10, atol=1e-12)


def test_influence_equals_the_inverse_series():
    graph = random_graph(3)
    a = normalize_adjacency(graph.adjacency)
    w = logit_weights(graph)
    closed_form = w @ (torch.linalg.inv(torch.eye(len(w), dtype=a.dtype) - a) - torch.eye(len(w)))
    torch.testing.assert_close(influence(a, w), closed_form, rtol=1e-9, atol=1e-12)


def test_a_cycle_is_refused():
    graph = make_graph(["a"], 2, [(0, 0, 1, 1.0), (1, 0, 2, 1.0)], [(5, 1.0)], {})
    graph.adjacency[0, 1] = graph.adjacency[1, 0] = 1.0
    graph.adjacency[-1, 1] = 1.0
    with pytest.raises(InvalidGraphError, match="cycle"):
        node_influence(graph)


def two_branches():
    """emb0 -> f0 (strong) -> logit, emb0 -> f1 (weak) -> logit: influences 1, .9, .1."""
    edges = {("emb0", "f0"): 2.0, ("emb0", "f1"): -0.5, ("f0", "logit0"): 9.0}
    edges[("f1", "logit0")] = -1.0
    return make_graph(["x"], 2, [(0, 0, 3, 1.5), (1, 0, 4, 0.2)], [(7, 1.0)], edges)


def test_the_weak_branch_is_pruned_by_hand_computation():
    graph = two_branches()
    torch.testing.assert_close(
        node_influence(graph)[:2], torch.tensor([0.9, 0.1], dtype=torch.float64)
    )
    # Sorted influence: emb0 1.0, f0 0.9, f1 0.1 of 2.0: cumulative .5, .95, 1.0.
    pruned = prune_graph(graph, node_threshold=0.8)
    kept = [graph.nodes[i] for i in pruned.kept()]
    assert [n.kind for n in kept] == ["feature", "embedding", "logit"]
    assert kept[0].index == 3
    torch.testing.assert_close(pruned.cumulative_influence[:2], torch.tensor([0.95, 1.0]).double())
    # With every node wanted, the weak one stays.
    assert graph.nodes[1] in [graph.nodes[i] for i in prune_graph(graph, 1.0, 1.0).kept()]


@pytest.mark.parametrize("seed", [0, 1, 4])
@pytest.mark.parametrize("fraction", [0.5, 0.8, 0.95])
def test_node_pruning_keeps_the_fraction_and_is_minimal(seed, fraction):
    graph = random_graph(seed, n_features=10)
    pruned = prune_graph(graph, node_threshold=fraction)
    scores = pruned.influence
    total = scores.sum()
    chosen = pruned.selected_by_influence
    assert scores[chosen].sum() >= fraction * total * (1 - 1e-9)
    # Minimal: without its least influential chosen node the share falls below the fraction
    # (ties at the threshold go in together, so drop the whole tied group).
    least = scores[chosen].min()
    assert scores[chosen & (scores > least)].sum() < fraction * total


@pytest.mark.parametrize("seed", [0, 2, 5])
def test_edge_pruning_keeps_the_fraction_and_leaves_no_stranded_node(seed):
    graph = random_graph(seed, n_features=10)
    pruned = prune_graph(graph, node_threshold=0.9, edge_threshold=0.9)
    selected = pruned.selected_by_influence | torch.tensor(
        [n.kind in ("embedding", "logit") for n in graph.nodes]
    )
    restricted = graph.adjacency * (selected[:, None] & selected[None, :])
    scores = edge_scores(restricted, logit_weights(graph))
    chosen = scores >= find_threshold(scores, 0.9)
    assert scores[chosen].sum() >= 0.9 * scores.sum() * (1 - 1e-9)
    assert scores[chosen & (scores > scores[chosen].min())].sum() < 0.9 * scores.sum()
    # Kept edges join kept nodes and are real entries; the final masks are consistent.
    mask, edges = pruned.node_mask, pruned.edge_mask
    assert not edges[~mask].any() and not edges[:, ~mask].any()
    assert (graph.adjacency[edges] != 0).all()
    kinds = [n.kind for n in graph.nodes]
    for i, kind in enumerate(kinds):
        if kind in ("embedding", "logit"):
            assert mask[i]
        elif mask[i]:
            assert edges[:, i].any(), f"kept {kind} {i} has no kept output"
            if kind == "feature":
                assert edges[i].any(), f"kept feature {i} has no kept input"


def test_subgraph_holds_the_kept_nodes_and_edges():
    graph = random_graph(1, n_features=10)
    pruned = prune_graph(graph, 0.7, 0.9)
    sub = pruned.subgraph()
    kept = pruned.kept()
    assert sub.nodes == [graph.nodes[i] for i in kept]
    assert sub.adjacency.shape == (len(kept), len(kept))
    assert int((sub.adjacency != 0).sum()) == int(pruned.edge_mask.sum())
    assert sub.meta["pruning"]["kept"] == kept and sub.meta["logit_tokens"] == ["tok7", "tok9"]


def test_bad_thresholds_and_shapes_are_typed_errors():
    graph = two_branches()
    with pytest.raises(ConfigError, match="node_threshold"):
        prune_graph(graph, node_threshold=1.5)
    with pytest.raises(ConfigError, match="edge_threshold"):
        prune_graph(graph, edge_threshold=-0.1)
    graph.adjacency = graph.adjacency[:-1]
    with pytest.raises(InvalidGraphError, match="shape"):
        prune_graph(graph)


def error_graph(error_weight: float):
    """emb0 -> f0 (1.0) -> logit (3.0); err0.0 -> logit (error_weight)."""
    edges = {("emb0", "f0"): 1.0, ("f0", "logit0"): 3.0, ("err0.0", "logit0"): error_weight}
    return make_graph(["x"], 1, [(0, 0, 0, 1.0)], [(7, 1.0)], edges)


def test_scores_are_one_without_error_edges():
    assert graph_scores(error_graph(0.0)) == pytest.approx((1.0, 1.0), abs=1e-12)
    graph = random_graph(2)
    errors = graph.indices("error")
    graph.adjacency[:, errors] = 0
    assert graph_scores(graph) == pytest.approx((1.0, 1.0), abs=1e-12)


def test_scores_match_hand_computation_and_fall_as_errors_grow():
    # Logit row: f0 3/4, err 1/4. Influence: f0 .75, err .25, emb .75 (through f0).
    # Replacement .75 / (.75 + .25); completeness: rows' non-error shares (logit .75, rest 1)
    # weighted by influence + logit weight: (.75 + .25 + .75 + .75) / (.75 + .25 + .75 + 1).
    replacement, completeness = graph_scores(error_graph(-1.0))
    assert replacement == pytest.approx(0.75, abs=1e-12)
    assert completeness == pytest.approx(2.5 / 2.75, abs=1e-12)
    scores = [graph_scores(error_graph(w)) for w in (0.1, 0.5, 2.0, 10.0)]
    assert all(a[0] > b[0] and a[1] > b[1] for a, b in zip(scores, scores[1:], strict=False))


def test_at_edge_threshold_one_only_real_edges_are_kept():
    # circuit-tracer's mask would admit every zero entry here (threshold = smallest score 0).
    graph = random_graph(6)
    pruned = prune_graph(graph, 1.0, 1.0)
    assert pruned.edge_mask.any()
    assert (graph.adjacency[pruned.edge_mask] != 0).all()
    kept = pruned.node_mask
    real = (graph.adjacency != 0) & kept[:, None] & kept[None, :]
    assert torch.equal(pruned.edge_mask, real)
