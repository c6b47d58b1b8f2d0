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
class name in its metadata. Imports only torch, safetensors and sae_lens.
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


def main(job_path: str) -> None:
    from sae_lens import SAE

    torch.set_num_threads(1)
    job = json.loads(Path(job_path).read_text())
    x = load_file(job["x"])["x"]
    for entry in job["load"]:
        write(entry["out"], SAE.load_from_disk(entry["folder"]), x)
    for entry in job["save"]:
        sae = create(entry)
        if entry.get("training"):
            sae.save_inference_model(entry["folder"])  # the training form's export
        else:
            sae.save_model(entry["folder"])
        write(entry["out"], SAE.load_from_disk(entry["folder"]), x)


if __name__ == "__main__":
    main(sys.argv[1])
