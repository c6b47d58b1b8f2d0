"""SAELens's half of the format cross-check; run by the SAELens peer venv's python.

Usage: ``python saelens_side.py JOB.json``. The job names an input ``x`` (a safetensors file
with tensor ``x``) and two lists:

- ``load``: folders lightning-interp wrote with ``write_folder(..., format="saelens")``;
  each is loaded with SAELens's own ``SAE.load_from_disk``.
- ``save``: SAEs SAELens creates itself (an inference class from its registry, or a training
  class exported with ``save_inference_model``), fills with seeded random weights and saves
  with its own ``save_model``; the outputs are those of the SAE as loaded back by SAELens.

For each, ``encode(x)``, ``decode(encode(x))`` and ``forward(x)`` (which adds a skip
transcoder's ``x @ W_skip.T``) go to the entry's ``out`` safetensors file, with the SAELens
class name in its metadata.

An optional ``downstream`` entry asks for SAELens's own downstream metrics (CE loss score,
KL divergence score) of one SAE folder on a saved transformers GPT-2 and fixed token
batches: the GPT-2 weights are converted into a TransformerLens ``HookedTransformer``
without any weight processing (so its hook points carry the same activations), and
``sae_lens.evals.run_evals`` runs on them with each ``exclude_special_tokens`` setting
asked for. Imports only torch, safetensors, sae_lens and the transformer_lens and
transformers it depends on.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# Run as a script by a peer venv's python: its own folder holds the shared helpers.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_common import randomise  # noqa: E402


def outputs(sae, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        codes = sae.encode(x)
        return {"codes": codes, "decoded": sae.decode(codes), "forward": sae(x)}


def write(out: str, sae, x: torch.Tensor) -> None:
    tensors = {k: v.contiguous() for k, v in outputs(sae, x).items()}
    save_file(tensors, out, metadata={"class": type(sae).__name__})


def create(entry: dict):
    """An SAE of ``entry["architecture"]`` built from SAELens's registries."""
    from sae_lens.registry import get_sae_class, get_sae_training_class

    getter = get_sae_training_class if entry.get("training") else get_sae_class
    sae_cls, cfg_cls = getter(entry["architecture"])
    sae = sae_cls(cfg_cls(**entry["cfg"]))
    randomise(sae, entry["seed"])
    with torch.no_grad():
        for name, value in entry.get("buffers", {}).items():  # e.g. a BatchTopK threshold
            getattr(sae, name).fill_(value)
    return sae


class TokenBatches:
    """The part of SAELens's ``ActivationsStore`` that ``run_evals`` uses: token batches.

    ``get_downstream_reconstruction_metrics`` asks for ``n_batches`` batches of
    ``batch_size`` contexts; this serves the job's fixed tokens in order.
    """

    def __init__(self, tokens: torch.Tensor, batch_size: int) -> None:
        self.tokens, self.store_batch_size_prompts = tokens, batch_size
        self.context_size = tokens.shape[1]
        self.position = 0

    def get_batch_tokens(self, batch_size: int | None = None, **_: object) -> torch.Tensor:
        size = batch_size or self.store_batch_size_prompts
        batch = self.tokens[self.position : self.position + size]
        self.position += size
        return batch

    def reset_input_dataset(self) -> None:
        self.position = 0


def hooked_gpt2(folder: str):
    """A transformers GPT-2 folder as a HookedTransformer with the very same computation."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
    from transformers import AutoTokenizer, GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer,
        d_model=c.n_embd,
        n_heads=c.n_head,
        d_head=c.n_embd // c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd,
        d_vocab=c.vocab_size,
        n_ctx=c.n_positions,
        act_fn=c.activation_function,
        eps=c.layer_norm_epsilon,
        normalization_type="LN",
        positional_embedding_type="standard",
        original_architecture="GPT2LMHeadModel",
        default_prepend_bos=False,
    )
    model = HookedTransformer(cfg)
    # No folding or centring (as from_pretrained_no_processing): they would change what the
    # residual-stream hooks carry, and SAEs are evaluated on unprocessed models.
    model.load_and_process_state_dict(
        convert_gpt2_weights(hf, cfg),
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
    )
    model.set_tokenizer(AutoTokenizer.from_pretrained(folder))
    return model.eval()


def downstream(entry: dict) -> None:
    """SAELens's ``run_evals`` CE and KL metrics, written as JSON to ``entry["out"]``."""
    from sae_lens import SAE
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler
    from sae_lens.util import get_special_token_ids

    model = hooked_gpt2(entry["model"])
    sae = SAE.load_from_disk(entry["sae"])
    tokens = load_file(entry["tokens"])["tokens"]
    batch_size = entry["batch_size"]
    config = EvalConfig(
        batch_size_prompts=batch_size,
        n_eval_reconstruction_batches=tokens.shape[0] // batch_size,
        compute_kl=True,
        compute_ce_loss=True,
    )
    results = {
        "hook_name": sae.cfg.metadata.hook_name,
        "special_token_ids": sorted(get_special_token_ids(model.tokenizer)),
    }
    for exclude in entry["exclude_special_tokens"]:
        metrics, _ = run_evals(
            sae,
            TokenBatches(tokens, batch_size),
            model,
            ActivationScaler(),
            config,
            exclude_special_tokens=exclude,
        )
        results[f"exclude_{str(exclude).lower()}"] = {
            **metrics["model_performance_preservation"],
            **metrics["model_behavior_preservation"],
        }
    Path(entry["out"]).write_text(json.dumps(results, indent=1))


def main(job_path: str) -> None:
    from sae_lens import SAE

    torch.set_num_threads(1)
    job = json.loads(Path(job_path).read_text())
    x = load_file(job["x"])["x"] if "x" in job else None
    for entry in job.get("load", []):
        write(entry["out"], SAE.load_from_disk(entry["folder"]), x)
    for entry in job.get("save", []):
        sae = create(entry)
        if entry.get("training"):
            sae.save_inference_model(entry["folder"])  # the training form's export
        else:
            sae.save_model(entry["folder"])
        write(entry["out"], SAE.load_from_disk(entry["folder"]), x)
    if "downstream" in job:
        downstream(job["downstream"])


if __name__ == "__main__":
    main(sys.argv[1])
