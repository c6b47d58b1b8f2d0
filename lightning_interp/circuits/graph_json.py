"""Attribution graphs on disk: Neuronpedia's graph JSON, and a lossless pair for re-pruning.

**Neuronpedia / circuit-tracer layout** (:func:`graph_to_json`, :func:`write_graph_json`):
the file circuit-tracer's ``utils/create_graph_files.py`` writes for its local server and
for Neuronpedia's graph viewer (models in ``frontend/graph_models.py``, schema version 1)::

    {"metadata": {"slug", "scan", "transcoder_list", "prompt_tokens", "prompt",
                  "node_threshold", "schema_version": 1},
     "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "",
                 "sg_pos": ""},
     "nodes": [{"node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob",
                "is_target_logit", "run_idx", "reverse_ctx_idx", "jsNodeId", "clerp",
                "influence", "activation"}, ...],
     "links": [{"source", "target", "weight"}, ...]}

Node ids and fields as circuit-tracer builds them: a feature is ``"{layer}_{feature}_{pos}"``
with ``feature`` the Cantor pairing of (layer, feature index) and ``feature_type`` ``"cross
layer transcoder"`` (also for per-layer transcoders, as circuit-tracer writes it); an error
``"0_{layer}_{pos}"`` (``feature`` -1, ``"mlp reconstruction error"``); a token embedding
``"E_{token_id}_{pos}"`` (layer ``"E"``, ``feature`` = position); a logit
``"{n_layers + 1}_{token_id}_{pos}"`` with ``token_prob``, ``is_target_logit`` (the most
likely) and the clerp ``Output "tok" (p=0.123)``. ``influence`` is the node's cumulative
influence share (lower = more influential), ``activation`` a feature's activation (``null``
otherwise). Links carry the raw direct-effect weight. Only nodes with a kept link, plus
every embedding and logit, are written.

Deviations, on purpose: an error id that collides with a layer-0 feature's id (error at
layer ``l``, position ``p`` vs feature ``l`` of layer 0 at ``p``: both ``"0_l_p"``) gets the
suffix ``"-error"`` (the viewer keys nodes by ``node_id``; a duplicate would merge two
nodes); a list of transcoder ids as ``scan`` becomes ``"custom-<sha256 prefix>"`` (stable)
instead of Python's per-process ``hash``.

:func:`update_graph_index` keeps ``graph-metadata.json``, the list of a folder's graphs
circuit-tracer's local viewer reads, so an output folder can be served by it as is.

**Lossless pair** (:func:`save_graph`, :func:`load_graph`): ``attribution_graph.safetensors``
(the full adjacency, its dtype kept) + ``attribution_graph.json`` (prompt, tokens, nodes,
meta), written as a crash-consistent pair, so a graph can be pruned again at other
thresholds without recomputing it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_interp._io import atomic_write, read_json
from lightning_interp._weights import paired_config, read_weights, write_weights_and_config
from lightning_interp.circuits.graph import AttributionGraph, GraphNode
from lightning_interp.circuits.pruning import PrunedGraph
from lightning_interp.errors import CorruptFileError, InvalidGraphError, NonFiniteError

SCHEMA_VERSION = 1
FEATURE_TYPES = {
    "feature": "cross layer transcoder",
    "error": "mlp reconstruction error",
    "embedding": "embedding",
    "logit": "logit",
}
#: Every node field of the layout and its JSON type(s).
NODE_FIELDS: dict[str, tuple[type, ...]] = {
    "node_id": (str,),
    "feature": (int,),
    "layer": (str,),
    "ctx_idx": (int,),
    "feature_type": (str,),
    "token_prob": (float, int),
    "is_target_logit": (bool,),
    "run_idx": (int,),
    "reverse_ctx_idx": (int,),
    "jsNodeId": (str,),
    "clerp": (str,),
    "influence": (float, int, type(None)),
    "activation": (float, int, type(None)),
}
GRAPH_INDEX = "graph-metadata.json"
GRAPH_FORMAT = "lightning-interp-attribution-graph"
GRAPH_WEIGHTS = "attribution_graph.safetensors"
GRAPH_CONFIG = "attribution_graph.json"


def process_token(text: str) -> str:
    """A token with newline, tab and carriage return made visible (circuit-tracer's marks)."""
    return text.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵")


def cantor_pairing(x: int, y: int) -> int:
    """One integer for the pair ``(x, y)``: circuit-tracer's global id of (layer, feature)."""
    return (x + y) * (x + y + 1) // 2 + y


def _scan(scan: str | Sequence[str] | None, graph: AttributionGraph) -> tuple[str, list[str]]:
    scan = graph.meta.get("scan", "lightning-interp") if scan is None else scan
    if isinstance(scan, str):
        return scan, []
    names = [str(s) for s in scan]
    digest = hashlib.sha256("-".join(names).encode("utf-8")).hexdigest()[:16]
    return f"custom-{digest}", names


def _node(
    graph: AttributionGraph,
    node: GraphNode,
    influence: float,
    logit_text: Callable[[int], str],
    target_logit: bool,
    clerps: Mapping[tuple[int, int], str],
) -> dict[str, Any]:
    pos = node.position
    record: dict[str, Any] = {"ctx_idx": pos, "feature_type": FEATURE_TYPES[node.kind]}
    if node.kind == "feature":
        layer, index = int(node.layer), int(node.index)  # type: ignore[arg-type]
        record |= {
            "node_id": f"{layer}_{index}_{pos}",
            "feature": cantor_pairing(layer, index),
            "layer": str(layer),
            "jsNodeId": f"{layer}_{index}-0",
            "clerp": clerps.get((layer, index), ""),
            "activation": float(node.activation),
        }
    elif node.kind == "error":
        record |= {
            "node_id": f"0_{node.layer}_{pos}",
            "feature": -1,
            "layer": str(node.layer),
            "jsNodeId": f"{node.layer}_{pos}-0",
        }
    elif node.kind == "embedding":
        record |= {
            "node_id": f"E_{node.index}_{pos}",
            "feature": pos,
            "layer": "E",
            "jsNodeId": f"E_{node.index}-{pos}",
        }
    else:
        layer = str(graph.n_layers + 1)
        prob = float(node.activation)
        record |= {
            "node_id": f"{layer}_{node.index}_{pos}",
            "feature": int(node.index),  # type: ignore[arg-type]
            "layer": layer,
            "token_prob": prob,
            "is_target_logit": target_logit,
            "jsNodeId": f"L_{node.index}-{pos}",
            "clerp": f'Output "{process_token(logit_text(int(node.index)))}" (p={prob:.3f})',  # type: ignore[arg-type]
        }
    defaults = {"token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0}
    ordered = {key: record.get(key, defaults.get(key, "")) for key in NODE_FIELDS}
    ordered["influence"] = float(influence)
    ordered["activation"] = record.get("activation")
    return ordered


def _recorded_logit_texts(graph: AttributionGraph) -> Callable[[int], str]:
    """Token id -> text from ``meta["logit_tokens"]`` (texts in logit order), else ``#<id>``."""
    ids = [graph.nodes[i].index for i in graph.indices("logit")]
    texts = dict(zip(ids, graph.meta.get("logit_tokens") or [], strict=False))
    return lambda token: texts.get(token, f"#{token}")


def graph_to_json(
    pruned: PrunedGraph,
    *,
    slug: str = "graph",
    scan: str | Sequence[str] | None = None,
    logit_tokens: Callable[[int], str] | None = None,
    clerps: Mapping[tuple[int, int], str] | None = None,
) -> dict[str, Any]:
    """The pruned graph in circuit-tracer's / Neuronpedia's JSON layout (module docstring).

    Args:
        pruned: A graph and what :func:`~lightning_interp.circuits.pruning.prune_graph` kept.
        slug: The graph's name (Neuronpedia's URL slug; also the file name circuit-tracer uses).
        scan: Which transcoders made the graph: a Neuronpedia scan id, or a list of
            transcoder ids. Default: ``graph.meta["scan"]``, else ``"lightning-interp"``.
        logit_tokens: Token id -> text for the logit labels. Default:
            ``graph.meta["logit_tokens"]`` (texts in logit order), else ``"#<id>"``.
        clerps: Optional labels of features, by ``(layer, feature index)``.

    Returns:
        A JSON-ready dict.
    """
    graph = pruned.graph
    logits = graph.indices("logit")
    if logit_tokens is None:
        logit_tokens = _recorded_logit_texts(graph)
    target = max(logits, key=lambda i: graph.nodes[i].activation)
    records: dict[int, dict[str, Any]] = {}
    for i in pruned.kept():
        node = graph.nodes[i]
        records[i] = _node(
            graph,
            node,
            pruned.cumulative_influence[i].item(),
            logit_tokens,
            i == target,
            clerps or {},
        )
    feature_ids = {
        r["node_id"] for r in records.values() if r["feature_type"] == FEATURE_TYPES["feature"]
    }
    for record in records.values():
        if record["feature_type"] == FEATURE_TYPES["error"] and record["node_id"] in feature_ids:
            record["node_id"] += "-error"
    targets, sources = pruned.edge_mask.nonzero(as_tuple=True)
    weights = graph.adjacency.detach().to("cpu")[targets, sources].tolist()
    links = [
        {"source": records[s]["node_id"], "target": records[t]["node_id"], "weight": w}
        for t, s, w in zip(targets.tolist(), sources.tolist(), weights, strict=True)
        if s in records and t in records
    ]
    linked = {link["source"] for link in links} | {link["target"] for link in links}
    nodes = [
        r
        for r in records.values()
        if r["node_id"] in linked or r["feature_type"] in ("embedding", "logit")
    ]
    scan_id, transcoders = _scan(scan, graph)
    metadata = {
        "slug": slug,
        "scan": scan_id,
        "transcoder_list": transcoders,
        "prompt_tokens": list(graph.tokens),
        "prompt": graph.prompt,
        "node_threshold": pruned.node_threshold,
        "schema_version": SCHEMA_VERSION,
    }
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": qparams, "nodes": nodes, "links": links}


def _non_finite_fields(payload: dict[str, Any]) -> list[str]:
    bad = []
    for node in payload["nodes"]:
        for key in ("token_prob", "influence", "activation"):
            value = node.get(key)
            if isinstance(value, float) and not math.isfinite(value):
                bad.append(f"node {node['node_id']} {key}={value}")
    for link in payload["links"]:
        if not math.isfinite(link["weight"]):
            bad.append(f"link {link['source']}->{link['target']} weight={link['weight']}")
    return bad


def write_graph_json(payload: dict[str, Any], path: str | Path) -> Path:
    """Write a :func:`graph_to_json` payload atomically (a crash leaves the old file or none).

    Raises:
        NonFiniteError: a NaN or infinite weight, influence, activation or probability
            (nothing is written).
    """
    path = Path(path)
    bad = _non_finite_fields(payload)
    if bad:
        raise NonFiniteError(
            f"refusing to write {path}: {len(bad)} non-finite values ({', '.join(bad[:3])}); "
            f"the attribution overflowed: attribute in float64 or check the transcoders"
        )
    text = json.dumps(payload, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))
    return path


def update_graph_index(folder: str | Path, metadata: dict[str, Any]) -> Path:
    """Add a graph's metadata to ``folder/graph-metadata.json`` (circuit-tracer's index).

    circuit-tracer's local viewer lists the graphs of a folder from this file
    (``{"graphs": [metadata, ...]}``); an entry with the same ``slug`` is replaced.

    Returns:
        The index's path.
    """
    path = Path(folder) / GRAPH_INDEX
    graphs = read_json(path).get("graphs", []) if path.is_file() else []
    if not isinstance(graphs, list):
        raise CorruptFileError(f"{path}: 'graphs' is not a list; delete the file to rebuild it")
    graphs = [g for g in graphs if not isinstance(g, dict) or g.get("slug") != metadata["slug"]]
    text = json.dumps({"graphs": [*graphs, metadata]}, indent=2, ensure_ascii=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))
    return path


