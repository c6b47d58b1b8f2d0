"""A static, offline HTML view of a pruned attribution graph.

:func:`render_graph_html` draws the Neuronpedia-layout JSON (:mod:`.graph_json`) as one
self-contained page (inline SVG, CSS and script; nothing loaded from a network, so it opens
from disk): x is the token position (columns labelled with the prompt's tokens), y the
layer (token embeddings at the bottom, then each layer's features and errors, logits at the
top). Nodes are coloured by kind (feature, error, embedding, logit); edges are curves whose
width grows with ``|weight|`` and whose colour gives the sign. Hovering a node shows its
label, activation, influence and strongest inputs and outputs in the side panel; clicking
pins it and highlights its edges; ``index.html#node=<node_id>`` opens with a node pinned.

The layout is computed here, in Python, so the drawing is in the HTML itself (a browser's
``--dump-dom`` or a text search sees every node and edge); the script only handles the
panel. The page is rendered by jinja2 with autoescaping: token texts are untrusted.
Neuronpedia's viewer (circuit-tracer's ``frontend/assets/attribution_graph``) is the model
for the axes and colours, not its code.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from lightning_interp._io import atomic_write
from lightning_interp.circuits.graph_json import check_graph_json, process_token

_TEMPLATES = Path(__file__).parent / "templates"
_ROW = (30, 74)  # px between layer rows: at least, at most
_GRAPH_HEIGHT = 960  # px: deep models get rows closer together, down to the minimum
_SLOT = 18  # px per node side by side in one (layer, position) cell
_LOGIT_SLOT = 64  # px per logit: room for its token and probability
_MIN_COLUMN = 84  # px: room for a token label
_MIN_WIDTH = 900  # px: narrow graphs are spread to this width
_MARGIN = {"left": 64, "right": 24, "top": 48, "bottom": 58}
_KINDS = {
    "cross layer transcoder": "feature",
    "mlp reconstruction error": "error",
    "embedding": "embedding",
    "logit": "logit",
}


def _environment() -> Any:
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(_TEMPLATES),
        autoescape=True,  # prompt tokens are untrusted text
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _label(node: dict[str, Any], kind: str, tokens: list[str]) -> str:
    token = process_token(tokens[node["ctx_idx"]]) if node["ctx_idx"] < len(tokens) else "?"
    if node["clerp"]:
        return node["clerp"]
    if kind == "feature":
        layer, index = node["jsNodeId"].split("-")[0].split("_")
        return f"L{layer} feature {index} at “{token}”"
    if kind == "error":
        return f"L{node['layer']} MLP error at “{token}”"
    return f"Emb: “{token}”"


def _short_logit_label(node: dict[str, Any]) -> str:
    """``tok 0.62`` from circuit-tracer's ``Output "tok" (p=0.623)`` clerp."""
    match = re.fullmatch(r'Output "(.*)" \(p=([0-9.]+)\)', node["clerp"], re.S)
    return f"{match[1]} {float(match[2]):.2f}" if match else node["clerp"]


def _row(node: dict[str, Any], kind: str) -> int:
    """0 for embeddings, layer + 1 for features and errors, the logit layer for logits."""
    return 0 if kind == "embedding" else int(node["layer"]) + (0 if kind == "logit" else 1)


