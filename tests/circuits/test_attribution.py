"""Attribution graphs: completeness, causal structure, linearity, node selection."""

from __future__ import annotations

import pytest
import torch

from lightning_interp.circuits.attribution import attribute, salient_logits
from lightning_interp.errors import ConfigError
from tests.circuits import _tiny

IDS = torch.tensor([3, 7, 1, 9, 4, 2])


def _setup(family: str, exact: bool):
    model = getattr(_tiny, family)()
    tcs = _tiny.exact_transcoders(model) if exact else _tiny.random_transcoders()
    rm = _tiny.replacement(model, tcs)
    return rm, rm.run(IDS)


def _check_completeness(rm, run, graph):
    """Edge sums plus the source-free (bias) term equal each target's value."""
    free_logits, free_mlp_in = _tiny.source_free(rm, run)
    for row in graph.indices("logit"):
        tok = graph.nodes[row].index
        value = run.logits[-1, tok] - run.logits[-1].mean()
        bias = free_logits[-1, tok] - free_logits[-1].mean()
        torch.testing.assert_close(graph.adjacency[row].sum() + bias, value, atol=1e-4, rtol=1e-4)
    features = graph.indices("feature")
    assert features
    for row in features:
        node = graph.nodes[row]
        pre = rm.pre_activations(node.layer, run.mlp_in[node.layer][node.position])[node.index]
        bias = rm.pre_activations(node.layer, free_mlp_in[node.layer][node.position])[node.index]
        torch.testing.assert_close(graph.adjacency[row].sum() + bias, pre, atol=1e-4, rtol=1e-4)


def test_exact_transcoders_zero_errors_and_completeness():
    rm, run = _setup("gpt2", exact=True)
    graph = attribute(rm, IDS, batch_size=16)
    errors = graph.indices("error")
    assert graph.adjacency[:, errors].abs().max() < 1e-5
    _check_completeness(rm, run, graph)
    assert graph.adjacency[graph.indices("logit")].abs().max() > 1e-2


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_imperfect_transcoders_balance_through_error_nodes(family):
    rm, run = _setup(family, exact=False)
    graph = attribute(rm, IDS, batch_size=16)
    assert graph.adjacency[:, graph.indices("error")].abs().max() > 1e-4
    _check_completeness(rm, run, graph)
    assert graph.meta["backbone"] and graph.meta["transcoders"] == "PerLayerTranscoders"
    assert len(graph.indices("embedding")) == len(IDS) == len(graph.tokens)


def _rank(node, n_layers):
    if node.kind == "embedding":
        return 0
    if node.kind == "logit":
        return n_layers + 1
    return node.layer + 1


def test_edges_run_forward_in_causal_order():
    rm, _ = _setup("llama", exact=False)
    graph = attribute(rm, IDS, batch_size=16)
    rank = torch.tensor([_rank(n, graph.n_layers) for n in graph.nodes])
    pos = torch.tensor([n.position for n in graph.nodes])
    allowed = (rank[None, :] < rank[:, None]) & (pos[None, :] <= pos[:, None])
    assert graph.adjacency[~allowed].abs().max() == 0
    # Features-then-errors-then-embeddings-then-logits is a topological order per kind:
    feature_rows = graph.indices("feature")
    block = graph.adjacency[feature_rows][:, feature_rows]
    assert torch.equal(block, block.tril(-1))


def test_edge_equals_the_frozen_model_response_to_one_source():
    """Doubling one feature's write changes each target by its edge (the model is affine)."""
    rm, run = _setup("gpt2", exact=False)
    graph = attribute(rm, IDS, batch_size=16)
    source = next(i for i in graph.indices("feature") if graph.nodes[i].layer == 0)
    node = graph.nodes[source]
    mlp_in: list = []

    def codes(layer, x):
        mlp_in.append(x[0])
        held = run.activations[layer].clone()
        if layer == node.layer:
            held[node.position, node.index] *= 2
        return held[None]

    logits = rm.forward(
        IDS,
        codes_fn=codes,
        error_fn=lambda layer, _o, _r: run.errors[layer][None],
        freeze=_tiny.replay(run),
    )[0]
    for row in graph.indices("logit"):
        tok = graph.nodes[row].index
        change = (logits[-1, tok] - logits[-1].mean()) - (
            run.logits[-1, tok] - run.logits[-1].mean()
        )
        torch.testing.assert_close(change, graph.adjacency[row, source], atol=1e-5, rtol=1e-3)
    for row in graph.indices("feature"):
        target = graph.nodes[row]
        if target.layer == 1:
            before = rm.pre_activations(1, run.mlp_in[1][target.position])[target.index]
            after = rm.pre_activations(1, mlp_in[1][target.position])[target.index]
            torch.testing.assert_close(
                after - before, graph.adjacency[row, source], atol=1e-5, rtol=1e-3
            )


def test_batch_size_does_not_change_the_graph():
    rm, _ = _setup("gpt2", exact=False)
    small, large = attribute(rm, IDS, batch_size=3), attribute(rm, IDS, batch_size=64)
    torch.testing.assert_close(small.adjacency, large.adjacency, atol=1e-6, rtol=1e-5)
    assert small.nodes == large.nodes


def test_max_feature_nodes_keeps_the_most_influential_subset():
    rm, _ = _setup("gpt2", exact=False)
    full = attribute(rm, IDS, batch_size=4)
    part = attribute(rm, IDS, batch_size=4, max_feature_nodes=5)
    kept = [n for n in part.nodes if n.kind == "feature"]
    assert len(kept) == 5 and part.meta["n_active_features"] == len(full.indices("feature"))
    columns = [full.nodes.index(n) for n in part.nodes[: -len(part.indices("logit"))]]
    torch.testing.assert_close(
        part.adjacency[part.indices("logit")][:, : len(columns)],
        full.adjacency[full.indices("logit")][:, columns],
    )
    keys = [(n.layer, n.position, n.index) for n in kept]
    assert keys == sorted(keys)


def test_salient_logits_stop_at_the_probability():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04]))
    ids, probs = salient_logits(logits, max_logits=10, logit_probability=0.75)
    assert ids.tolist() == [0, 1] and torch.allclose(probs, torch.tensor([0.5, 0.3]))
    assert salient_logits(logits, max_logits=1, logit_probability=0.99)[0].tolist() == [0]


def test_bad_arguments_are_refused():
    rm, _ = _setup("gpt2", exact=False)
    with pytest.raises(ConfigError, match="batch_size"):
        attribute(rm, IDS, batch_size=0)
