"""Influence, pruning and the replacement/completeness scores of an attribution graph.

Follows circuit-tracer (``circuit_tracer/graph.py``: ``normalize_matrix``,
``compute_influence``, ``compute_node_influence``, ``compute_edge_influence``,
``find_threshold``, ``prune_graph``, ``compute_graph_scores``):

- The adjacency is made non-negative and row-normalised, ``A = |adj| / rowsum(|adj|)``, so
  each target splits one unit of "credit" over its direct sources.
- A node's *influence* is the credit it receives from the logits through every path,
  ``w @ (A + A² + A³ + ...) = w @ ((I - A)⁻¹ - I)`` with ``w`` the logit probabilities
  on the logit nodes. The graph is a DAG (sources come earlier in the forward pass), so the
  series ends after at most ``n_nodes`` terms and is summed exactly by iteration.
- Nodes are kept while their cumulative share of the total influence (highest first)
  reaches ``node_threshold``; on the graph restricted to them, an edge's score is its
  normalised weight times the influence (plus logit weight) of its target, and edges are
  kept while their cumulative share reaches ``edge_threshold``. Embeddings and logits are
  always kept; then feature and error nodes left without a kept outgoing edge, and feature
  nodes left without a kept incoming edge, are dropped, repeatedly, until nothing changes.

Deviations, on purpose: node kinds are read from :class:`GraphNode` rather than from index
ranges (same order, so the same result); a kept edge must also be a non-zero entry (at
``edge_threshold=1.0`` circuit-tracer's mask admits every zero entry too); a graph with a
cycle raises :class:`~lightning_interp.errors.InvalidGraphError` instead of ``RuntimeError``.
Error nodes are pruned like features, as circuit-tracer does (only embeddings and logits
are always kept).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from lightning_interp.circuits.graph import AttributionGraph
from lightning_interp.errors import ConfigError, InvalidGraphError

_EPS = 1e-10  # circuit-tracer's clamp of a row sum: a node with no input keeps a zero row


def normalize_adjacency(adjacency: Tensor) -> Tensor:
    """``|adjacency|`` with each row (target) divided by its sum (zero rows stay zero)."""
    magnitude = adjacency.abs()
    return magnitude / magnitude.sum(dim=1, keepdim=True).clamp(min=_EPS)


def influence(normalized: Tensor, weights: Tensor) -> Tensor:
    """Total influence ``weights @ (A + A² + ...)`` of every node, summed path by path.

    Args:
        normalized: ``[n, n]`` non-negative matrix of a DAG (``A[target, source]``).
        weights: ``[n]`` weight of each node as an end point (logit probabilities).

    Returns:
        ``[n]`` influence of each node on the weighted end points (end points themselves
        get only what flows to them from later nodes, usually zero).

    Raises:
        InvalidGraphError: the series does not end, so the graph has a cycle.
    """
    step = weights @ normalized
    total = step.clone()
    # A DAG's paths are at most n - 1 edges long: A^n is exactly zero (products of exact zeros).
    for _ in range(normalized.shape[0]):
        if not step.any():
            return total
        step = step @ normalized
        total += step
    raise InvalidGraphError(
        "the attribution graph has a cycle (influence does not converge); an edge must go "
        "from an earlier node of the forward pass to a later one: rebuild the graph"
    )


def logit_weights(graph: AttributionGraph) -> Tensor:
    """``[n_nodes]`` vector: each logit node's probability, zero elsewhere."""
    weights = torch.zeros(len(graph.nodes), dtype=graph.adjacency.dtype)
    for i in graph.indices("logit"):
        weights[i] = graph.nodes[i].activation
    return weights


def node_influence(graph: AttributionGraph) -> Tensor:
    """Influence of every node of ``graph`` on its logits (see the module docstring)."""
    check_graph(graph)
    adjacency = graph.adjacency.detach().to("cpu")
    return influence(normalize_adjacency(adjacency), logit_weights(graph).to(adjacency.dtype))


