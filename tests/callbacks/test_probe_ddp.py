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


def test_two_process_ddp_probe_resumes_each_ranks_buffer(tmp_path):
    """3 epochs + checkpoint + resume to 6 equals 6 straight epochs, on both ranks."""
    torch.set_num_threads(1)

    def fit(folder: Path, epochs: int, ckpt_path: str | None = None) -> None:
        # The plan is made for the run the probe first sees (3 epochs here, 6 straight) and
        # kept on resume: pin it, so the two runs train alike.
        probe = DictionaryProbe("net.1", d_latent=256, k=8, batch_size=64, replay=2, lr=3e-3)
        L.seed_everything(0, verbose=False)
        checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=folder / "ckpt", save_last=True)
        trainer = quiet_trainer(
            max_epochs=epochs,
            devices=2,
            strategy="ddp_spawn",
            enable_checkpointing=True,
            callbacks=[probe, DumpPerRank(probe, str(folder)), checkpoint],
        )
        # No dropout: Lightning does not restore the global RNG, so only a deterministic
        # user run can be compared bitwise across a resume.
        trainer.fit(DigitsMLP(dropout=0.0), DigitsData(shuffle=False), ckpt_path=ckpt_path)

    fit(tmp_path / "straight", 6)
    fit(tmp_path / "resumed", 3)
    last = torch.load(tmp_path / "resumed" / "ckpt" / "last.ckpt", weights_only=True)
    (probe_state,) = (v for k, v in last["callbacks"].items() if k.startswith("DictionaryProbe"))
    assert len(probe_state["sites"]["net.1"]["ranks"]) == 2  # both ranks' buffers saved
    fit(tmp_path / "resumed", 6, ckpt_path=str(tmp_path / "resumed" / "ckpt" / "last.ckpt"))
    for rank in (0, 1):
        straight = load_dictionary(tmp_path / "straight" / f"rank{rank}").state_dict()
        resumed = load_dictionary(tmp_path / "resumed" / f"rank{rank}").state_dict()
        for name, tensor in straight.items():
            assert torch.equal(resumed[name], tensor), (rank, name)
