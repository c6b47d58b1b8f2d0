"""Folders laid out exactly as other libraries write them, from random tensors.

Each builder writes the files, names, shapes, dtypes and config keys of one library's
output (as read in that library's source, see lightning_interp/zoo/formats/*) and returns
the raw tensors, so tests can check our reader against formulas written from them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

D, F, D_OUT = 8, 32, 6


def rand(*shape: int, scale: float = 0.5) -> torch.Tensor:
    return torch.randn(*shape) * scale


def raw_params() -> dict[str, torch.Tensor]:
    """Raw (not ``nn.Linear``) parameters: W_enc [d, F], b_enc [F], W_dec [F, d], b_dec [d]."""
    return {"W_enc": rand(D, F), "b_enc": rand(F), "W_dec": rand(F, D), "b_dec": rand(D)}


def jumprelu_params() -> dict[str, torch.Tensor]:
    """:func:`raw_params` plus a positive JumpReLU ``threshold [F]``."""
    return {**raw_params(), "threshold": torch.rand(F) * 0.5}


def saelens_tensors(architecture: str, d_out: int = D) -> dict[str, torch.Tensor]:
    """SAELens state-dict names: W_enc [d, F], W_dec [F, d_out] (+ threshold / gate / skip)."""
    t = {"W_enc": rand(D, F), "W_dec": rand(F, d_out), "b_dec": rand(d_out)}
    if architecture == "gated":
        t.update(b_gate=rand(F), b_mag=rand(F), r_mag=rand(F, scale=0.1))
    else:
        t["b_enc"] = rand(F)
    if "jumprelu" in architecture:
        t["threshold"] = torch.rand(F) * 0.5 + 0.05
    if "skip" in architecture:
        t["W_skip"] = rand(d_out, D)
    return t


def write_saelens_v6(folder: Path, architecture: str, tensors: dict, **cfg_extra) -> Path:
    """cfg.json as SAELens 6.x ``SAEConfig.to_dict`` writes it, and sae_weights.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    transcoder = "transcoder" in architecture
    cfg = {
        "d_in": D,
        "d_sae": F,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": not transcoder,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": "6.18.0",
            "sae_lens_training_version": "6.18.0",
            "model_name": "gpt2",
            "hook_name": "blocks.3.ln2.hook_normalized"
            if transcoder
            else "blocks.3.hook_resid_post",
            "hook_head_index": None,
            "context_size": 128,
            "dataset_path": "Skylion007/openwebtext",
            "prepend_bos": True,
        },
    }
    if transcoder:
        cfg["metadata"]["hook_name_out"] = "blocks.3.hook_mlp_out"
        cfg["d_out"] = tensors["W_dec"].shape[1]
    cfg.update(cfg_extra)
    cfg["architecture"] = architecture
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors")
    )
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def write_saelens_legacy(folder: Path, tensors: dict, k: int) -> Path:
    """A flat pre-6.0 cfg.json (hook_point, activation_fn_str, activation_fn_kwargs)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "model_name": "gpt2",
        "hook_point": "blocks.1.hook_resid_pre",
        "hook_point_layer": 1,
        "hook_point_head_index": None,
        "d_in": D,
        "d_sae": F,
        "dtype": "float32",
        "device": "cpu",
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": k},
        "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": True,
        "normalize_activations": False,
        "context_size": 128,
        "dataset_path": "NeelNanda/pile-10k",
        "sae_lens_training_version": "3.5.0",
    }
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def write_sparsify(folder: Path, *, k: int, transcode: bool = False, skip: bool = False) -> dict:
    """sparsify ``SparseCoder.save_to_disk``: cfg.json (+ d_in) and sae.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    t = {
        "encoder.weight": rand(F, D),
        "encoder.bias": rand(F),
        "W_dec": rand(F, D),
        "b_dec": rand(D),
    }
    if skip:
        t["W_skip"] = rand(D, D)
    cfg = {
        "activation": "topk",
        "expansion_factor": 4,
        "normalize_decoder": True,
        "num_latents": F,
        "k": k,
        "multi_topk": False,
        "skip_connection": skip,
        "transcode": transcode,
        "d_in": D,
    }
    save_file(t, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    (folder.parent / "config.json").write_text(
        json.dumps(
            {
                "model": "EleutherAI/pythia-70m",
                "dataset": "EleutherAI/SmolLM2-135M-10B",
                "ctx_len": 2048,
            }
        )
    )
    return t


def dictionary_learning_state(dict_class: str, *, k: int = 3, threshold: float = 0.2) -> dict:
    """The state_dict of each dictionary_learning class, with its own parameter names."""
    linear = {"encoder.weight": rand(F, D), "encoder.bias": rand(F), "decoder.weight": rand(D, F)}
    if dict_class == "AutoEncoder":
        return {**linear, "bias": rand(D)}
    if dict_class == "AutoEncoderNew":
        return {**linear, "decoder.bias": rand(D)}
    if dict_class == "GatedAutoEncoder":
        return {
            "decoder_bias": rand(D),
            "encoder.weight": rand(F, D),
            "r_mag": rand(F, scale=0.1),
            "gate_bias": rand(F),
            "mag_bias": rand(F),
            "decoder.weight": rand(D, F),
        }
    if dict_class == "JumpReluAutoEncoder":
        return jumprelu_params()
    buffers = {"k": torch.tensor(k, dtype=torch.int), "threshold": torch.tensor(threshold)}
    if dict_class == "MatryoshkaBatchTopKSAE":
        return {**buffers, "group_sizes": torch.tensor([8, 24]), **raw_params()}
    return {
        **buffers,
        "decoder.weight": rand(D, F),
        "encoder.weight": rand(F, D),
        "encoder.bias": rand(F),
        "b_dec": rand(D),
    }


def write_dictionary_learning(
    folder: Path, dict_class: str, state: dict, *, k: int | None = 3
) -> Path:
    """trainer output: ae.pt (torch.save of the state dict) + config.json {trainer, buffer}."""
    folder.mkdir(parents=True, exist_ok=True)
    trainer = {
        "trainer_class": "TopKTrainer",
        "dict_class": dict_class,
        "activation_dim": D,
        "dict_size": F,
        "device": "cpu",
        "layer": 3,
        "lm_name": "EleutherAI/pythia-70m-deduped",
        "submodule_name": "resid_post_layer_3",
    }
    if k is not None:
        trainer["k"] = k
    torch.save(state, folder / "ae.pt")
    (folder / "config.json").write_text(
        json.dumps({"trainer": trainer, "buffer": {"ctx_len": 128}}, indent=4)
    )
    return folder


def write_gemma_scope_v1(folder: Path) -> dict:
    """params.npz with W_enc, b_enc, W_dec, b_dec, threshold (float32)."""
    folder.mkdir(parents=True, exist_ok=True)
    t = jumprelu_params()
    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in t.items()})
    return t


