"""The attribution graph: nodes of a replacement model's forward pass and their direct effects.

Layout follows circuit-tracer's ``Graph``: nodes are ordered as active features (by layer,
then position, then feature index), error nodes (one per layer and position), token
embeddings (one per position), then output logits; ``adjacency[target, source]`` is the
direct effect of ``source`` on ``target`` through the linearised model (attention patterns
and normalisation scales frozen). Rows are targets, columns sources, as in circuit-tracer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor

NodeKind = Literal["feature", "error", "embedding", "logit"]


@dataclass(frozen=True)
class GraphNode:
    """One node of an attribution graph.

    Attributes:
        kind: ``"feature"``, ``"error"`` (a layer's MLP reconstruction error at a
            position), ``"embedding"`` (a token's embedding) or ``"logit"``.
        layer: The layer of a feature or error node; ``None`` for embeddings and logits.
        position: Token position in the prompt (logits: the last position).
        index: Feature index for a feature node, token id for embedding and logit nodes,
            ``None`` for error nodes.
        activation: A feature's activation, a logit's probability, else ``0.0``.
    """

    kind: NodeKind
    layer: int | None
    position: int
    index: int | None
    activation: float = 0.0


@dataclass
class AttributionGraph:
    """Nodes and direct-effect edges of one prompt through a replacement model.

    Attributes:
        prompt: The prompt's text.
        token_ids: The prompt's token ids, in order.
        tokens: Each token's text, as the tokenizer decodes it.
        nodes: Every node, in the order described in the module docstring.
        adjacency: ``[n_nodes, n_nodes]`` float tensor; ``adjacency[t, s]`` is the direct
            effect of node ``s`` on node ``t``.
        n_layers: Number of layers of the replacement model.
        meta: Free-form provenance (backbone, transcoder source, thresholds, scores).
    """

    prompt: str
    token_ids: list[int]
    tokens: list[str]
    nodes: list[GraphNode]
    adjacency: Tensor
    n_layers: int
    meta: dict[str, Any] = field(default_factory=dict)

    def indices(self, kind: NodeKind) -> list[int]:
        """Positions in :attr:`nodes` of every node of ``kind``."""
        return [i for i, node in enumerate(self.nodes) if node.kind == kind]
