"""Every data module of ``lightning_interp.data`` implements the ActivationSource contract.

The contract is what training modules and callbacks read (and all they read): a backbone,
canonical sites and their widths, provenance, scales and downstream inputs. Each data module
is built here on a tiny backbone (or a tiny cache) and checked for real values: the widths
it announces are those of the rows it serves.
"""

from __future__ import annotations

import importlib

import lightning as L
import pytest
import torch

import lightning_interp.data as data_package
from lightning_interp.backbones import Backbone, load_backbone
from lightning_interp.data import (
    ActivationCacheWriter,
    ActivationDataModule,
    ActivationSource,
    CachedActivations,
    EmbeddingDataModule,
    ImageTextDataModule,
    LanguageModelDataModule,
    VisionModelDataModule,
    activation_source,
)
from lightning_interp.errors import LightningInterpDeprecationWarning

PAIR = ["layers.0.mlp_in", "layers.0.mlp_out"]


def language(tiny_folders, tmp_path):
    return LanguageModelDataModule(
        tiny_folders["gpt2"],
        ["layers.0.mlp_in", "layers.2.resid_post"],
        text=tiny_folders["text"],
        context_size=16,
        batch_size=16,
        buffer_tokens=128,
        val_tokens=32,
        contexts_per_capture=4,
        downstream_contexts=4,
    )


def vision(tiny_folders, tmp_path):
    return VisionModelDataModule(
        tiny_folders["clip"], "vision.layers.1.resid_post", batch_size=16, buffer_tokens=64
    )


def cache(tiny_folders, tmp_path):
    rows = {"in": torch.randn(96, 8), "out": torch.randn(96, 3)}
    metadata = {"provenance": {"backbone": "org/model", "dataset": "org/data"}}
    with ActivationCacheWriter(
        tmp_path / "cache",
        sites=list(rows),
        widths={"in": 8, "out": 3},
        normalization={"in": 0.5},
        metadata=metadata,
    ) as writer:
        writer.add(rows)
    return ActivationDataModule(
        cache_dir=str(tmp_path / "cache"), batch_size=16, apply_normalization=True
    )


def embeddings(tiny_folders, tmp_path):
    return EmbeddingDataModule(tiny_folders["bert"], tiny_folders["tsv"], pooling="mean")


def image_text(tiny_folders, tmp_path):
    from tests.backbones.tiny_vlms import FAMILIES, build
    from tests.data.test_tokens import make_tokenizer

    build("idefics3").save_pretrained(tmp_path / "vlm")
    make_tokenizer().save_pretrained(tmp_path / "vlm")
    return ImageTextDataModule(
        str(tmp_path / "vlm"),
        "layers.1.resid_post",
        caption="w1 w2 w3",
        batch_size=16,
        buffer_tokens=64,
        images_per_capture=3,
        image_size=FAMILIES["idefics3"][-1],
    )


#: A builder for every data module exported from lightning_interp.data: a new one must be
#: added here (test_every_exported_data_module_is_covered) and so checked.
BUILDERS = {
    LanguageModelDataModule: language,
    VisionModelDataModule: vision,
    ActivationDataModule: cache,
    EmbeddingDataModule: embeddings,
    ImageTextDataModule: image_text,
}
EXPECTED_SITES = {
    LanguageModelDataModule: ["layers.0.mlp_in", "layers.2.resid_post"],
    VisionModelDataModule: ["vision.layers.1.resid_post"],
    ActivationDataModule: ["in", "out"],
    EmbeddingDataModule: ["embeddings"],
    ImageTextDataModule: ["layers.1.resid_post"],
}


def test_every_exported_data_module_is_covered():
    exported = {
        getattr(data_package, name)
        for name in data_package.__all__
        if isinstance(getattr(data_package, name), type)
        and issubclass(getattr(data_package, name), L.LightningDataModule)
    }
    assert exported == set(BUILDERS)
    assert all(cls.__name__.endswith("DataModule") for cls in exported)


def first_rows(batch) -> dict[str, torch.Tensor]:
    """{site: rows} of an activation batch; an embedding batch is (embeddings, labels)."""
    return batch if isinstance(batch, dict) else {"embeddings": batch[0]}


@pytest.mark.parametrize("cls", list(BUILDERS), ids=lambda cls: cls.__name__)
def test_every_data_module_is_an_activation_source(cls, tiny_folders, tmp_path):
    source = BUILDERS[cls](tiny_folders, tmp_path)
    # The static check reads no member: nothing is loaded or estimated by it.
    assert activation_source(source) is source and source.backbone is None
    source.setup("fit")
    assert isinstance(source, ActivationSource)
    assert source.sites == EXPECTED_SITES[cls]
    batch = first_rows(next(iter(source.train_dataloader())))
    if cls is not EmbeddingDataModule:
        assert list(batch) == source.sites  # batches are keyed by the canonical sites
    # The announced widths are those of the served rows.
    assert source.site_widths == {site: rows.shape[-1] for site, rows in batch.items()}
    assert isinstance(source.provenance, dict) and isinstance(source.downstream_inputs(), list)
    assert all(isinstance(v, float) and v > 0 for v in source.scales.values())
    if cls is ActivationDataModule:
        assert source.backbone is None  # a cache holds no backbone
    else:
        assert isinstance(source.backbone, Backbone)


def test_the_language_source_gives_token_contexts_for_downstream_metrics(tiny_folders, tmp_path):
    source = language(tiny_folders, tmp_path)
    source.setup()
    inputs = source.downstream_inputs()
    assert len(inputs) == 1 and inputs[0]["input_ids"].shape == (4, 16)
    assert source.provenance["context_size"] == 16 and source.scales == {}


def test_the_cache_source_reads_its_manifest(tiny_folders, tmp_path):
    source = cache(tiny_folders, tmp_path)
    assert source.site_widths == {"in": 8, "out": 3}
    assert source.provenance == {"backbone": "org/model", "dataset": "org/data"}
    assert source.scales == {"in": 0.5}  # apply_normalization: the manifest's factors
    assert source.downstream_inputs() == []


def test_objects_that_are_not_sources():
    assert activation_source(None) is None
    assert activation_source(object()) is None
    assert activation_source(CachedActivations) is None  # a dataset, not a data module


@pytest.mark.parametrize(
    ("module", "old", "new"),
    [
        ("lm_datamodule", "LanguageModelActivations", LanguageModelDataModule),
        ("lm_datamodule", "load_backbone", load_backbone),
        ("image_datamodule", "VisionModelActivations", VisionModelDataModule),
        ("datamodule", "CachedActivations", CachedActivations),
        ("embeddings", "EmbeddingDataModule", EmbeddingDataModule),
    ],
)
def test_old_names_still_import_with_a_deprecation_warning(module, old, new):
    package = importlib.import_module(f"lightning_interp.data.{module}")
    with pytest.warns(LightningInterpDeprecationWarning, match=f"{old} is deprecated"):
        assert getattr(package, old) is new
    with pytest.raises(AttributeError):
        package.NoSuchName  # noqa: B018


def test_batch_format_is_deprecated_and_ignored(tiny_folders, tmp_path):
    with pytest.warns(DeprecationWarning, match="batch_format is deprecated and ignored"):
        LanguageModelDataModule(tiny_folders["gpt2"], PAIR, batch_format="dict")
