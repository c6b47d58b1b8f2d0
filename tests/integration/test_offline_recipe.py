"""The MiniLM recipe as shipped (real packaged weights, real news text) through the real CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_interp import load_dictionary
from lightning_interp.cli import main

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_minilm_recipe_records_the_hub_model_behind_the_offline_alias(tmp_path, capsys):
    root = tmp_path / "run"
    main(
        [
            "fit",
            "--config=recipes/minilm_resid.yaml",
            f"--trainer.default_root_dir={root}",
            "--data.init_args.train_tokens=2048",
            "--data.init_args.val_tokens=1024",
            "--data.init_args.buffer_tokens=2048",
            "--data.init_args.batch_size=512",
            "--trainer.enable_progress_bar=false",
        ]
    )
    provenance = load_dictionary(root / "dictionary").config.provenance
    assert provenance.backbone == "sentence-transformers/all-MiniLM-L6-v2"
    assert provenance.extra["backbone_source"] == "offline:minilm"  # still loadable
    assert "Lee" in provenance.dataset and not provenance.dataset.startswith("offline:")
    metrics = json.loads((root / "metrics.json").read_text())
    assert metrics["fvu"] is not None and metrics["dead_window_tokens"] > 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main(["card", str(root / "dictionary")])
    assert done.value.code == 0
    card = capsys.readouterr().out
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"


def test_quickstart_logged_to_a_file_has_no_redrawn_bars(tmp_path):
    """`make demo > demo.log`: the real SmolLM2 GGUF load and a few steps, as plain lines."""
    log = tmp_path / "demo.log"
    script = Path(sys.executable).with_name("lightning-interp")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "lightning_interp.cli"]
    overrides = [
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        "--data.init_args.train_tokens=4096",
        "--data.init_args.val_tokens=2048",
        "--data.init_args.buffer_tokens=4096",
        "--data.init_args.downstream_contexts=2",
        "--model.init_args.dictionary.init_args.config.d_latent=1152",
    ]
    with open(log, "w") as out:
        done = subprocess.run(
            [*command, "fit", f"--config={REPO / 'recipes/quickstart.yaml'}", *overrides],
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=600,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
    text = log.read_text()
    assert done.returncode == 0, text[-3000:]
    assert "\r" not in text  # the GGUF de-quantisation bar and the training bar are off
    assert "de-quantizing" not in text
    assert "validation at step 2:" in text and "ce_loss_recovered" in text
