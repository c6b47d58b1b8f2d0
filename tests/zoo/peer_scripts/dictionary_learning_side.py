"""dictionary_learning's half of the format cross-check; run by its peer venv's python.

Usage: ``python dictionary_learning_side.py JOB.json``. The job names an input ``x`` (a
safetensors file with tensor ``x``) and a list ``save`` of dictionaries to make. Each is
written by dictionary_learning's own ``trainSAE`` with ``steps=0``: it builds the trainer
from the trainer config, writes ``trainer_0/config.json`` (``{"trainer": trainer.config}``)
and, after the (empty) loop, ``trainer_0/ae.pt`` (the state dict), exactly as a finished
run does. The trainer class is wrapped so that its freshly built dictionary gets seeded
random weights (and an optional inference ``threshold``) before ``trainSAE`` saves it.

For each dictionary, ``encode(x)`` (its default ``encode``), ``decode`` of those codes, and
for BatchTopK also ``encode(x, use_threshold=False)`` (the batch-level selection it trains
with) and its decoding go to the entry's ``out`` safetensors file. Imports only torch,
safetensors and dictionary_learning.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# Run as a script by a peer venv's python: its own folder holds the shared helpers.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_common import randomise  # noqa: E402


def trainer_factory(entry: dict, built: list):
    """A stand-in for the trainer class: the real trainer, with randomised weights."""
    from dictionary_learning import dictionary

    # "<module>.<Class>" under dictionary_learning.trainers, e.g. "top_k.TopKTrainer".
    module, name = entry["trainer"].rsplit(".", 1)
    trainer_cls = getattr(importlib.import_module(f"dictionary_learning.trainers.{module}"), name)

    def build(**config):
        if "dict_class" in entry:  # e.g. the April-update trainer with AutoEncoderNew
            config["dict_class"] = getattr(dictionary, entry["dict_class"])
        trainer = trainer_cls(**config)
        randomise(trainer.ae, entry["seed"])
        if entry.get("threshold") is not None:  # an inference threshold, as after training
            with torch.no_grad():
                trainer.ae.threshold.fill_(entry["threshold"])
        built.append(trainer)
        return trainer

    return build


def main(job_path: str) -> None:
    from dictionary_learning.training import trainSAE

    torch.set_num_threads(1)
    job = json.loads(Path(job_path).read_text())
    x = load_file(job["x"])["x"]
    for entry in job["save"]:
        built: list = []
        config = {
            "trainer": trainer_factory(entry, built),
            "steps": 10_000,  # the schedule length a real run declares (>= warm-up steps)
            "activation_dim": x.shape[-1],
            "lm_name": "EleutherAI/pythia-70m-deduped",
            "layer": 3,
            "submodule_name": "resid_post_layer_3",
            "device": "cpu",
            **entry["kwargs"],
        }
        trainSAE(iter([x]), [config], steps=0, save_dir=entry["folder"], device="cpu")
        ae = built[0].ae.eval()
        with torch.no_grad():
            codes = ae.encode(x)
            tensors = {"codes": codes, "decoded": ae.decode(codes)}
            if entry["trainer"].endswith("BatchTopKTrainer"):
                tensors["codes_batch"] = ae.encode(x, use_threshold=False)
                tensors["decoded_batch"] = ae.decode(tensors["codes_batch"])
        save_file({k: v.contiguous() for k, v in tensors.items()}, entry["out"])


if __name__ == "__main__":
    main(sys.argv[1])
