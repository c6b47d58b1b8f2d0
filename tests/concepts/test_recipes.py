"""The CLIP concept recipes parse and train with a tiny random CLIP (offline)."""

import json
import sys
from functools import partial

import lightning as L
import pytest
import torch
import yaml
from safetensors.torch import save_file

from lightning_interp.cli import build_cli
from lightning_interp.concepts import ConceptHead, LabelFreeCBM, PosthocCBM
from lightning_interp.data import EmbeddingDataModule
from lightning_interp.modules import ConceptBottleneckModule
from tests.backbones import tiny_models as tm
from tests.data.test_tokens import make_tokenizer

CLASSES = ["w40", "w41"]
PHRASES = ["w1", "w2 w3", "w4 w5 w6", "w7", "w8 w9", "w10 w11", "w12", "w13 w14 w15"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIP with a tokenizer, and 96 labelled images (red vs blue) on disk."""
    root = tmp_path_factory.mktemp("tiny_clip")
    tm.build("clip").save_pretrained(root / "clip")
    make_tokenizer().save_pretrained(root / "clip")
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(96) % 2
    pixels = 0.3 * torch.randn(96, 3, 32, 32, generator=g)
    pixels[labels == 0, 0] += 1.5  # class 0 is red, class 1 is blue
    pixels[labels == 1, 2] += 1.5
    meta = {"class_names": json.dumps(CLASSES)}
    save_file({"pixel_values": pixels, "labels": labels}, str(root / "images.safetensors"), meta)
    # The same images with concept labels ("red", "blue"), as the concept transformer wants.
    concepts = torch.stack([labels == 0, labels == 1], dim=1).float()
    tensors = {"pixel_values": pixels, "labels": labels, "concepts": concepts}
    save_file(tensors, str(root / "images_concepts.safetensors"), meta)
    return root


def tiny_clip_recipe(
    name, tiny_clip, tmp_path, *, data="images.safetensors", batch_size=64, **trainer
):
    """Recipe ``name`` rewritten for the tiny CLIP: ``(config, its model init_args)``.

    The trainer runs on CPU into ``tmp_path`` (``trainer`` overrides its settings), the head
    is saved to ``tmp_path/head`` and the data module reads ``data`` of the tiny world.
    """
    with open(f"recipes/{name}.yaml") as f:
        config = yaml.safe_load(f)
    config["trainer"].update(
        accelerator="cpu", default_root_dir=str(tmp_path), enable_progress_bar=False, **trainer
    )
    model = config["model"]["init_args"]
    model["save_dir"] = str(tmp_path / "head")
    config["data"]["init_args"].update(
        model=str(tiny_clip / "clip"),
        data=str(tiny_clip / data),
        batch_size=batch_size,
        test_fraction=0.25,
        cache_dir=str(tmp_path / "cache"),
    )
    return config, model


def fit_recipe(config, tmp_path):
    """Write ``config`` and run ``lightning-interp fit`` on it; the parsed CLI."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return build_cli(["fit", "--config", str(path)])


def recipe(name, tiny_clip, tmp_path):
    config, model = tiny_clip_recipe(name, tiny_clip, tmp_path, max_epochs=10)
    model["concepts"] = PHRASES  # the tiny tokenizer knows only w0..w49
    if "target_density" in model["head_kwargs"]:  # 8 concepts, not hundreds: allow more
        model["head_kwargs"]["target_density"] = 0.5
    # A random CLIP maps all texts close together: keep the filters on, thresholds loose.
    model["filters"].update(class_similarity=0.9999, mutual_similarity=0.9999, min_activation=None)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    "name,head_type", [("clip_label_free_cbm", LabelFreeCBM), ("clip_pcbm", PosthocCBM)]
)
def test_clip_recipe_parses_instantiates_and_trains(
    name, head_type, tiny_clip, tmp_path, monkeypatch
):
    monkeypatch.setattr(sys, "argv", ["lightning-interp"])  # LightningCLI also reads argv
    # The real `lightning-interp fit --config <recipe>`.
    parsed = build_cli(["fit", "--config", str(recipe(name, tiny_clip, tmp_path))])
    assert isinstance(parsed.model, ConceptBottleneckModule)
    assert parsed.model.hparams.head_name == head_type.head_type
    assert parsed.trainer.current_epoch == 10
    head = parsed.model.head
    assert isinstance(head, head_type)
    assert head.class_names == CLASSES and head.d_in == 16  # CLIP's projection width
    assert set(head.concept_names) <= set(PHRASES)
    # The head was saved at the end of training and reloads exactly.
    loaded = ConceptHead.from_pretrained(tmp_path / "head")
    x = parsed.datamodule.splits["test"][0]
    assert torch.equal(loaded(x).logits, head(x).logits)
    # Embeddings were cached: a second data module reads the same rows back.
    assert (tmp_path / "cache" / "manifest.json").is_file()
    again = EmbeddingDataModule(
        **{k: v for k, v in parsed.datamodule.hparams.items() if k[0] != "_"}
    )
    again.setup("fit")
    assert torch.equal(again.splits["train"][0], parsed.datamodule.splits["train"][0])
    report = parsed.model.filter_report
    assert report is not None and report.kept == head.concept_names
    tested = parsed.trainer.test(parsed.model, datamodule=parsed.datamodule, verbose=False)
    assert tested[0]["test/accuracy"] > 0.8  # red vs blue, through random CLIP features