def write_gemma_scope_v2(folder: Path, *, affine: bool) -> dict:
    """params.safetensors with lower-case w_enc/w_dec (+ affine_skip_connection) + config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    t = {k.replace("W_", "w_"): v for k, v in jumprelu_params().items()}
    if affine:
        t["affine_skip_connection"] = rand(D, D)
    save_file(t, str(folder / "params.safetensors"))
    cfg = {
        "hf_hook_point_in": "model.layers.5.pre_feedforward_layernorm.output",
        "hf_hook_point_out": "model.layers.5.post_feedforward_layernorm.output",
        "width": F,
        "model_name": "google/gemma-3-1b-pt",
        "architecture": "jump_relu",
        "l0": 12,
        "affine_connection": affine,
        "type": "transcoder",
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    return t


def openai_state(activation: str, *, k: int = 3, tied: bool = False) -> dict:
    """``Autoencoder.state_dict()``: parameters, stats buffers, activation name and state."""
    state = {
        "pre_bias": rand(D),
        "latent_bias": rand(F),
        "encoder.weight": rand(F, D),
        "stats_last_nonzero": torch.zeros(F, dtype=torch.long),
        "latents_activation_frequency": torch.ones(F),
        "latents_mean_square": torch.zeros(F),
        "activation": activation,
        "activation_state_dict": {"k": k, "postact_fn": "ReLU"} if activation == "TopK" else {},
    }
    if not tied:
        state["decoder.weight"] = rand(D, F)
    return state
