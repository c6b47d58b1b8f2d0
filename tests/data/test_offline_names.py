"""``offline:`` names load as they are, and provenance records what they really are."""

import re

import pytest

from lightning_interp.backbones import Backbone
from lightning_interp.backbones.offline import resolve_offline_model
from lightning_interp.data import (
    EmbeddingDataModule,
    LanguageModelDataModule,
    VisionModelDataModule,
)
from lightning_interp.data.cache import ActivationCache
from lightning_interp.data.offline import (
    OFFLINE_DATASETS,
    SMOLLM2_GGUF,
    canonical_dataset_id,
    canonical_model_id,
    minilm_folder,
    smollm2_folder,
)
from lightning_interp.errors import ConfigError

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def test_model_aliases_name_their_hub_models():
    assert canonical_model_id("offline:smollm2") == SMOLLM2
    assert canonical_model_id("offline:minilm") == MINILM
    for other in ("gpt2", "EleutherAI/pythia-70m", "./models/mine", "offline:unknown", ""):
        assert canonical_model_id(other) == other
    # The packaged folders themselves are the same models.
    assert canonical_model_id(str(minilm_folder())) == MINILM
    assert canonical_model_id(str(smollm2_folder())) == SMOLLM2


def test_an_alias_resolves_to_its_package_folder():
    path, kwargs = resolve_offline_model("offline:smollm2", {"revision": None})
    assert path == str(smollm2_folder()) and kwargs == {"revision": None, "gguf_file": SMOLLM2_GGUF}
    assert resolve_offline_model("gpt2", {}) == ("gpt2", {})
    with pytest.raises(FileNotFoundError, match=r"offline:minilm.*offline:smollm2"):
        Backbone.from_pretrained("offline:smolm2")  # a typo: the known names are listed


def test_dataset_names_say_what_the_data_are():
    for name, description in OFFLINE_DATASETS.items():
        assert canonical_dataset_id(name) == description
        assert "offline:" not in description and " " in description  # never a fake Hub id
    assert "Wikipedia sample" in canonical_dataset_id("offline:wikipedia")
    assert canonical_dataset_id("hf:NeelNanda/pile-10k:train[:500]") == "NeelNanda/pile-10k"
    assert canonical_dataset_id("hf:imdb") == "imdb"
    assert canonical_dataset_id("data/texts.txt") == "data/texts.txt"


def test_data_modules_record_canonical_ids_and_keep_the_configured_names():
    language = LanguageModelDataModule("offline:smollm2", "layers.6.resid_post", context_size=64)
    provenance = language.provenance  # from the configuration alone: nothing is loaded
    assert language.backbone is None
    assert provenance["backbone"] == SMOLLM2 and provenance["context_size"] == 64
    assert provenance["dataset"] == OFFLINE_DATASETS["offline:wikipedia"]
    assert provenance["extra"]["backbone_source"] == "offline:smollm2"
    assert provenance["extra"]["dataset_source"] == "offline:wikipedia"
    assert "Q4_1" in provenance["extra"]["backbone_weights"]  # the weights are quantised
    embeddings = EmbeddingDataModule("offline:minilm", "offline:polarity")
    assert embeddings.provenance["backbone"] == MINILM
    assert re.match(r"200 movie-review sentences", embeddings.provenance["dataset"])
    vision = VisionModelDataModule("openai/clip-vit-base-patch32", "vision.layers.8.resid_post")
    assert vision.provenance["backbone"] == "openai/clip-vit-base-patch32"
    assert "scikit-learn" in vision.provenance["dataset"]


def test_an_embedding_cache_records_provenance_and_its_autocast(tiny_folders, tmp_path):
    cache = tmp_path / "cache"
    common = dict(pooling="mean", cache_dir=str(cache))
    written = EmbeddingDataModule(tiny_folders["bert"], tiny_folders["tsv"], **common)
    written.setup()
    metadata = ActivationCache(cache).metadata
    assert metadata["provenance"]["backbone"] == tiny_folders["bert"]  # a folder: unchanged
    assert "autocast_dtype" not in metadata
    mixed = EmbeddingDataModule(
        tiny_folders["bert"], tiny_folders["tsv"], autocast_dtype="bfloat16", **common
    )
    with pytest.raises(ConfigError, match="autocast_dtype=None but this data module has"):
        mixed.setup()  # embedded without autocast: not silently reused
