"""Attribution graphs: direct effects between features, errors, embeddings and logits.

The method of Ameisen et al. 2025 ("Circuit Tracing", the local replacement model) as
circuit-tracer implements it (``attribution.py``: ``AttributionContext``,
``compute_salient_logits``, ``compute_partial_influences``, ``_run_attribution``):

- Attention patterns and norm scales are frozen (detached), MLP outputs are constants
  (the transcoders' reconstruction plus the error), so the residual stream is linear in
  the sources: feature writes ``a_s * W_dec``, error vectors and embeddings.
- The edge ``source -> target`` is the source vector dotted with the gradient of the
  target's pre-activation at the source's write site: a feature's encoder pre-activation
  (``mlp_in @ W_enc + b_enc``), or a logit minus the mean logit. A CLT feature writes to
  every layer from its own on; its edge sums over them.
- Logit nodes are the top logits of the last position up to cumulative probability
  ``logit_probability``, at most ``max_logits``.
- With ``max_feature_nodes``, features are attributed in order of their influence on the
  logits as estimated from the rows computed so far (circuit-tracer's ranking), and the
  graph keeps only those.

Deviation: the embedding node of a position is the whole residual stream entering block 0
(for GPT-2 token plus position embedding), so only biases remain outside the graph;
circuit-tracer's embedding node is the token embedding alone. The first (BOS) position is
not zeroed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_interp.circuits._freeze import FreezeState, frozen
from lightning_interp.circuits.graph import AttributionGraph, GraphNode
from lightning_interp.circuits.replacement import ReplacementModel, ReplacementRun
from lightning_interp.errors import ConfigError

__all__ = ["attribute", "salient_logits"]


@torch.no_grad()
def salient_logits(
    logits: Tensor, *, max_logits: int = 10, logit_probability: float = 0.95
) -> tuple[Tensor, Tensor]:
    """The fewest top tokens whose probabilities sum to ``logit_probability`` (cap ``max_logits``).

    Args:
        logits: ``[vocab]`` logits of one position.
        max_logits: Most tokens kept.
        logit_probability: Cumulative probability to reach.

    Returns:
        ``(token ids, probabilities)``, most probable first.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    top_p, top_idx = torch.topk(probs, min(max_logits, probs.numel()))
    cutoff = int(torch.searchsorted(torch.cumsum(top_p, 0), logit_probability)) + 1
    return top_idx[:cutoff], top_p[:cutoff]


class _Backward:
    """One batched forward of the frozen model; gradients of target batches from it."""

    def __init__(self, model: ReplacementModel, run: ReplacementRun, batch: int) -> None:
        self.model, self.run, self.batch = model, run, batch
        ids = run.input_ids[None].expand(batch, -1)
        self.h0 = run.embeddings[None].expand(batch, -1, -1).clone().requires_grad_(True)
        self.outs = [
            o[None].expand(batch, -1, -1).clone().requires_grad_(True) for o in run.mlp_out
        ]
        record: dict[str, list[Tensor]] = {}
        final: list[Tensor] = []
        handle = model.unembed.register_forward_pre_hook(lambda _m, args: final.append(args[0]))
        try:
            with (
                torch.enable_grad(),
                model.hooked(
                    output_fn=lambda layer, _out: self.outs[layer],
                    embed_fn=lambda _x: self.h0,
                    record=record,
                ),
                frozen(model.backbone.model, FreezeState("detach")),
            ):
                model.backbone.model(input_ids=ids)
        finally:
            handle.remove()
        self.mlp_in = record["mlp_in"]
        self.final = final[0]

    def grads(self, targets: list[tuple[int, int, Tensor]]) -> tuple[Tensor, list[Tensor | None]]:
        """Gradients at the embeddings and MLP outputs for each target of the batch.

        Args:
            targets: ``(layer, position, direction)``: layer ``n_layers`` is the final
                residual (logits), else that layer's MLP input.
        """
        seeds: dict[int, Tensor] = {}
        for row, (layer, pos, direction) in enumerate(targets):
            site = self.final if layer == self.model.n_layers else self.mlp_in[layer]
            seed = seeds.setdefault(layer, torch.zeros_like(site))
            seed[row, pos] = direction.detach().to(seed.dtype)
        outputs = [self.final if k == self.model.n_layers else self.mlp_in[k] for k in seeds]
        grads = torch.autograd.grad(
            outputs,
            [self.h0, *self.outs],
            grad_outputs=list(seeds.values()),
            retain_graph=True,
            allow_unused=True,
        )
        h0 = grads[0] if grads[0] is not None else torch.zeros_like(self.h0)
        return h0, list(grads[1:])