def check_graph_json(payload: Any, source: str = "graph JSON") -> dict[str, Any]:
    """Return ``payload`` if it has the layout's fields and types, else raise.

    Raises:
        CorruptFileError: a missing section or field, a wrong type, or a link to no node.
    """

    def fail(problem: str) -> CorruptFileError:
        return CorruptFileError(f"{source}: {problem}; write it again with graph_to_json")

    if not isinstance(payload, dict) or not {"metadata", "qParams", "nodes", "links"} <= set(
        payload
    ):
        raise fail("not a graph (needs metadata, qParams, nodes and links)")
    for key in ("slug", "scan", "prompt", "prompt_tokens", "transcoder_list"):
        if key not in payload["metadata"]:
            raise fail(f"metadata has no {key!r}")
    ids = set()
    for node in payload["nodes"]:
        for key, types in NODE_FIELDS.items():
            value = node.get(key, ...) if isinstance(node, dict) else ...
            if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
                raise fail(f"node {node!r:.80} has no {key} of type {types[0].__name__}")
        ids.add(node["node_id"])
    for link in payload["links"]:
        if link.get("source") not in ids or link.get("target") not in ids:
            raise fail(f"link {link!r:.80} joins a node that is not in 'nodes'")
        if not isinstance(link.get("weight"), float | int):
            raise fail(f"link {link!r:.80} has no numeric weight")
    return payload


