"""Circuits: cross-layer transcoders, replacement models and attribution graphs."""

from lightning_interp.circuits.attribution import attribute, salient_logits
from lightning_interp.circuits.clt import CrossLayerTranscoder
from lightning_interp.circuits.clt_config import CLTConfig, clt_memory
from lightning_interp.circuits.connections import FeatureConnections, connections
from lightning_interp.circuits.graph import AttributionGraph, GraphNode, NodeKind
from lightning_interp.circuits.graph_html import write_graph_html
from lightning_interp.circuits.graph_json import (
    graph_to_json,
    load_graph,
    read_graph_json,
    save_graph,
    write_graph_json,
)
from lightning_interp.circuits.interventions import InterventionReport, check_interventions
from lightning_interp.circuits.plt import PerLayerTranscoders
from lightning_interp.circuits.pruning import PrunedGraph, graph_scores, prune_graph
from lightning_interp.circuits.replacement import ReplacementModel, ReplacementRun
from lightning_interp.circuits.transcoder_set import TranscoderSet

__all__ = [
    "CLTConfig",
    "CrossLayerTranscoder",
    "clt_memory",
    "AttributionGraph",
    "GraphNode",
    "NodeKind",
    "PrunedGraph",
    "graph_scores",
    "graph_to_json",
    "load_graph",
    "prune_graph",
    "read_graph_json",
    "save_graph",
    "write_graph_html",
    "write_graph_json",
    "PerLayerTranscoders",
    "ReplacementModel",
    "ReplacementRun",
    "attribute",
    "salient_logits",
    "InterventionReport",
    "check_interventions",
    "FeatureConnections",
    "connections",
    "TranscoderSet",
]
