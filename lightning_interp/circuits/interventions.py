"""Interventions that check an attribution graph: scale a feature, compare the logits.

Scaling feature ``f`` (activation ``a_f``) by ``scale`` changes it by
``delta = (scale - 1) * a_f``. The graph predicts the change of each logit node (logit
minus mean logit) as the sum over all paths from ``f`` to the logit, each edge taken per
unit of its source's activation: with ``B = A`` whose feature columns are divided by the
source's activation, the changes solve ``x = B x + e_f * delta`` over feature nodes
(``(I - B)^-1``, the path sums circuit-tracer's ``compute_influence`` takes over the
normalised graph), and the logit changes are ``B[logits] x``. The direct prediction keeps
only the edge ``f -> logit``.

The measured change comes from one of four forwards (circuit-tracer's
``feature_intervention`` with ``freeze_attention`` / ``direct_effects``, and the
"Circuit Tracing" paper's perturbation checks):

- ``"direct"``: attention patterns and norm scales replayed from the clean run, errors
  held, every other feature held at its clean activation: measures direct effects only.
- ``"linear"``: as ``"direct"``, but every feature node of the graph moves with its
  pre-activation (its activation function linearised at the clean point): the regime the
  graph describes exactly, so predicted and measured agree to float rounding.
- ``"frozen"``: patterns, scales and errors frozen, features recomputed through their real
  activation functions (thresholds, TopK selection).
- ``"free"``: the original model (live attention, norms and MLPs), the feature's decoder
  write changed by ``delta``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from lightning_interp.circuits._freeze import FreezeState
from lightning_interp.circuits.graph import AttributionGraph
from lightning_interp.circuits.replacement import ReplacementModel, ReplacementRun
from lightning_interp.errors import ConfigError

__all__ = ["InterventionReport", "InterventionResult", "check_interventions", "predicted_effects"]

Regime = Literal["direct", "linear", "frozen", "free"]
REGIMES: tuple[Regime, ...] = ("direct", "linear", "frozen", "free")


@dataclass
class InterventionResult:
    """One feature scaled in one regime: predicted and measured logit-node changes.

    Attributes:
        node: The feature's index in the graph's nodes.
        layer: Its layer. position: Its position. feature: Its index.
        regime: Which forward measured the change (see the module docstring).
        predicted: ``[n_logits]`` change predicted by the graph.
        measured: ``[n_logits]`` change measured.
    """

    node: int
    layer: int
    position: int
    feature: int
    regime: Regime
    predicted: Tensor
    measured: Tensor

    @property
    def relative_error(self) -> float:
        """``|measured - predicted| / |predicted|`` (L2 over the logit nodes)."""
        scale = float(self.predicted.norm())
        return float((self.measured - self.predicted).norm()) / max(scale, 1e-12)


@dataclass
class InterventionReport:
    """Every result of :func:`check_interventions` plus the logit nodes' tokens."""

    logit_tokens: list[int]
    scale: float
    results: list[InterventionResult] = field(default_factory=list)

    def worst(self, regime: Regime) -> float:
        """Largest relative error in ``regime`` (0 when none was run)."""
        errors = [r.relative_error for r in self.results if r.regime == regime]
        return max(errors, default=0.0)

    def to_text(self) -> str:
        """One line per result, for the command's output."""
        lines = [f"scale {self.scale:g}; logit tokens {self.logit_tokens}"]
        for r in self.results:
            lines.append(
                f"L{r.layer} pos {r.position} f{r.feature} {r.regime:>6}: predicted "
                f"{r.predicted[0].item():+.4g} measured {r.measured[0].item():+.4g} (top "
                f"logit); relative error {r.relative_error:.3g}"
            )
        return "\n".join(lines)


def predicted_effects(
    graph: AttributionGraph, nodes: Sequence[int], scale: float, *, direct: bool = False
) -> Tensor:
    """``[len(nodes), n_logits]`` logit-node changes when each feature node is scaled.

    Args:
        graph: An attribution graph (feature nodes not in it are taken as held).
        nodes: Indices of feature nodes in ``graph.nodes``.
        scale: Factor on each feature's activation (0 ablates).
        direct: Only the direct edge to each logit, no paths through other features.
    """
    features, logits = graph.indices("feature"), graph.indices("logit")
    adjacency = graph.adjacency.double()
    acts = torch.tensor([graph.nodes[i].activation for i in features], dtype=torch.float64)
    per_unit = adjacency[features][:, features] / acts[None, :]
    to_logits = adjacency[logits][:, features] / acts[None, :]
    where = {node: k for k, node in enumerate(features)}
    inject = torch.zeros(len(features), len(nodes), dtype=torch.float64)
    for col, node in enumerate(nodes):
        if node not in where:
            raise ConfigError(f"node {node} is not a feature node of the graph")
        inject[where[node], col] = (scale - 1.0) * acts[where[node]]
    if direct:
        return (to_logits @ inject).T.float()
    eye = torch.eye(len(features), dtype=torch.float64)
    changes = torch.linalg.solve(eye - per_unit, inject)
    return (to_logits @ changes).T.float()


