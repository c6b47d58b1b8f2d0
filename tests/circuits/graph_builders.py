"""Hand-built attribution graphs with known structure, for the pruning/JSON/HTML tests."""

from __future__ import annotations

import torch

from lightning_interp.circuits.graph import AttributionGraph, GraphNode


def make_graph(
    tokens: list[str],
    n_layers: int,
    features: list[tuple[int, int, int, float]],
    logits: list[tuple[int, float]],
    edges: dict[tuple[str, str], float],
) -> AttributionGraph:
    """A graph in the contract's node order, edges given by node name.

    Names: ``f<i>`` the i-th feature, ``err<layer>.<pos>``, ``emb<pos>``, ``logit<i>``.

    Args:
        tokens: Prompt tokens (their ids are 100 + position).
        n_layers: Layers (one error node per layer and position).
        features: ``(layer, position, index, activation)`` of each feature node.
        logits: ``(token_id, probability)`` of each logit node.
        edges: ``{(source, target): weight}``.
    """
    n_pos = len(tokens)
    nodes = [GraphNode("feature", la, p, i, a) for la, p, i, a in features]
    names = [f"f{i}" for i in range(len(features))]
    for layer in range(n_layers):
        for pos in range(n_pos):
            nodes.append(GraphNode("error", layer, pos, None))
            names.append(f"err{layer}.{pos}")
    for pos in range(n_pos):
        nodes.append(GraphNode("embedding", None, pos, 100 + pos))
        names.append(f"emb{pos}")
    for i, (token_id, prob) in enumerate(logits):
        nodes.append(GraphNode("logit", None, n_pos - 1, token_id, prob))
        names.append(f"logit{i}")
    index = {name: i for i, name in enumerate(names)}
    adjacency = torch.zeros(len(nodes), len(nodes), dtype=torch.float64)
    for (source, target), weight in edges.items():
        adjacency[index[target], index[source]] = weight
    return AttributionGraph(
        prompt="".join(tokens),
        token_ids=[100 + p for p in range(n_pos)],
        tokens=list(tokens),
        nodes=nodes,
        adjacency=adjacency,
        n_layers=n_layers,
        meta={"logit_tokens": [f"tok{t}" for t, _ in logits]},
    )


def random_graph(
    seed: int, n_layers: int = 3, n_pos: int = 3, n_features: int = 8, density: float = 0.6
) -> AttributionGraph:
    """A random DAG respecting the forward pass: sources feed later layers, same or later
    positions; errors have no inputs; everything at the last position may feed the logits."""
    gen = torch.Generator().manual_seed(seed)
    features = []
    for _ in range(n_features):
        layer = int(torch.randint(n_layers, (1,), generator=gen))
        pos = int(torch.randint(n_pos, (1,), generator=gen))
        features.append((layer, pos, int(torch.randint(50, (1,), generator=gen)), 1.0))
    features.sort(key=lambda f: (f[0], f[1], f[2]))
    # Unique (layer, pos, index) as an attribution would give.
    features = [f for i, f in enumerate(features) if f not in features[:i]]
    logits = [(7, 0.6), (9, 0.3)]
    sources = [(f"f{i}", la, p) for i, (la, p, _, _) in enumerate(features)]
    sources += [(f"err{la}.{p}", la, p) for la in range(n_layers) for p in range(n_pos)]
    sources += [(f"emb{p}", -1, p) for p in range(n_pos)]
    edges = {}
    for name, layer, pos in sources:
        for j, (t_layer, t_pos, _, _) in enumerate(features):
            if t_layer > layer and t_pos >= pos and float(torch.rand(1, generator=gen)) < density:
                edges[(name, f"f{j}")] = float(torch.randn(1, generator=gen))
        if pos == n_pos - 1:
            for k in range(len(logits)):
                if float(torch.rand(1, generator=gen)) < density:
                    edges[(name, f"logit{k}")] = float(torch.randn(1, generator=gen))
    tokens = [f"t{p}" for p in range(n_pos)]
    return make_graph(tokens, n_layers, features, logits, edges)
