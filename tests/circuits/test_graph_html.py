"""The static attribution-graph page: layout, escaping, no network, and a real browser."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lightning_interp.circuits.graph_html import layout, render_graph_html, write_graph_html
from lightning_interp.circuits.graph_json import graph_to_json
from lightning_interp.circuits.pruning import prune_graph
from lightning_interp.errors import CorruptFileError
from tests.circuits.graph_builders import random_graph
from tests.features.test_dashboard import assert_not_blank, chromium, needs_chromium

HOSTILE = "<img src=x onerror=alert(1)>"


@pytest.fixture
def payload():
    graph = random_graph(0, n_layers=4, n_pos=5, n_features=30)
    graph.tokens = ["The", " cat", " sat", HOSTILE, " the"]
    graph.meta["logit_tokens"] = [" mat", " floor"]
    return graph_to_json(prune_graph(graph, 0.9, 0.98))


@pytest.fixture
def page(payload, tmp_path: Path) -> Path:
    return write_graph_html(payload, tmp_path / "index.html", scores={"replacement": 0.5})


def test_axes_put_tokens_left_to_right_and_layers_bottom_to_top(payload):
    drawn = layout(payload)
    nodes = drawn["nodes"]
    y = {kind: {n["y"] for n in nodes if n["kind"] == kind} for kind in ("embedding", "logit")}
    assert len(y["embedding"]) == 1 and len(y["logit"]) == 1
    assert y["logit"] == {min(n["y"] for n in nodes)}  # logits on top (SVG y grows down)
    assert y["embedding"] == {max(n["y"] for n in nodes)}
    for a in nodes:
        for b in nodes:
            if a["kind"] == b["kind"] == "feature" and int(a["layer"]) < int(b["layer"]):
                assert a["y"] > b["y"]
            if a["ctx_idx"] < b["ctx_idx"] and a["kind"] != "logit" != b["kind"]:
                assert a["x"] < b["x"]
    widths = [e["width"] for e in drawn["edges"]]
    assert widths == sorted(widths) and max(widths) == pytest.approx(6.0)
    assert {e["sign"] for e in drawn["edges"]} == {"pos", "neg"}


def test_the_page_holds_every_node_and_edge_and_loads_nothing(payload, page: Path):
    html = page.read_text(encoding="utf-8")
    assert len(re.findall(r'<g class="node (feature|error|embedding|logit)"', html)) == len(
        payload["nodes"]
    )
    assert len(re.findall(r'<path class="edge (pos|neg)"', html)) == len(payload["links"])
    assert not re.search(r"(src|href)=\"(https?:)?//", html) and "@import" not in html
    assert HOSTILE not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert 'replacement <b class="score">0.500</b>' in html


def test_a_deep_model_gets_closer_rows():
    spacing = []
    for n_layers in (2, 40):
        graph = random_graph(0, n_layers=n_layers, n_features=10 * n_layers)
        rows = layout(graph_to_json(prune_graph(graph, 1.0, 1.0)))["rows"]
        assert len(rows) == n_layers + 2  # embeddings, every layer, logits
        spacing.append(rows[0]["y"] - rows[1]["y"])
    assert spacing == [74, 30]  # at most 74 px apart; a deep model down to 30 px


def test_a_payload_that_is_not_a_graph_is_refused():
    with pytest.raises(CorruptFileError):
        render_graph_html({"nodes": []})


@needs_chromium
def test_a_browser_draws_the_graph_and_shows_a_pinned_node(payload, page: Path, tmp_path: Path):
    target = max(payload["nodes"], key=lambda n: n["feature_type"] == "logit" and n["token_prob"])
    incoming = [link for link in payload["links"] if link["target"] == target["node_id"]]
    dom = chromium(tmp_path, "--dump-dom", f"{page.as_uri()}#node={target['node_id']}")
    assert len(re.findall(r'<g class="node [a-z]+( picked)?"', dom)) == len(payload["nodes"])
    assert len(re.findall(r'<path class="edge (pos|neg)', dom)) == len(payload["links"])
    assert f'data-node="{target["node_id"]}"' in dom  # the panel shows the pinned logit
    assert 'Output " mat" (p=0.600)' in dom
    rows = re.search(r'<table id="inputs">(.*?)</table>', dom, re.S).group(1)
    assert rows.count('<tr class="link">') == min(8, len(incoming)) > 0
    assert len(re.findall(r'class="edge (pos|neg) on"', dom)) == len(incoming)
    assert "<img" not in dom


@needs_chromium
def test_the_screenshot_is_not_blank(page: Path, tmp_path: Path):
    shot = tmp_path / "graph.png"
    chromium(tmp_path, f"--screenshot={shot}", page.as_uri())
    assert_not_blank(shot)