def _logit_values(logits: Tensor, tokens: list[int]) -> Tensor:
    last = logits[-1].float()
    return last[tokens] - last.mean()


@torch.no_grad()
def _measure(
    model: ReplacementModel,
    run: ReplacementRun,
    active: list[Tensor],
    target: tuple[int, int, int],
    scale: float,
    regime: Regime,
) -> Tensor:
    layer0, pos0, feat0 = target
    new_value = scale * run.activations[layer0][pos0, feat0]
    if regime == "free":
        delta = (new_value - run.activations[layer0][pos0, feat0]).item()

        def output(layer: int, out: Tensor) -> Tensor:
            decoder = model.transcoders.decoder(layer0, layer)
            if decoder is None:
                return out
            out = out.clone()
            out[:, pos0] += delta * decoder[feat0].to(out.dtype)
            return out

        with torch.no_grad(), model.hooked(output_fn=output):
            return model.backbone.model(input_ids=run.input_ids[None]).logits[0]

    def codes(layer: int, x: Tensor) -> Tensor:
        clean = run.activations[layer]
        if regime == "direct":
            new = clean.clone()
        elif regime == "linear":
            moved = model.pre_activations(layer, x[0]) - model.pre_activations(
                layer, run.mlp_in[layer]
            )
            new = clean + moved * active[layer]
        else:
            new = model.transcoders.encode(layer, x[0])
        if layer == layer0:
            new[pos0, feat0] = new_value
        return new[None]

    freeze = FreezeState("replay", run.freeze.patterns, run.freeze.scales)
    held_error = lambda layer, _out, _recon: run.errors[layer][None]  # noqa: E731
    return model.forward(run.input_ids, codes_fn=codes, error_fn=held_error, freeze=freeze)[0]


def check_interventions(
    model: ReplacementModel,
    graph: AttributionGraph,
    *,
    features: Sequence[int] | None = None,
    scale: float = 0.0,
    regimes: Sequence[Regime] = REGIMES,
    top: int = 5,
) -> InterventionReport:
    """Scale features of ``graph`` in ``model`` and compare logit changes with the graph.

    Args:
        model: The replacement model the graph was computed with.
        graph: The (unpruned) attribution graph of one prompt.
        features: Indices of feature nodes in ``graph.nodes``; default the ``top`` features
            with the largest predicted effect on the first logit node.
        scale: Factor on each feature's activation (0 ablates, 2 doubles).
        regimes: Which forwards to measure (see the module docstring).
        top: Number of features chosen when ``features`` is not given.

    Returns:
        The predicted and measured changes of every logit node, per feature and regime.

    Raises:
        ConfigError: an unknown regime, or a node that is not a feature of the graph.
    """
    unknown = set(regimes) - set(REGIMES)
    if unknown:
        raise ConfigError(f"unknown regimes {sorted(unknown)}; choose from {list(REGIMES)}")
    run = model.run(graph.token_ids)
    tokens = [graph.nodes[i].index for i in graph.indices("logit")]
    if features is None:
        candidates = graph.indices("feature")
        effect = predicted_effects(graph, candidates, 0.0)[:, 0].abs()
        features = [candidates[i] for i in torch.argsort(effect, descending=True)[:top].tolist()]
    active = [torch.zeros_like(a) for a in run.activations]
    for i in graph.indices("feature"):
        node = graph.nodes[i]
        active[node.layer][node.position, node.index] = 1.0
    report = InterventionReport(logit_tokens=tokens, scale=scale)
    clean = _logit_values(run.logits, tokens)
    full = predicted_effects(graph, features, scale)
    direct = predicted_effects(graph, features, scale, direct=True)
    for k, node_index in enumerate(features):
        node = graph.nodes[node_index]
        target = (node.layer, node.position, node.index)
        for regime in regimes:
            logits = _measure(model, run, active, target, scale, regime)
            report.results.append(
                InterventionResult(
                    node=node_index,
                    layer=node.layer,
                    position=node.position,
                    feature=node.index,
                    regime=regime,
                    predicted=direct[k] if regime == "direct" else full[k],
                    measured=_logit_values(logits, tokens) - clean,
                )
            )
    return report
