"""Cross-check of our attribution graphs against circuit-tracer 0.5.0, the reference.

Slow and opt-in (``pytest -m slow tests/circuits/test_circuit_tracer_crosscheck.py``):
circuit-tracer runs in its own virtualenv under ``benchmarks/.peers/circuit_tracer``,
created on first use by ``benchmarks/peers.py``; without PyPI access the test skips. Its
half is ``circuit_tracer_side.py``, run by that venv's python.

Both sides get the same tiny random GPT-2 (random biases and LayerNorm weights; circuit-tracer
builds it as a TransformerLens model from the same weights), the same ReLU per-layer
transcoders (reading the normalised MLP input, writing the MLP output) and the same token
ids. Compared: the logits, every feature activation, the whole adjacency (features,
errors, embeddings -> features and logits) and the replacement and completeness scores.

Our two deliberate deviations are made inert by the fixture, so the whole graphs can be
compared, not only their shared part:

- circuit-tracer zeroes the first (BOS) position's features and error; we do not. The
  transcoders are built so that the BOS position has no active feature (every encoder
  bias sits a margin below minus that position's pre-activation) and no error (each decoder
  bias is that position's MLP output), so both graphs have the same nodes and edges there.
- circuit-tracer's embedding node is the token embedding; ours is the whole residual
  entering block 0 (token plus position embedding). The position embeddings are zero;
  a second run with GPT-2's position embeddings checks that only the embedding columns
  then differ.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, safe_open, save_file

from lightning_interp import create_dictionary
from lightning_interp.circuits import PerLayerTranscoders, attribute
from lightning_interp.circuits.pruning import graph_scores
from tests.circuits import _tiny
from tests.zoo.test_peer_crosscheck import run_peer

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TOKENS = [0, 7, 23, 5, 41, 12, 33, 18]
D_LATENT = 32
ATOL, RTOL = 1e-5, 1e-4
SCRIPT = Path(__file__).parent / "circuit_tracer_side.py"


def bos_silent_transcoders(model) -> PerLayerTranscoders:
    """Random ReLU transcoders with no active feature and no error at position 0."""
    probe = _tiny.replacement(model, _tiny.random_transcoders(model.config.n_layer))
    run = probe.run(torch.tensor(TOKENS))
    generator = torch.Generator().manual_seed(3)
    layers = []
    for layer in range(model.config.n_layer):
        tc = create_dictionary(
            "standard",
            d_in=_tiny.D_MODEL,
            d_out=_tiny.D_MODEL,
            d_latent=D_LATENT,
            l1_coefficient=1.0,
            apply_b_dec_to_input=False,
        )
        w_enc = torch.randn(_tiny.D_MODEL, D_LATENT, generator=generator) * 0.5
        margin = torch.rand(D_LATENT, generator=generator) * 0.2 + 0.05
        with torch.no_grad():
            tc.W_enc.copy_(w_enc)
            tc.b_enc.copy_(-(run.mlp_in[layer][0] @ w_enc) - margin)
            tc.W_dec.copy_(torch.randn(D_LATENT, _tiny.D_MODEL, generator=generator) * 0.3)
            tc.b_dec.copy_(run.mlp_out[layer][0])
        layers.append(tc.eval())
    return PerLayerTranscoders(layers)


def both_graphs(root: Path, *, position_embeddings: bool):
    """Our graph and circuit-tracer's (its saved tensors and scores) for the same inputs."""
    torch.set_num_threads(1)
    model = _tiny.gpt2(seed=4)
    if not position_embeddings:
        with torch.no_grad():
            model.transformer.wpe.weight.zero_()
    transcoders = bos_silent_transcoders(model)
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if "lm_head" not in k}
    save_file(weights, str(root / "model.safetensors"))
    paths = []
    for layer in range(transcoders.n_layers):
        w_enc, b_enc = transcoders.encoder(layer)
        path = root / f"layer_{layer}.safetensors"
        tc = {
            "W_enc": w_enc.T,
            "b_enc": b_enc,
            "W_dec": transcoders.decoder(layer, layer),
            "b_dec": transcoders.output_bias(layer),
        }
        save_file({k: v.detach().contiguous() for k, v in tc.items()}, str(path))
        paths.append(str(path))
    config = model.config
    job = {
        "gpt2_config": {
            k: getattr(config, k)
            for k in ("n_layer", "n_embd", "n_head", "n_inner", "vocab_size", "n_positions")
        }
        | {"activation_function": "relu", "layer_norm_epsilon": config.layer_norm_epsilon},
        "model": str(root / "model.safetensors"),
        "transcoders": paths,
        "tokens": TOKENS,
        "out": str(root / "theirs.safetensors"),
    }
    # An absolute script path: run_peer joins it onto its own script folder unchanged.
    run_peer("circuit_tracer", str(SCRIPT), job, root)
    rm = _tiny.replacement(model, transcoders)
    ours = attribute(rm, torch.tensor(TOKENS), max_logits=10, logit_probability=0.95)
    with safe_open(job["out"], "pt") as f:
        scores = {k: float(v) for k, v in f.metadata().items()}
    return rm, ours, load_file(job["out"]), scores


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """Both graphs with the deviations made inert: the whole graphs must agree."""
    return both_graphs(tmp_path_factory.mktemp("circuit_tracer"), position_embeddings=False)