def edge_scores(adjacency: Tensor, weights: Tensor) -> Tensor:
    """``[n, n]`` score of every edge: its normalised weight times its target's influence.

    A target's influence here includes its own weight as an end point, so edges into the
    logits are scored by the logit probabilities.
    """
    normalized = normalize_adjacency(adjacency)
    target = influence(normalized, weights) + weights
    return normalized * target[:, None]


def find_threshold(scores: Tensor, fraction: float) -> Tensor:
    """The smallest score to keep so that kept scores hold ``fraction`` of the total.

    Scores are sorted from highest; the threshold is the score at which the cumulative share
    first reaches ``fraction`` (the last score when it never does, at ``fraction=1``).
    """
    ordered = torch.sort(scores.flatten(), descending=True).values
    cumulative = torch.cumsum(ordered, dim=0) / ordered.sum()
    index = int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=cumulative.dtype)))
    return ordered[min(index, len(ordered) - 1)]


def check_graph(graph: AttributionGraph) -> None:
    """Raise :class:`InvalidGraphError` unless the adjacency is ``[n_nodes, n_nodes]``."""
    n = len(graph.nodes)
    if tuple(graph.adjacency.shape) != (n, n):
        raise InvalidGraphError(
            f"adjacency has shape {tuple(graph.adjacency.shape)} but the graph has {n} nodes; "
            f"it must be [{n}, {n}] (rows targets, columns sources)"
        )
    if not graph.indices("logit"):
        raise InvalidGraphError("the graph has no logit node; attribute at least one logit")


def check_fraction(name: str, value: float) -> float:
    """``value`` as a float if it lies in ``[0, 1]``, else :class:`ConfigError` naming ``name``."""
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name}={value} is outside [0, 1]; pass a fraction such as 0.8")
    return float(value)


@dataclass
class PrunedGraph:
    """What :func:`prune_graph` keeps of a graph.

    Attributes:
        graph: The full graph that was pruned.
        node_mask: ``[n_nodes]`` bool, the nodes kept.
        edge_mask: ``[n_nodes, n_nodes]`` bool, the edges kept (``[target, source]``).
        influence: ``[n_nodes]`` each node's influence on the logits (full graph).
        cumulative_influence: ``[n_nodes]`` the cumulative share of total influence up to
            and including each node, nodes sorted by influence (circuit-tracer's
            ``cumulative_scores``, the ``influence`` of its JSON nodes).
        selected_by_influence: ``[n_nodes]`` bool, the nodes whose influence reached the
            node threshold (embeddings and logits are kept besides), before edge pruning.
        node_threshold: The node threshold used.
        edge_threshold: The edge threshold used.
    """

    graph: AttributionGraph
    node_mask: Tensor
    edge_mask: Tensor
    influence: Tensor
    cumulative_influence: Tensor
    selected_by_influence: Tensor
    node_threshold: float
    edge_threshold: float

    def kept(self) -> list[int]:
        """Indices (into the full graph's nodes) of the kept nodes, in graph order."""
        return self.node_mask.nonzero().flatten().tolist()

    def subgraph(self) -> AttributionGraph:
        """A new graph of the kept nodes only, with the pruned edges set to zero.

        Its ``meta`` adds ``pruning``: the thresholds, the size before pruning, and the
        kept nodes' indices, influences and cumulative influences (in the new order).
        """
        kept = torch.tensor(self.kept(), dtype=torch.long)
        adjacency = (self.graph.adjacency.detach().cpu() * self.edge_mask)[kept][:, kept]
        pruning = {
            "node_threshold": self.node_threshold,
            "edge_threshold": self.edge_threshold,
            "n_nodes_before": len(self.graph.nodes),
            "kept": kept.tolist(),
            "influence": self.influence[kept].tolist(),
            "cumulative_influence": self.cumulative_influence[kept].tolist(),
        }
        return replace(
            self.graph,
            nodes=[self.graph.nodes[i] for i in kept.tolist()],
            adjacency=adjacency.clone(),
            meta={**self.graph.meta, "pruning": pruning},
        )


