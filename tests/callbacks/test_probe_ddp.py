"""DictionaryProbe under a real 2-process gloo DDP run: ranks step together, stay identical."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch

from lightning_interp import load_dictionary
from lightning_interp.callbacks import DictionaryProbe
from lightning_interp.metrics import FractionOfVarianceUnexplained
from tests.callbacks.users import DigitsData, DigitsMLP, digits
from tests.helpers import quiet_trainer


class DumpPerRank(L.Callback):
    """Writes each rank's probe dictionary and counters (ddp_spawn returns only weights)."""

    def __init__(self, probe: DictionaryProbe, folder: str) -> None:
        self.probe, self.folder = probe, folder

    def on_fit_end(self, trainer, pl_module) -> None:
        site_trainer = self.probe.trainers["net.1"]
        out = Path(self.folder) / f"rank{trainer.global_rank}"
        site_trainer.dictionary.save_pretrained(out, inference_form=False)
        counters = {
            "steps": site_trainer.steps,
            "tokens_seen": int(site_trainer.learner.tokens_seen),
            "rows_buffered": site_trainer.rows_buffered,
        }
        (out / "counters.json").write_text(json.dumps(counters))


def test_two_process_ddp_probe(tmp_path):
    torch.set_num_threads(1)
    probe = DictionaryProbe(
        "net.1", d_latent=256, k=8, batch_size=64, lr=3e-3, dirpath=str(tmp_path / "final")
    )
    L.seed_everything(0, verbose=False)
    module = DigitsMLP()
    trainer = quiet_trainer(
        max_epochs=6,
        devices=2,
        strategy="ddp_spawn",
        callbacks=[probe, DumpPerRank(probe, str(tmp_path))],
    )
    trainer.fit(module, DigitsData())
    ranks = [load_dictionary(tmp_path / f"rank{r}") for r in (0, 1)]
    counters = [json.loads((tmp_path / f"rank{r}" / "counters.json").read_text()) for r in (0, 1)]
    # Averaged gradients from one initialisation: the two ranks hold the same dictionary.
    for name, tensor in ranks[0].state_dict().items():
        assert torch.equal(tensor, ranks[1].state_dict()[name]), name
    assert counters[0]["steps"] == counters[1]["steps"] > 20
    # tokens_seen counts both ranks' rows: each step trains on 64 rows per rank.
    assert counters[0]["tokens_seen"] == counters[0]["steps"] * 64 * 2
    # Each rank captured its own half of the data (DistributedSampler), 6 epochs of it.
    assert counters[0]["rows_buffered"] == counters[1]["rows_buffered"] == 6 * 719
    # Rank 0 saved the final dictionary; it explains held-out activations of the model.
    final = load_dictionary(tmp_path / "final" / "net.1")
    x, _ = digits("val").tensors
    module.eval()
    with torch.no_grad():
        acts = module.net[1](module.net[0](x))
    fvu = FractionOfVarianceUnexplained()(final(acts), acts)
    assert fvu < 0.25, float(fvu)  # measured 0.13
