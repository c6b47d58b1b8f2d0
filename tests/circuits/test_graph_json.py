"""Neuronpedia/circuit-tracer graph JSON (schema, ids, refusals) and the lossless graph pair."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_interp.circuits.graph_json import (
    GRAPH_CONFIG,
    GRAPH_WEIGHTS,
    NODE_FIELDS,
    cantor_pairing,
    check_graph_json,
    graph_to_json,
    load_graph,
    read_graph_json,
    save_graph,
    update_graph_index,
    write_graph_json,
)
from lightning_interp.circuits.pruning import prune_graph
from lightning_interp.errors import CorruptFileError, NonFiniteError
from tests.circuits.graph_builders import make_graph, random_graph
from tests.circuits.test_pruning import two_branches


def test_nodes_links_and_metadata_have_the_layout_fields_and_types(tmp_path):
    graph = random_graph(0, n_features=10)
    payload = graph_to_json(prune_graph(graph), slug="toy", scan="toy-scan")
    path = write_graph_json(payload, tmp_path / "graph.json")
    back = json.loads(path.read_text(encoding="utf-8"))
    assert set(back) == {"metadata", "qParams", "nodes", "links"}
    assert back["metadata"] == {
        "slug": "toy",
        "scan": "toy-scan",
        "transcoder_list": [],
        "prompt_tokens": ["t0", "t1", "t2"],
        "prompt": "t0t1t2",
        "node_threshold": 0.8,
        "schema_version": 1,
    }
    assert back["qParams"] == {
        "pinnedIds": [],
        "supernodes": [],
        "linkType": "both",
        "clickedId": "",
        "sg_pos": "",
    }
    for node in back["nodes"]:
        assert list(node) == list(NODE_FIELDS)
        for key, types in NODE_FIELDS.items():
            assert isinstance(node[key], types), (key, node)
    assert {n["feature_type"] for n in back["nodes"]} >= {"embedding", "logit"}
    assert back["links"] and all(
        set(link) == {"source", "target", "weight"} for link in back["links"]
    )
    assert read_graph_json(path) == back


def test_ids_and_values_are_built_as_circuit_tracer_builds_them():
    graph = two_branches()  # f0 = layer 0 feature 3 at position 0; 2 layers; logit token 7
    payload = graph_to_json(
        prune_graph(graph, 1.0, 1.0), logit_tokens=lambda t: "\n" if t == 7 else "?"
    )
    nodes = {n["node_id"]: n for n in payload["nodes"]}
    assert set(nodes) == {"0_3_0", "1_4_0", "E_100_0", "3_7_0"}
    feature, embedding, logit = nodes["0_3_0"], nodes["E_100_0"], nodes["3_7_0"]
    assert feature["feature"] == cantor_pairing(0, 3) == 9 and feature["jsNodeId"] == "0_3-0"
    assert feature["feature_type"] == "cross layer transcoder" and feature["activation"] == 1.5
    assert embedding == {
        **embedding,
        "layer": "E",
        "feature": 0,
        "jsNodeId": "E_100-0",
        "activation": None,
    }
    assert logit["clerp"] == 'Output "⏎" (p=1.000)' and logit["is_target_logit"]
    assert logit["jsNodeId"] == "L_7-0" and logit["token_prob"] == 1.0 and logit["layer"] == "3"
    # influence is the cumulative share: emb0 (1.0 of 2.0) first, then f0, then f1.
    assert [nodes[i]["influence"] for i in ("E_100_0", "0_3_0", "1_4_0")] == pytest.approx(
        [0.5, 0.95, 1.0]
    )
    links = {(link["source"], link["target"]): link["weight"] for link in payload["links"]}
    assert links == {
        ("E_100_0", "0_3_0"): 2.0,
        ("E_100_0", "1_4_0"): -0.5,
        ("0_3_0", "3_7_0"): 9.0,
        ("1_4_0", "3_7_0"): -1.0,
    }


def test_an_error_id_colliding_with_a_layer0_feature_is_made_unique():
    # Feature 1 of layer 0 at position 0 and the error of layer 1 at position 0: both "0_1_0".
    edges = {("emb0", "f0"): 1.0, ("f0", "logit0"): 1.0, ("err1.0", "logit0"): 1.0}
    graph = make_graph(["a"], 2, [(0, 0, 1, 1.0)], [(5, 1.0)], edges)
    ids = [n["node_id"] for n in graph_to_json(prune_graph(graph, 1.0, 1.0))["nodes"]]
    assert "0_1_0" in ids and "0_1_0-error" in ids and len(set(ids)) == len(ids)


def test_a_list_of_transcoders_becomes_a_stable_custom_scan():
    pruned = prune_graph(two_branches())
    first = graph_to_json(pruned, scan=["a/l0", "a/l1"])["metadata"]
    assert first["scan"].startswith("custom-") and first["transcoder_list"] == ["a/l0", "a/l1"]
    assert graph_to_json(pruned, scan=["a/l0", "a/l1"])["metadata"]["scan"] == first["scan"]


def test_non_finite_values_are_refused_and_nothing_is_written(tmp_path):
    payload = graph_to_json(prune_graph(two_branches()))
    payload["links"][0]["weight"] = float("nan")
    with pytest.raises(NonFiniteError, match="non-finite"):
        write_graph_json(payload, tmp_path / "graph.json")
    assert list(tmp_path.iterdir()) == []
    graph = two_branches()
    graph.adjacency[0, 0] = float("inf")
    with pytest.raises(NonFiniteError):
        save_graph(graph, tmp_path / "g")
    assert not (tmp_path / "g" / GRAPH_CONFIG).exists()


def test_a_broken_graph_json_is_a_typed_error(tmp_path):
    payload = graph_to_json(prune_graph(two_branches()))
    del payload["nodes"][0]["ctx_idx"]
    with pytest.raises(CorruptFileError, match="ctx_idx"):
        check_graph_json(payload)
    payload = graph_to_json(prune_graph(two_branches()))
    payload["links"].append({"source": "nowhere", "target": "E_100_0", "weight": 1.0})
    with pytest.raises(CorruptFileError, match="not in 'nodes'"):
        check_graph_json(payload)
    (tmp_path / "x.json").write_text("[1, 2]")
    with pytest.raises(CorruptFileError):
        read_graph_json(tmp_path / "x.json")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_lossless_pair_round_trips_and_prunes_the_same(tmp_path, dtype):
    graph = random_graph(4, n_features=10)
    graph.adjacency = graph.adjacency.to(dtype)
    graph.meta["backbone"] = "tiny"
    save_graph(graph, tmp_path / "g")
    back = load_graph(tmp_path / "g")
    assert back.adjacency.dtype == dtype and torch.equal(back.adjacency, graph.adjacency)
    assert back.nodes == graph.nodes and back.meta == graph.meta
    assert (back.prompt, back.tokens, back.token_ids, back.n_layers) == (
        graph.prompt,
        graph.tokens,
        graph.token_ids,
        graph.n_layers,
    )
    a, b = prune_graph(graph, 0.6, 0.9), prune_graph(back, 0.6, 0.9)
    assert torch.equal(a.node_mask, b.node_mask) and torch.equal(a.edge_mask, b.edge_mask)


def test_a_damaged_pair_is_a_typed_error(tmp_path):
    save_graph(two_branches(), tmp_path / "g")
    config = json.loads((tmp_path / "g" / GRAPH_CONFIG).read_text())
    config["nodes"]["kind"].pop()
    (tmp_path / "g" / GRAPH_CONFIG).write_text(json.dumps(config))
    with pytest.raises(CorruptFileError, match="damaged"):
        load_graph(tmp_path / "g")
    (tmp_path / "g" / GRAPH_WEIGHTS).write_bytes(b"junk")
    with pytest.raises(CorruptFileError):
        load_graph(tmp_path / "g")


def test_the_graph_index_lists_each_slug_once(tmp_path):
    pruned = prune_graph(two_branches())
    for slug in ("a", "b", "a"):
        path = update_graph_index(tmp_path, graph_to_json(pruned, slug=slug)["metadata"])
    graphs = json.loads(path.read_text(encoding="utf-8"))["graphs"]
    assert path.name == "graph-metadata.json" and [g["slug"] for g in graphs] == ["b", "a"]
