"""``lightning-interp attribute``: the attribution graph of one prompt, pruned, as files.

::

    lightning-interp attribute SOURCE --prompt "The capital of France is" --out graphs/paris

``SOURCE`` is one of

- a folder of per-layer transcoders, one sub-folder per layer, each a saved dictionary
  (``config.json`` + ``model.safetensors``) or an export holding one in ``dictionary/``
  (as :class:`~lightning_interp.callbacks.ExportDictionary` writes a multi-dictionary run);
  layers are ordered by each transcoder's recorded input site (``layers.<l>.…``), else by
  the number in the sub-folder's name;
- a cross-layer transcoder folder (``config.json`` + ``clt.safetensors``,
  :meth:`~lightning_interp.circuits.clt.CrossLayerTranscoder.save`);
- a graph folder this command wrote before (``attribution_graph.json``): the saved graph
  is pruned again at the given thresholds, with no model and no ``--prompt``.

``OUT`` receives ``<slug>.json`` (the pruned graph in circuit-tracer's / Neuronpedia's
layout, :mod:`.graph_json`) listed in ``graph-metadata.json`` (so circuit-tracer's local
viewer can serve the folder), ``attribution_graph.json`` + ``.safetensors`` (the whole graph,
for re-pruning), and ``index.html`` (the static view, :mod:`.graph_html`). The replacement
and completeness scores (:func:`~lightning_interp.circuits.pruning.graph_scores`) and the
paths are printed. Use one folder per prompt: a later run into the same folder replaces its
full graph and page (its ``<slug>.json`` files and index entries accumulate). Bad input is
one typed error line and exit code 2.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from lightning_interp._commands import PROG, run_command
from lightning_interp._io import check_folder_name
from lightning_interp.circuits.graph import AttributionGraph
from lightning_interp.circuits.graph_html import write_graph_html
from lightning_interp.circuits.graph_json import (
    GRAPH_CONFIG,
    graph_to_json,
    load_graph,
    save_graph,
    update_graph_index,
    write_graph_json,
)
from lightning_interp.circuits.pruning import check_fraction, graph_scores, prune_graph
from lightning_interp.errors import ConfigError, DictionaryNotFoundError

_LAYER_SITE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)(?:\.|$)")
_NUMBER = re.compile(r"(\d+)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} attribute", description=__doc__.split("\n")[0].replace("``", "")
    )
    add = parser.add_argument
    add("source", help="per-layer transcoder folder, CLT folder, or saved graph")
    add("--prompt", help="the prompt (not needed to re-prune a saved graph)")
    add("--out", required=True, help="output folder")
    add("--backbone", help="model (default: the transcoders' provenance)")
    parser.add_argument("--node-threshold", type=float, default=0.8, help="default 0.8")
    parser.add_argument("--edge-threshold", type=float, default=0.98, help="default 0.98")
    parser.add_argument("--max-feature-nodes", type=int, help="most feature nodes (default all)")
    parser.add_argument("--max-logits", type=int, default=10, help="most logit nodes")
    parser.add_argument("--logit-probability", type=float, default=0.95, help="default 0.95")
    parser.add_argument("--batch-size", type=int, default=32, help="targets per backward pass")
    parser.add_argument("--slug", default="graph", help="graph name; also <slug>.json")
    return parser


def attribute(argv: list[str]) -> int:
    """Entry point of ``lightning-interp attribute`` (see the module docstring)."""
    return run_command("attribute", _parser(), _run, argv)


def _layer_of(dictionary: Any, folder: Path) -> int:
    site = getattr(dictionary.config.provenance, "site", None) or ""
    if match := _LAYER_SITE.search(site):
        return int(match[1])
    if match := _NUMBER.search(folder.name):
        return int(match[1])
    raise ConfigError(
        f"{folder}: cannot tell the transcoder's layer (site {site!r}, no number in the "
        f"folder name); name the sub-folders by layer (layer0, layer1, ...)"
    )


def load_per_layer(folder: Path) -> tuple[Any, str | None]:
    """Per-layer transcoders from one sub-folder per layer; returns them and their backbone.

    Raises:
        DictionaryNotFoundError: no sub-folder holds a saved dictionary.
        ConfigError: layers missing, repeated, or not readable from sites or folder names.
    """
    from lightning_interp.circuits.plt import PerLayerTranscoders
    from lightning_interp.dictionaries.serialization import load_folder

    found: dict[int, Any] = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        saved = sub / "dictionary" if (sub / "dictionary" / "config.json").is_file() else sub
        if not (saved / "config.json").is_file():
            continue
        dictionary = load_folder(saved)
        layer = _layer_of(dictionary, sub)
        if layer in found:
            raise ConfigError(f"{folder} holds two transcoders for layer {layer}; keep one")
        found[layer] = dictionary
    if not found:
        raise DictionaryNotFoundError(
            f"{folder} holds no transcoders: give a folder with one saved transcoder per layer "
            f"(sub-folders with config.json, or <name>/dictionary/), a CLT folder "
            f"(clt.safetensors) or a graph folder ({GRAPH_CONFIG})"
        )
    if sorted(found) != list(range(len(found))):
        raise ConfigError(
            f"{folder} has transcoders for layers {sorted(found)}; attribution needs every "
            f"layer 0..{max(found)}: train the missing ones"
        )
    dictionaries = [found[layer] for layer in range(len(found))]
    backbones = {d.config.provenance.backbone for d in dictionaries} - {None}
    return PerLayerTranscoders(dictionaries), (backbones.pop() if len(backbones) == 1 else None)


def load_transcoders(source: str | Path) -> tuple[Any, str | None]:
    """A :class:`~lightning_interp.circuits.TranscoderSet` from ``source`` and its backbone."""
    folder = Path(source)
    if not folder.is_dir():
        raise DictionaryNotFoundError(f"{folder} is not a folder; give a transcoder folder")
    if (folder / "clt.safetensors").is_file():
        from lightning_interp.circuits.clt import CrossLayerTranscoder

        clt = CrossLayerTranscoder.load(folder)
        return clt, clt.config.backbone
    return load_per_layer(folder)


def _compute(args: argparse.Namespace) -> AttributionGraph:
    """The full graph of ``args.prompt``, its logit tokens' texts in ``meta``."""
    from lightning_interp.backbones import load_backbone
    from lightning_interp.circuits.attribution import attribute as attribute_graph
    from lightning_interp.circuits.replacement import ReplacementModel

    if not args.prompt:
        raise ConfigError("--prompt is required with transcoders; pass the text to attribute")
    transcoders, recorded = load_transcoders(args.source)
    name = args.backbone or recorded
    if not name:
        raise ConfigError(
            f"{args.source} records no backbone; pass --backbone (a Hub id or model folder)"
        )
    backbone = load_backbone(name)
    model = ReplacementModel(backbone, transcoders, transcoder_source=str(args.source))
    graph = attribute_graph(
        model,
        args.prompt,
        max_feature_nodes=args.max_feature_nodes,
        max_logits=args.max_logits,
        logit_probability=args.logit_probability,
        batch_size=args.batch_size,
    )
    tokenizer = getattr(backbone.tokenizer, "tokenizer", backbone.tokenizer)
    logit_ids = [graph.nodes[i].index for i in graph.indices("logit")]
    if tokenizer is not None:
        graph.meta["logit_tokens"] = [tokenizer.decode([t]) for t in logit_ids]
    return graph