def read_graph_json(path: str | Path) -> dict[str, Any]:
    """Read and check a graph JSON file (see :func:`check_graph_json`)."""
    return check_graph_json(read_json(Path(path)), str(path))


# ---------------------------------------------------------------------------- lossless pair
def save_graph(graph: AttributionGraph, folder: str | Path) -> Path:
    """Save the whole graph losslessly in ``folder`` (adjacency as safetensors, rest JSON).

    Returns:
        The folder.

    Raises:
        NonFiniteError: NaN or Inf in the adjacency or an activation (nothing written).
        InvalidGraphError: ``meta`` holds something JSON cannot store.
    """
    folder = Path(folder)
    activations = [float(n.activation) for n in graph.nodes]
    if not all(math.isfinite(a) for a in activations):
        raise NonFiniteError(
            f"refusing to save {folder}: a node activation is NaN or Inf; check the forward pass"
        )
    values = {
        "format": GRAPH_FORMAT,
        "version": 1,
        "prompt": graph.prompt,
        "token_ids": list(graph.token_ids),
        "tokens": list(graph.tokens),
        "n_layers": graph.n_layers,
        "nodes": {
            "kind": [n.kind for n in graph.nodes],
            "layer": [n.layer for n in graph.nodes],
            "position": [n.position for n in graph.nodes],
            "index": [n.index for n in graph.nodes],
            "activation": activations,
        },
        "meta": graph.meta,
    }
    try:
        text = json.dumps(values, indent=1, ensure_ascii=False, allow_nan=False) + "\n"
    except (TypeError, ValueError) as err:
        raise InvalidGraphError(
            f"graph.meta cannot be saved as JSON ({err}); keep only numbers, strings, lists "
            f"and dicts in it"
        ) from err
    adjacency = graph.adjacency.detach().to("cpu").contiguous()
    return write_weights_and_config(
        folder, {"adjacency": adjacency}, text, weights_name=GRAPH_WEIGHTS, config_name=GRAPH_CONFIG
    )


