"""The MiniLM recipe as shipped (real packaged weights, real news text) through the real CLI."""

import json

import pytest
import yaml

from lightning_interp import load_dictionary
from lightning_interp.cli import main

pytestmark = pytest.mark.integration


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