def layout(payload: dict[str, Any]) -> dict[str, Any]:
    """Positions of every node and edge of a graph JSON payload, and the axes.

    Returns:
        ``{"width", "height", "nodes", "edges", "columns", "rows"}``: nodes with ``x``,
        ``y``, ``kind``, ``label`` and the JSON fields; edges with their path, stroke width
        and sign, weakest first (strong edges are drawn on top).
    """
    tokens = payload["metadata"]["prompt_tokens"]
    nodes = []
    for node in payload["nodes"]:
        kind = _KINDS.get(node["feature_type"], "feature")
        short = _short_logit_label(node) if kind == "logit" else ""
        nodes.append({**node, "kind": kind, "label": _label(node, kind, tokens), "short": short})
    logit_rows = [_row(n, "logit") for n in nodes if n["kind"] == "logit"]
    top = max(logit_rows or [max((_row(n, n["kind"]) for n in nodes), default=0) + 1])
    step = min(_ROW[1], max(_ROW[0], _GRAPH_HEIGHT // max(top, 1)))
    cells: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    order = {"embedding": 0, "feature": 1, "error": 2, "logit": 3}
    for node in sorted(nodes, key=lambda n: (order[n["kind"]], n["feature"])):
        cells[(_row(node, node["kind"]), node["ctx_idx"])].append(node)
    n_pos = max([len(tokens)] + [n["ctx_idx"] + 1 for n in nodes])
    widths = [_MIN_COLUMN] * n_pos
    for (row, pos), members in cells.items():
        slot = _LOGIT_SLOT if row == top else _SLOT
        widths[pos] = max(widths[pos], slot * len(members) + 12)
    room = _MIN_WIDTH - _MARGIN["left"] - _MARGIN["right"]
    if sum(widths) < room:  # spread a small graph over the page, in proportion
        widths = [w * room / sum(widths) for w in widths]
    starts = [_MARGIN["left"] + sum(widths[:p]) for p in range(n_pos)]
    for (row, pos), members in cells.items():
        for k, node in enumerate(members):
            node["x"] = round(starts[pos] + (k + 0.5) * widths[pos] / len(members), 1)
            node["y"] = _MARGIN["top"] + (top - row) * step
            node["label_dy"] = -12 - 12 * (k % 2)  # neighbouring logit labels alternate
    by_id = {n["node_id"]: n for n in nodes}
    biggest = max((abs(link["weight"]) for link in payload["links"]), default=1.0) or 1.0
    edges = []
    for link in sorted(payload["links"], key=lambda e: abs(e["weight"])):
        s, t = by_id[link["source"]], by_id[link["target"]]
        middle = (s["y"] + t["y"]) / 2
        edges.append(
            {
                **link,
                "d": f"M{s['x']},{s['y']} C{s['x']},{middle} {t['x']},{middle} {t['x']},{t['y']}",
                "width": round(0.6 + 5.4 * abs(link["weight"]) / biggest, 2),
                "sign": "pos" if link["weight"] >= 0 else "neg",
            }
        )
    columns = [
        {"x": starts[p] + widths[p] / 2, "left": starts[p], "token": process_token(tokens[p])}
        for p in range(min(n_pos, len(tokens)))
    ]
    rows = [
        {
            "y": _MARGIN["top"] + (top - r) * step,
            "name": "Emb" if r == 0 else "Logit" if r == top else f"L{r - 1}",
        }
        for r in range(top + 1)
    ]
    height = _MARGIN["top"] + top * step + _MARGIN["bottom"]
    width = _MARGIN["left"] + sum(widths) + _MARGIN["right"]
    return {
        "width": width,
        "height": height,
        "nodes": nodes,
        "edges": edges,
        "columns": columns,
        "rows": rows,
    }


def render_graph_html(payload: dict[str, Any], *, scores: dict[str, float] | None = None) -> str:
    """The page for a graph JSON payload (see the module docstring).

    Args:
        payload: A :func:`~lightning_interp.circuits.graph_json.graph_to_json` payload.
        scores: Optional numbers shown in the header (e.g. replacement/completeness score).

    Raises:
        CorruptFileError: the payload is not in the graph JSON layout.
    """
    check_graph_json(payload)
    drawn = layout(payload)
    panel = {
        "nodes": {
            n["node_id"]: {
                key: n[key]
                for key in (
                    "label",
                    "kind",
                    "layer",
                    "ctx_idx",
                    "activation",
                    "influence",
                    "token_prob",
                )
            }
            for n in drawn["nodes"]
        },
        "links": [[e["source"], e["target"], e["weight"]] for e in drawn["edges"]],
        "tokens": [process_token(t) for t in payload["metadata"]["prompt_tokens"]],
    }
    return (
        _environment()
        .get_template("graph.html.j2")
        .render(meta=payload["metadata"], graph=drawn, panel=panel, scores=scores or {})
    )


def write_graph_html(
    payload: dict[str, Any], path: str | Path, *, scores: dict[str, float] | None = None
) -> Path:
    """Render and write the page atomically; returns its path."""
    path = Path(path)
    html = render_graph_html(payload, scores=scores)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: p.write_text(html, encoding="utf-8"))
    return path
