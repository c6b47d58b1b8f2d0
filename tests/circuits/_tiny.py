"""Tiny random GPT-2 / Llama models and transcoders for the circuits tests."""

from __future__ import annotations

import torch
import transformers

from lightning_interp import create_dictionary
from lightning_interp.backbones import Backbone
from lightning_interp.circuits import PerLayerTranscoders
from lightning_interp.circuits._freeze import FreezeState
from lightning_interp.circuits.replacement import ReplacementModel, ReplacementRun

D_MODEL = 16


def gpt2(seed: int = 0, n_layer: int = 2) -> transformers.GPT2LMHeadModel:
    """A ReLU GPT-2 whose biases and norm weights are random (so bias terms are tested)."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=n_layer,
        n_embd=D_MODEL,
        n_head=2,
        n_inner=32,
        vocab_size=50,
        activation_function="relu",
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
            elif ".ln_" in name and name.endswith("weight"):
                param.uniform_(0.5, 1.5)
    return model


def llama(seed: int = 0, n_layer: int = 2) -> transformers.LlamaForCausalLM:
    """A Llama with grouped-query attention."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        num_hidden_layers=n_layer,
        hidden_size=D_MODEL,
        intermediate_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=50,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.LlamaForCausalLM(config).eval()


def exact_transcoders(model: transformers.GPT2LMHeadModel) -> PerLayerTranscoders:
    """Transcoders whose features are a ReLU GPT-2 MLP's hidden neurons (exact)."""
    layers = []
    for block in model.transformer.h:
        tc = create_dictionary(
            "standard",
            d_in=D_MODEL,
            d_out=D_MODEL,
            d_latent=32,
            l1_coefficient=1.0,
            apply_b_dec_to_input=False,
        )
        with torch.no_grad():
            tc.W_enc.copy_(block.mlp.c_fc.weight)
            tc.b_enc.copy_(block.mlp.c_fc.bias)
            tc.W_dec.copy_(block.mlp.c_proj.weight)
            tc.b_dec.copy_(block.mlp.c_proj.bias)
        layers.append(tc)
    return PerLayerTranscoders(layers)


def random_transcoders(n_layers: int = 2, seed: int = 1, k: int = 6) -> PerLayerTranscoders:
    """Imperfect TopK transcoders with nonzero biases."""
    torch.manual_seed(seed)
    layers = []
    for _ in range(n_layers):
        tc = create_dictionary("topk", d_in=D_MODEL, d_out=D_MODEL, d_latent=24, k=k)
        with torch.no_grad():
            tc.b_enc.normal_(0, 0.1)
            tc.b_dec.normal_(0, 0.1)
        layers.append(tc)
    return PerLayerTranscoders(layers)


def replacement(model, transcoders) -> ReplacementModel:
    return ReplacementModel(Backbone(model), transcoders)


def replay(run: ReplacementRun) -> FreezeState:
    """The run's attention patterns and norm scales, to replay."""
    return FreezeState("replay", run.freeze.patterns, run.freeze.scales)


def source_free(rm: ReplacementModel, run: ReplacementRun) -> tuple[torch.Tensor, list]:
    """Logits and MLP inputs of the frozen model with every graph source set to zero.

    The frozen model is affine in its sources (feature writes, errors, embeddings), so
    this is the constant (bias) term that completeness adds to the edge sums.
    """
    mlp_in: list = []

    def codes(layer, x):
        mlp_in.append(x[0])
        return torch.zeros(1, x.shape[1], rm.transcoders.d_latent(layer))

    logits = rm.forward(
        run.input_ids,
        codes_fn=codes,
        error_fn=lambda _l, out, _r: torch.zeros_like(out),
        freeze=replay(run),
        embed_fn=torch.zeros_like,
    )
    return logits[0], mlp_in