def _kind_masks(graph: AttributionGraph) -> dict[str, Tensor]:
    masks = {}
    for kind in ("feature", "error", "embedding", "logit"):
        mask = torch.zeros(len(graph.nodes), dtype=torch.bool)
        mask[graph.indices(kind)] = True
        masks[kind] = mask
    return masks


def prune_graph(
    graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98
) -> PrunedGraph:
    """Keep the nodes and edges that carry most of the influence on the logits.

    Args:
        graph: The graph to prune.
        node_threshold: Keep the most influential nodes holding this share of the total
            node influence (circuit-tracer's default 0.8).
        edge_threshold: Keep the highest-scoring edges holding this share of the total edge
            score, among the kept nodes (default 0.98).

    Returns:
        The masks and influences (see :class:`PrunedGraph`; ``.subgraph()`` builds the
        pruned graph).

    Raises:
        ConfigError: a threshold outside ``[0, 1]``.
        InvalidGraphError: a malformed graph, or one with a cycle.
    """
    node_threshold = check_fraction("node_threshold", node_threshold)
    edge_threshold = check_fraction("edge_threshold", edge_threshold)
    scores = node_influence(graph)
    adjacency = graph.adjacency.detach().to("cpu", scores.dtype)
    kinds = _kind_masks(graph)
    always = kinds["embedding"] | kinds["logit"]
    prunable = kinds["feature"] | kinds["error"]

    selected = scores >= find_threshold(scores, node_threshold)
    node_mask = selected | always
    restricted = adjacency * (node_mask[:, None] & node_mask[None, :])
    edges = edge_scores(restricted, logit_weights(graph).to(scores.dtype))
    edge_mask = (edges >= find_threshold(edges, edge_threshold)) & (restricted != 0)

    # Dropping a node can strand another (no kept output, or a feature with no kept input):
    # repeat until stable, at most once per node.
    while True:
        edge_mask &= node_mask[:, None] & node_mask[None, :]
        has_output = edge_mask.any(dim=0)
        has_input = edge_mask.any(dim=1)
        new_mask = node_mask & ~(prunable & ~has_output) & ~(kinds["feature"] & ~has_input)
        if torch.equal(new_mask, node_mask):
            break
        node_mask = new_mask

    ordered, order = torch.sort(scores, descending=True)
    cumulative = torch.zeros_like(scores)
    cumulative[order] = torch.cumsum(ordered, dim=0) / ordered.sum().clamp(min=_EPS)
    return PrunedGraph(
        graph=graph,
        node_mask=node_mask,
        edge_mask=edge_mask,
        influence=scores,
        cumulative_influence=cumulative,
        selected_by_influence=selected,
        node_threshold=node_threshold,
        edge_threshold=edge_threshold,
    )


def graph_scores(graph: AttributionGraph) -> tuple[float, float]:
    """The replacement and completeness scores of a graph, as circuit-tracer defines them.

    - *Replacement score*: of the influence that reaches the logits from the token
      embeddings and the error nodes, the share from the embeddings (paths from tokens run
      through features, never through errors, since errors have no inputs):
      ``infl(embeddings) / (infl(embeddings) + infl(errors))``.
    - *Completeness score*: each node's share of (normalised) input coming from non-error
      nodes, averaged with weights ``influence + logit probability``.

    Both are 1.0 when no error node has an edge, and fall as error edges grow.

    Args:
        graph: The full (unpruned) graph.

    Returns:
        ``(replacement_score, completeness_score)``.
    """
    check_graph(graph)
    adjacency = graph.adjacency.detach().to("cpu")
    weights = logit_weights(graph).to(adjacency.dtype)
    normalized = normalize_adjacency(adjacency)
    scores = influence(normalized, weights)
    kinds = _kind_masks(graph)
    from_tokens = scores[kinds["embedding"]].sum()
    from_errors = scores[kinds["error"]].sum()
    replacement = from_tokens / (from_tokens + from_errors).clamp(min=_EPS)
    non_error = 1 - normalized[:, kinds["error"]].sum(dim=1)
    output = scores + weights
    completeness = (non_error * output).sum() / output.sum().clamp(min=_EPS)
    return float(replacement), float(completeness)