def _run(args: argparse.Namespace) -> int:
    node_threshold = check_fraction("--node-threshold", args.node_threshold)
    edge_threshold = check_fraction("--edge-threshold", args.edge_threshold)
    slug = check_folder_name(args.slug, "--slug")
    source = Path(args.source)
    if (source / GRAPH_CONFIG).is_file():
        graph = load_graph(source)  # re-prune a saved graph: no model needed
    else:
        graph = _compute(args)
    replacement, completeness = graph_scores(graph)
    graph.meta["scores"] = {"replacement": replacement, "completeness": completeness}
    out = Path(args.out)
    if out.resolve() != source.resolve():
        save_graph(graph, out)
    pruned = prune_graph(graph, node_threshold, edge_threshold)
    payload = graph_to_json(pruned, slug=slug)
    json_path = write_graph_json(payload, out / f"{slug}.json")
    update_graph_index(out, payload["metadata"])
    scores = {"replacement": replacement, "completeness": completeness}
    html_path = write_graph_html(payload, out / "index.html", scores=scores)
    print(f"replacement score: {replacement:.4f}")
    print(f"completeness score: {completeness:.4f}")
    print(
        f"pruned: {len(payload['nodes'])} of {len(graph.nodes)} nodes, "
        f"{len(payload['links'])} edges (node threshold {node_threshold}, edge threshold "
        f"{edge_threshold})"
    )
    print(f"graph: {json_path}")
    print(f"full graph: {out / GRAPH_CONFIG}")
    print(f"view: {html_path}")
    return 0