class _Features:
    """Active features of a run: layer, position, index, activation (sorted)."""

    def __init__(self, run: ReplacementRun) -> None:
        keys, values = [torch.zeros(0, 3, dtype=torch.long)], [torch.zeros(0)]
        for layer, acts in enumerate(run.activations):
            pos, idx = torch.nonzero(acts, as_tuple=True)
            keys.append(torch.stack([torch.full_like(pos, layer), pos, idx], 1))
            values.append(acts[pos, idx].float())
        self.keys, self.values = torch.cat(keys), torch.cat(values)

    def __len__(self) -> int:
        return len(self.keys)


@torch.no_grad()
def _edge_rows(
    model: ReplacementModel,
    run: ReplacementRun,
    feats: _Features,
    h0_grad: Tensor,
    out_grads: list[Tensor | None],
) -> Tensor:
    """``[batch, n_features + n_layers * n_pos + n_pos]`` edges into each target."""
    n_pos = len(run.input_ids)
    batch = h0_grad.shape[0]
    feature_cols = torch.zeros(batch, len(feats))
    for source in range(model.n_layers):
        mask = feats.keys[:, 0] == source
        if not mask.any():
            continue
        pos, idx = feats.keys[mask, 1], feats.keys[mask, 2]
        scale = feats.values[mask][:, None]
        total = torch.zeros(batch, int(mask.sum()))
        for target in range(source, model.n_layers):
            decoder, grad = model.transcoders.decoder(source, target), out_grads[target]
            if decoder is None or grad is None:
                continue
            writes = decoder[idx].to(grad.dtype) * scale.to(grad.dtype)
            total += torch.einsum("bnd,nd->bn", grad[:, pos], writes).float()
        feature_cols[:, mask] = total
    error_cols = torch.zeros(batch, model.n_layers, n_pos)
    for layer, grad in enumerate(out_grads):
        if grad is not None:
            error_cols[:, layer] = torch.einsum("bpd,pd->bp", grad, run.errors[layer]).float()
    embed_cols = torch.einsum("bpd,pd->bp", h0_grad, run.embeddings.to(h0_grad.dtype)).float()
    return torch.cat([feature_cols, error_cols.reshape(batch, -1), embed_cols], 1)


def _influence(rows: Tensor, row_nodes: Tensor, logit_probs: Tensor, n_cols: int) -> Tensor:
    """Indirect influence of every column on the logits (circuit-tracer's partial influence).

    Rows are normalised to unit absolute sum; influence flows back from the logits
    (weighted by probability) through the rows computed so far.
    """
    norm = rows.abs()
    norm = norm / norm.sum(1, keepdim=True).clamp_min(1e-8)
    weight = torch.zeros(n_cols)
    weight[n_cols - len(logit_probs) :] = logit_probs
    influence = torch.zeros(n_cols)
    for _ in range(n_cols + 1):  # a DAG: at most one step per node
        weight = weight[row_nodes] @ norm
        if not weight.any():
            break
        influence += weight
    return influence


