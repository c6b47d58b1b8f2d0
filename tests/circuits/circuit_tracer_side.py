"""circuit-tracer's half of ``test_circuit_tracer_crosscheck.py``, run by the peer venv's python.

Reads a job (JSON): a GPT-2 config and its weights (safetensors, transformers' names), one
ReLU transcoder per layer (safetensors in circuit-tracer's ``SingleLayerTranscoder`` layout:
``W_enc``/``W_dec`` ``[d_transcoder, d_model]``) and the prompt's token ids. Builds
circuit-tracer 0.5.0's TransformerLens ``ReplacementModel`` on those weights, reading
``mlp.hook_in`` (the MLP input after ``ln2``'s weight and bias, as our ``mlp_in`` site;
TransformerLens's ``ln2.hook_normalized`` precedes them) and writing ``hook_mlp_out``; runs
its ``attribute`` and ``compute_graph_scores``; writes the graph, the dense feature
activations, the logits and the scores.
Imports nothing from this repository (its venv has circuit-tracer, not lightning_interp).
"""

from __future__ import annotations

import json
import sys

import torch
import transformers
from safetensors.torch import load_file, save_file

# circuit-tracer and TransformerLens are imported inside the functions: pytest's
# --doctest-modules imports this file in the main venv, which has neither.


class IdTokenizer:
    """What ``attribute`` asks of a tokenizer: the logit targets' labels and the vocab size."""

    def __init__(self, vocab_size: int, bos_id: int) -> None:
        self.vocab_size = vocab_size
        self.padding_side = "right"  # read by TransformerLens's forward
        # ensure_tokenized prepends a special token unless the prompt starts with one.
        self.all_special_ids = [bos_id]

    def decode(self, ids) -> str:
        return str(ids)


def hooked_gpt2(job: dict) -> tuple:
    """TransformerLens config and weights of the job's GPT-2 (no LayerNorm folding)."""
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    hf_config = transformers.GPT2Config(**job["gpt2_config"])
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    missing, unexpected = hf.load_state_dict(load_file(job["model"]), strict=False)
    # lm_head.weight is tied to the token embedding, so it is not in the file.
    allowed = (".attn.bias", ".masked_bias", "lm_head.weight")
    assert not unexpected and all(k.endswith(allowed) for k in missing), (missing, unexpected)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    cfg = HookedTransformerConfig(
        n_layers=hf_config.n_layer,
        d_model=hf_config.n_embd,
        d_head=hf_config.n_embd // hf_config.n_head,
        n_heads=hf_config.n_head,
        d_mlp=hf_config.n_inner,
        d_vocab=hf_config.vocab_size,
        n_ctx=hf_config.n_positions,
        act_fn="relu",
        normalization_type="LN",
        eps=hf_config.layer_norm_epsilon,
        model_name="tiny-gpt2",
        original_architecture="GPT2LMHeadModel",
        device="cpu",
        dtype=torch.float32,
    )
    return cfg, convert_gpt2_weights(hf, cfg)


def main(job_path: str) -> None:
    """Run circuit-tracer on the job and write its outputs to ``job["out"]``."""
    from circuit_tracer import attribute
    from circuit_tracer.graph import compute_graph_scores
    from circuit_tracer.replacement_model.replacement_model_transformerlens import (
        TransformerLensReplacementModel,
    )
    from circuit_tracer.transcoder.single_layer_transcoder import (
        SingleLayerTranscoder,
        TranscoderSet,
    )

    torch.set_num_threads(1)
    job = json.loads(open(job_path).read())
    cfg, state = hooked_gpt2(job)
    layers = {}
    for layer, path in enumerate(job["transcoders"]):
        weights = load_file(path)
        d_transcoder, d_model = weights["W_enc"].shape
        tc = SingleLayerTranscoder(
            d_model, d_transcoder, torch.relu, layer, device="cpu", dtype=torch.float32
        )
        tc.load_state_dict(weights)
        layers[layer] = tc
    transcoders = TranscoderSet(
        layers, feature_input_hook="mlp.hook_in", feature_output_hook="hook_mlp_out"
    )
    model = TransformerLensReplacementModel(cfg)
    model.load_and_process_state_dict(
        state,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
    )
    model._configure_replacement_model(transcoders)
    model.tokenizer = IdTokenizer(cfg.d_vocab, job["tokens"][0])
    tokens = torch.tensor(job["tokens"])
    logits, activations = model.get_activations(tokens, sparse=False)
    graph = attribute(tokens, model, batch_size=64)
    replacement, completeness = compute_graph_scores(graph)
    save_file(
        {
            "adjacency": graph.adjacency_matrix.float().contiguous(),
            "active_features": graph.active_features.long().contiguous(),
            "selected_features": graph.selected_features.long().contiguous(),
            "activation_values": graph.activation_values.float().contiguous(),
            "logit_ids": graph.logit_token_ids.long().contiguous(),
            "logit_probabilities": graph.logit_probabilities.float().contiguous(),
            "activations": activations.float().contiguous(),
            "logits": logits[0].float().contiguous(),
        },
        job["out"],
        metadata={"replacement_score": repr(replacement), "completeness_score": repr(completeness)},
    )


if __name__ == "__main__":
    main(sys.argv[1])