@pytest.fixture(scope="module")
def graphs_with_positions(tmp_path_factory):
    """Both graphs with GPT-2's position embeddings: our embedding nodes include them."""
    return both_graphs(tmp_path_factory.mktemp("circuit_tracer_wpe"), position_embeddings=True)


def report(name: str, mine: torch.Tensor, theirs: torch.Tensor) -> None:
    diff = (mine - theirs).abs().max().item()
    rel = diff / max(theirs.abs().max().item(), 1e-12)
    print(f"\n{name}: max |diff| {diff:.2e}, relative to max |value| {rel:.2e}")
    torch.testing.assert_close(mine, theirs, atol=ATOL, rtol=RTOL)


def test_logits_and_activations_match(graphs):
    rm, _, theirs, _ = graphs
    run = rm.run(torch.tensor(TOKENS))
    report("logits", run.logits, theirs["logits"])
    mine = torch.stack(run.activations)
    assert not mine[:, 0].any()  # the fixture's BOS position is silent, as circuit-tracer's
    report("feature activations", mine, theirs["activations"])
    assert (mine > 0).float().mean().item() > 0.2  # many active features, not a trivial graph


def test_nodes_match(graphs):
    _, ours, theirs, _ = graphs
    features = [ours.nodes[i] for i in ours.indices("feature")]
    keys = torch.tensor([[n.layer, n.position, n.index] for n in features])
    assert torch.equal(keys, theirs["active_features"])
    assert torch.equal(theirs["selected_features"], torch.arange(len(features)))
    report(
        "feature activation values",
        torch.tensor([n.activation for n in features]),
        theirs["activation_values"],
    )
    logits = [ours.nodes[i] for i in ours.indices("logit")]
    assert [n.index for n in logits] == theirs["logit_ids"].tolist()
    assert len(logits) > 1
    report(
        "logit probabilities",
        torch.tensor([n.activation for n in logits]),
        theirs["logit_probabilities"],
    )


def test_adjacency_matches(graphs):
    _, ours, theirs, _ = graphs
    adjacency = theirs["adjacency"]
    assert ours.adjacency.shape == adjacency.shape
    kinds = {k: ours.indices(k) for k in ("feature", "error", "embedding", "logit")}
    for target in ("feature", "logit"):
        for source in ("feature", "error", "embedding"):
            rows, cols = kinds[target], kinds[source]
            block = adjacency[rows][:, cols]
            assert block.abs().max() > 1e-3, (target, source)  # a block with real edges
            report(f"{source} -> {target} edges", ours.adjacency[rows][:, cols], block)
    report("whole adjacency", ours.adjacency, adjacency)


def test_scores_match(graphs):
    _, ours, _, scores = graphs
    replacement, completeness = graph_scores(ours)
    for name, mine in (("replacement", replacement), ("completeness", completeness)):
        theirs = scores[f"{name}_score"]
        print(
            f"\n{name}: ours {mine:.8f} circuit-tracer {theirs:.8f} |diff| {abs(mine - theirs):.1e}"
        )
    assert 0.05 < replacement < 0.95  # errors and features both carry influence
    assert replacement == pytest.approx(scores["replacement_score"], abs=1e-5)
    assert completeness == pytest.approx(scores["completeness_score"], abs=1e-5)


def test_position_embeddings_change_only_the_embedding_nodes(graphs_with_positions):
    """Our embedding node carries token plus position embedding, circuit-tracer's the token only.

    Every other edge (the gradients are the same; only the embedding vectors differ) and the
    activations still agree; the embedding columns do not.
    """
    rm, ours, theirs, _ = graphs_with_positions
    report("logits", rm.run(torch.tensor(TOKENS)).logits, theirs["logits"])
    adjacency = theirs["adjacency"]
    embedding = ours.indices("embedding")
    others = [i for i in range(len(ours.nodes)) if i not in embedding]
    report("edges from every non-embedding node", ours.adjacency[:, others], adjacency[:, others])
    gap = (ours.adjacency[:, embedding] - adjacency[:, embedding]).abs().max().item()
    print(f"embedding columns: max |ours - circuit-tracer| {gap:.3f}")
    assert gap > 1e-2
