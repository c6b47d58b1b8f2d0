"""``lightning-interp attribute`` end to end: tiny random GPT-2 + per-layer transcoders."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import transformers

from lightning_interp import create_dictionary
from lightning_interp.circuits.graph_json import load_graph, read_graph_json
from lightning_interp.cli import run_extra_command
from lightning_interp.dictionaries.config import Provenance
from lightning_interp.dictionaries.serialization import save_dictionary
from tests.metrics.lm_helpers import VOCAB, word_tokenizer

N_LAYERS, D_MODEL = 2, 16


@pytest.fixture(scope="module")
def transcoders(tmp_path_factory) -> Path:
    """``<root>/layer<l>/dictionary/`` per layer (an export's layout), provenance -> model."""
    root = tmp_path_factory.mktemp("attribute")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=N_LAYERS,
        n_embd=D_MODEL,
        n_head=2,
        n_positions=32,
        vocab_size=VOCAB,
        bos_token_id=1,
        eos_token_id=2,
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(root / "model")
    word_tokenizer().save_pretrained(root / "model")
    for layer in range(N_LAYERS):
        tc = create_dictionary("topk", d_in=D_MODEL, d_out=D_MODEL, d_latent=32, k=4)
        provenance = Provenance(
            backbone=str(root / "model"),
            site=f"layers.{layer}.mlp_in",
            site_out=f"layers.{layer}.mlp_out",
        )
        tc.config = dataclasses.replace(tc.config, provenance=provenance)
        save_dictionary(tc, root / "tcs" / f"layer{layer}" / "dictionary")
    return root


def test_the_command_writes_the_graph_json_the_full_graph_and_the_page(transcoders, capsys):
    out = transcoders / "out"
    code = run_extra_command(
        "attribute",
        [
            str(transcoders / "tcs"),
            "--prompt",
            "w4 w5 w6 w7",
            "--out",
            str(out),
            "--max-logits",
            "3",
        ],
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err
    payload = read_graph_json(out / "graph.json")
    assert payload["metadata"]["prompt"] == "w4 w5 w6 w7"
    index = json.loads((out / "graph-metadata.json").read_text(encoding="utf-8"))
    assert index == {"graphs": [payload["metadata"]]}
    assert payload["metadata"]["prompt_tokens"] == ["w4", "w5", "w6", "w7"]
    kinds = {n["feature_type"] for n in payload["nodes"]}
    assert {"embedding", "logit", "cross layer transcoder"} <= kinds
    assert sum(n["feature_type"] == "logit" for n in payload["nodes"]) <= 3
    graph = load_graph(out)
    scores = graph.meta["scores"]
    assert 0 <= scores["completeness"] <= 1 and 0 <= scores["replacement"] <= 1
    assert f"replacement score: {scores['replacement']:.4f}" in printed.out
    assert f"view: {out / 'index.html'}" in printed.out
    html = (out / "index.html").read_text(encoding="utf-8")
    assert html.count('<g class="node ') == len(payload["nodes"])
    # Re-pruning the saved graph needs no model and keeps fewer nodes at a lower threshold.
    code = run_extra_command(
        "attribute", [str(out), "--out", str(transcoders / "again"), "--node-threshold", "0.3"]
    )
    assert code == 0
    again = json.loads((transcoders / "again" / "graph.json").read_text(encoding="utf-8"))
    assert len(again["nodes"]) <= len(payload["nodes"])
    assert torch.equal(load_graph(transcoders / "again").adjacency, graph.adjacency)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["{root}/nowhere", "--prompt", "w4"], "is not a folder"),
        (["{root}", "--prompt", "w4"], "holds no transcoders"),
        (["{root}/tcs"], "--prompt is required"),
        (["{root}/tcs", "--prompt", "w4", "--node-threshold", "2"], "--node-threshold=2.0"),
        (["{root}/tcs", "--prompt", "w4", "--slug", "../x"], "cannot be used as a folder"),
    ],
)
def test_bad_input_is_one_typed_line_and_exit_2(transcoders, capsys, argv, says):
    argv = [a.replace("{root}", str(transcoders / "empty")) for a in argv]
    (transcoders / "empty").mkdir(exist_ok=True)
    (transcoders / "empty" / "tcs").mkdir(exist_ok=True)
    code = run_extra_command("attribute", [*argv, "--out", str(transcoders / "bad")])
    err = capsys.readouterr().err.strip()
    assert (
        code == 2
        and len(err.splitlines()) == 1
        and err.startswith("lightning-interp attribute: error:")
    )
    assert says in err


def test_a_missing_layer_is_refused(transcoders, capsys, tmp_path):
    import shutil

    shutil.copytree(transcoders / "tcs" / "layer1", tmp_path / "tcs" / "layer1")
    code = run_extra_command(
        "attribute", [str(tmp_path / "tcs"), "--prompt", "w4", "--out", str(tmp_path / "o")]
    )
    assert code == 2 and "layers [1]" in capsys.readouterr().err


def test_a_cross_layer_transcoder_folder_is_a_source(transcoders, capsys):
    from lightning_interp.circuits import CLTConfig, CrossLayerTranscoder

    torch.manual_seed(1)
    clt = CrossLayerTranscoder(
        CLTConfig(
            n_layers=N_LAYERS,
            d_latent=32,
            d_in=D_MODEL,
            activation="topk",
            k=4,
            backbone=str(transcoders / "model"),
        )
    )
    clt.save(transcoders / "clt")
    out = transcoders / "clt-out"
    code = run_extra_command(
        "attribute", [str(transcoders / "clt"), "--prompt", "w4 w5 w6", "--out", str(out)]
    )
    assert code == 0, capsys.readouterr().err
    graph = load_graph(out)
    assert graph.meta["transcoder_class"] == "CrossLayerTranscoder"
    payload = read_graph_json(out / "graph.json")
    assert sum(n["feature_type"] == "logit" for n in payload["nodes"]) >= 1