def test_recipes_name_the_real_clip():
    for name in ("clip_label_free_cbm", "clip_pcbm"):
        with open(f"recipes/{name}.yaml") as f:
            config = yaml.safe_load(f)
        assert config["data"]["init_args"]["model"] == "openai/clip-vit-base-patch32"
        assert config["model"]["class_path"] == "lightning_interp.modules.ConceptBottleneckModule"


def test_text_data_module_builds_a_head_by_name(tmp_path, trainer_kwargs):
    """TSV sentences through a tiny BERT (mean pooling); the head is built from phrases."""
    torch.manual_seed(0)
    tm.build("bert").save_pretrained(tmp_path / "bert")
    make_tokenizer().save_pretrained(tmp_path / "bert")
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(120):
        label = i % 2
        words = torch.randint(10, 40, (6,), generator=g).tolist()
        marker = "w1 w1 w1" if label else "w2 w2 w2"  # the label word, said three times
        lines.append(f"{'yes' if label else 'no'}\t{marker} " + " ".join(f"w{w}" for w in words))
    (tmp_path / "data.tsv").write_text("\n".join(lines) + "\n")
    data = EmbeddingDataModule(
        str(tmp_path / "bert"), str(tmp_path / "data.tsv"), pooling="mean", batch_size=32
    )
    module = ConceptBottleneckModule(
        head_name="pcbm",
        head_kwargs={"lam": 0.001},
        concepts=["w1", "w2", "w3 w4", "w5"],
        filters={"max_length": 30, "mutual_similarity": 0.9999, "class_similarity": None},
        optimizer=partial(torch.optim.SGD, lr=0.5),
    )
    trainer = L.Trainer(max_epochs=10, **trainer_kwargs)
    trainer.fit(module, datamodule=data)
    assert data.class_names == ["no", "yes"] and module.head.concept_names[:2] == ["w1", "w2"]
    tested = trainer.test(module, datamodule=data, verbose=False)[0]
    assert tested["test/accuracy"] > 0.8


def test_concept_transformer_recipe_trains_on_clip_patch_tokens(tiny_clip, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-interp"])
    config, model = tiny_clip_recipe(
        "clip_concept_transformer",
        tiny_clip,
        tmp_path,
        data="images_concepts.safetensors",
        batch_size=32,
        precision="32-true",
        max_epochs=40,
    )
    model["head_kwargs"].update(heads=2)  # the tiny CLIP is 32 wide
    # 64 training images make 2 steps an epoch: a larger step than on real data.
    model["optimizer"]["init_args"]["lr"] = 0.01
    parsed = fit_recipe(config, tmp_path)
    head = parsed.model.head
    assert type(head).__name__ == "ConceptTransformer"
    assert head.concept_names == ["concept_0", "concept_1"] and head.d_in == 32
    # 32x32 images in 8x8 patches: 16 patches + the class token per image.
    assert parsed.datamodule.splits["train"][0].shape[1:] == (17, 32)
    tested = parsed.trainer.test(parsed.model, datamodule=parsed.datamodule, verbose=False)
    assert tested[0]["test/accuracy"] > 0.8  # red vs blue, through random CLIP tokens