def load_graph(folder: str | Path) -> AttributionGraph:
    """Load a graph saved by :func:`save_graph`.

    Raises:
        DictionaryNotFoundError: a file is missing.
        CorruptFileError: unreadable files, another format, or inconsistent sizes.
    """
    folder = Path(folder)
    config = paired_config(
        read_json(folder / GRAPH_CONFIG), folder / GRAPH_CONFIG, folder / GRAPH_WEIGHTS
    )
    if config.get("format") != GRAPH_FORMAT:
        raise CorruptFileError(
            f"{folder / GRAPH_CONFIG} is not an attribution graph (format "
            f"{config.get('format')!r}); pass a folder written by save_graph"
        )
    adjacency = read_weights(folder / GRAPH_WEIGHTS).get("adjacency")
    try:
        columns = config["nodes"]
        nodes = [
            GraphNode(kind, layer, int(pos), index, float(act))
            for kind, layer, pos, index, act in zip(
                columns["kind"],
                columns["layer"],
                columns["position"],
                columns["index"],
                columns["activation"],
                strict=True,
            )
        ]
        graph = AttributionGraph(
            prompt=str(config["prompt"]),
            token_ids=[int(t) for t in config["token_ids"]],
            tokens=[str(t) for t in config["tokens"]],
            nodes=nodes,
            adjacency=adjacency if adjacency is not None else torch.empty(0),
            n_layers=int(config["n_layers"]),
            meta=dict(config.get("meta") or {}),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptFileError(
            f"{folder / GRAPH_CONFIG} is damaged ({err}); save the graph again"
        ) from err
    if tuple(graph.adjacency.shape) != (len(nodes), len(nodes)):
        raise CorruptFileError(
            f"{folder / GRAPH_WEIGHTS}: adjacency {tuple(graph.adjacency.shape)} does not fit "
            f"{len(nodes)} nodes; save the graph again"
        )
    return graph