def attribute(
    model: ReplacementModel,
    prompt: str | Tensor | Sequence[int],
    *,
    max_feature_nodes: int | None = None,
    max_logits: int = 10,
    logit_probability: float = 0.95,
    batch_size: int = 32,
) -> AttributionGraph:
    """The attribution graph of ``prompt``'s next-token logits through ``model``.

    Args:
        model: The replacement model.
        prompt: Text or token ids (one prompt).
        max_feature_nodes: Keep at most this many active features (the most influential
            on the logits); ``None`` keeps all.
        max_logits: Most logit nodes.
        logit_probability: Logit nodes cover this cumulative probability.
        batch_size: Targets per backward pass (and copies of the prompt in the forward).

    Returns:
        The unpruned graph: ``adjacency[target, source]``, nodes ordered features (by
        layer, position, index), errors (by layer, position), embeddings, logits.

    Raises:
        ConfigError: a non-positive ``batch_size`` or ``max_logits``, or
            ``logit_probability`` outside ``(0, 1]``.
    """
    if batch_size <= 0 or max_logits <= 0 or not 0 < logit_probability <= 1:
        raise ConfigError(
            f"need batch_size > 0, max_logits > 0 and 0 < logit_probability <= 1, got "
            f"{batch_size}, {max_logits}, {logit_probability}"
        )
    run = model.run(prompt)
    feats = _Features(run)
    n_pos, n_layers, n_feats = len(run.input_ids), model.n_layers, len(feats)
    logit_ids, logit_probs = salient_logits(
        run.logits[-1], max_logits=max_logits, logit_probability=logit_probability
    )
    w_u = model.unembed.weight
    logit_dirs = w_u[logit_ids] - w_u.mean(0)
    n_src = n_feats + (n_layers + 1) * n_pos
    n_cols = n_src + len(logit_ids)
    backward = _Backward(model, run, batch_size)

    def rows_for(targets: list[tuple[int, int, Tensor]]) -> Tensor:
        return _edge_rows(model, run, feats, *backward.grads(targets))[: len(targets)]

    logit_rows = torch.cat(
        [
            rows_for([(n_layers, n_pos - 1, d) for d in logit_dirs[i : i + batch_size]])
            for i in range(0, len(logit_ids), batch_size)
        ]
    )
    budget = n_feats if max_feature_nodes is None else min(max_feature_nodes, n_feats)
    feature_rows = torch.zeros(n_feats, n_src)
    visited = torch.zeros(n_feats, dtype=torch.bool)
    row_nodes = torch.arange(n_src, n_cols)
    while int(visited.sum()) < budget:
        if budget == n_feats:
            pending = torch.arange(n_feats)
        else:
            done = torch.nonzero(visited).flatten()
            rows = torch.cat([logit_rows, feature_rows[done]])
            nodes = torch.cat([row_nodes, done])
            rows = torch.nn.functional.pad(rows, (0, n_cols - n_src))
            influence = _influence(rows, nodes, logit_probs, n_cols)[:n_feats]
            order = torch.argsort(influence, descending=True)
            pending = order[~visited[order]][: min(4 * batch_size, budget - int(visited.sum()))]
        for chunk in pending.split(batch_size):
            targets = []
            for layer, pos, idx in feats.keys[chunk].tolist():
                w_enc, _ = model.transcoders.encoder(layer)
                targets.append((layer, pos, w_enc[:, idx]))
            feature_rows[chunk] = rows_for(targets)
            visited[chunk] = True
    tokens = _token_texts(model, run.input_ids.tolist())
    keep = torch.nonzero(visited).flatten()  # sorted: features stay in (layer, pos, index) order
    cols = torch.cat([keep, torch.arange(n_feats, n_src)])
    n_keep = len(keep)
    size = n_keep + (n_layers + 1) * n_pos + len(logit_ids)
    adjacency = torch.zeros(size, size)
    adjacency[:n_keep, : len(cols)] = feature_rows[keep][:, cols]
    adjacency[size - len(logit_ids) :, : len(cols)] = logit_rows[:, cols]
    return AttributionGraph(
        prompt=prompt if isinstance(prompt, str) else "".join(tokens),
        token_ids=run.input_ids.tolist(),
        tokens=tokens,
        nodes=_nodes(feats, keep, n_layers, n_pos, run.input_ids.tolist(), logit_ids, logit_probs),
        adjacency=adjacency,
        n_layers=n_layers,
        meta={
            **model.meta(),
            "n_active_features": n_feats,
            "max_feature_nodes": max_feature_nodes,
            "max_logits": max_logits,
            "logit_probability": logit_probability,
            "logit_target": "logit minus mean logit over the vocabulary",
            "frozen": "attention patterns and normalisation scales",
            "embedding_nodes": "residual stream entering block 0",
        },
    )


def _nodes(
    feats: _Features,
    keep: Tensor,
    n_layers: int,
    n_pos: int,
    token_ids: list[int],
    logit_ids: Tensor,
    logit_probs: Tensor,
) -> list[GraphNode]:
    nodes = [
        GraphNode("feature", layer, pos, idx, float(feats.values[i]))
        for i, (layer, pos, idx) in zip(keep.tolist(), feats.keys[keep].tolist(), strict=True)
    ]
    nodes += [
        GraphNode("error", layer, pos, None) for layer in range(n_layers) for pos in range(n_pos)
    ]
    nodes += [GraphNode("embedding", None, pos, tok) for pos, tok in enumerate(token_ids)]
    nodes += [
        GraphNode("logit", None, n_pos - 1, int(tok), float(p))
        for tok, p in zip(logit_ids.tolist(), logit_probs.tolist(), strict=True)
    ]
    return nodes


def _token_texts(model: ReplacementModel, ids: list[int]) -> list[str]:
    tokenizer = getattr(model.backbone.tokenizer, "tokenizer", model.backbone.tokenizer)
    if tokenizer is None:
        return [str(i) for i in ids]
    return [tokenizer.decode([i]) for i in ids]
