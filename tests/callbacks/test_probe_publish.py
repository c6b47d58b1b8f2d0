"""DictionaryProbe(push_to_hub=...) publishes through the zoo to a (loopback) Hub."""

from __future__ import annotations

import json

import lightning as L
import torch

from lightning_interp import load_dictionary
from lightning_interp.callbacks import DictionaryProbe
from tests.callbacks.users import DigitsData, DigitsMLP
from tests.helpers import quiet_trainer
from tests.zoo.conftest import hub  # noqa: F401  (the loopback Hub fixture)


def test_push_to_hub_publishes_each_site(hub):  # noqa: F811
    probe = DictionaryProbe(
        ["net.0", "net.1"], d_latent=128, k=4, batch_size=128, push_to_hub="org/probe"
    )
    L.seed_everything(0, verbose=False)
    quiet_trainer(max_epochs=2, callbacks=[probe]).fit(DigitsMLP(), DigitsData())
    for site in ("net.0", "net.1"):
        loaded = load_dictionary("org/probe", site=site)
        assert loaded.config.provenance.site == site
        for name, tensor in probe.dictionaries[site].state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[name], tensor)
    from huggingface_hub import hf_hub_download

    metrics = json.loads(open(hf_hub_download("org/probe", "net.1/metrics.json")).read())
    assert metrics["l0"] == 4.0 and 0 < metrics["fvu"] < 1
