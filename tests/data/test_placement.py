"""Data modules put their backbone on the trainer's root device and run it under autocast.

On this CPU machine the root device is the CPU; the same checks run on a GPU in the
one-shot GPU check (``pytest -m cuda``), where they are the ones that matter.
"""

import lightning as L
import pytest
import torch
from torch import nn

from lightning_interp.backbones import Backbone
from lightning_interp.data import (
    ActivationStream,
    EmbeddingDataModule,
    LanguageModelDataModule,
    VisionModelDataModule,
)
from lightning_interp.data.embed import embed
from tests.backbones.tiny_models import build
from tests.data.test_tokens import make_tokenizer, random_texts

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SITE = "layers.1.resid_post"


def first_rows(batch) -> torch.Tensor:
    """Activation batches are {site: rows}, labelled embeddings (embeddings, labels)."""
    return next(iter(batch.values())) if isinstance(batch, dict) else batch[0]


class Probe(L.LightningModule):
    """Records where the data module's batches and backbone are, and how its forward runs."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.layer = nn.Linear(width, 1)
        self.batch_devices: list[torch.device] = []
        self.forwards: list[tuple[torch.device, bool, torch.dtype]] = []

    def setup(self, stage: str) -> None:
        # Lightning has run the data module's setup: its backbone exists (if it streams).
        backbone = getattr(self.trainer.datamodule, "backbone", None)
        if backbone is not None:
            backbone.model.register_forward_pre_hook(self._record_forward, with_kwargs=True)

    def _record_forward(self, _module, args, kwargs):
        first = next(t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))
        kind = first.device.type
        autocast = torch.is_autocast_enabled(kind)
        self.forwards.append((first.device, autocast, torch.get_autocast_dtype(kind)))

    def on_before_batch_transfer(self, batch, dataloader_idx):
        self.batch_devices.append(first_rows(batch).device)  # as the data module produced it
        return batch

    def training_step(self, batch, batch_idx):
        return self.layer(first_rows(batch).float()).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def fit_two_steps(data, width, accelerator="cpu", presetup=False):
    probe = Probe(width)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    if presetup:
        data.setup("fit")  # before any trainer: the backbone loads where it loads by default
    trainer.fit(probe, datamodule=data)
    return probe, trainer.strategy.root_device


def language_data(tiny_folders, **kwargs):
    return LanguageModelDataModule(
        tiny_folders["gpt2"],
        SITE,
        text=tiny_folders["text"],
        context_size=16,
        batch_size=32,
        buffer_tokens=128,
        train_tokens=32 * 4,
        val_tokens=32,
        contexts_per_capture=4,
        **kwargs,
    )


def check_language_placement(tiny_folders, accelerator, autocast, presetup=False):
    data = language_data(tiny_folders, autocast_dtype=autocast)
    probe, root = fit_two_steps(data, 32, accelerator, presetup)
    assert data.backbone.device == root
    assert data.train_stream.output_device == root
    assert probe.batch_devices and all(d == root for d in probe.batch_devices)
    # The LM forward ran on the root device, under the configured autocast.
    assert probe.forwards
    assert all(device == root for device, _, _ in probe.forwards)
    assert all(on and dtype == getattr(torch, autocast) for _, on, dtype in probe.forwards)


@pytest.mark.parametrize("presetup", [False, True])
def test_language_backbone_and_stream_on_the_root_device(tiny_folders, presetup):
    check_language_placement(tiny_folders, "cpu", "bfloat16", presetup)


def test_vision_backbone_on_the_root_device(tiny_folders):
    data = VisionModelDataModule(
        tiny_folders["clip"],
        "vision.layers.1.resid_post",
        images="offline:digits",
        batch_size=34,
        buffer_tokens=136,
        images_per_capture=8,
        autocast_dtype="bfloat16",
    )
    probe, root = fit_two_steps(data, 32)
    assert data.backbone.device == root
    assert probe.batch_devices and all(d == root for d in probe.batch_devices)


def test_embedding_backbone_on_the_root_device(tiny_folders):
    data = EmbeddingDataModule(
        tiny_folders["bert"], tiny_folders["tsv"], pooling="mean", batch_size=8
    )
    _, root = fit_two_steps(data, 32)
    assert data.backbone.device == root


def test_embeddings_run_under_the_configured_autocast():
    backbone = Backbone(build("bert"), make_tokenizer())
    seen = []
    backbone.model.register_forward_pre_hook(
        lambda *_: seen.append(
            torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        )
    )
    texts = random_texts(3, seed=1)
    plain = embed(backbone, texts, "mean")
    mixed = embed(backbone, texts, "mean", autocast_dtype="bfloat16")
    assert seen == [None, torch.bfloat16]
    assert mixed.dtype == plain.dtype == torch.float32  # pooled in float32 either way
    # bf16 keeps ~3 significant digits: the same directions, not the same numbers.
    assert torch.nn.functional.cosine_similarity(mixed, plain).min() > 0.99


# ---------------------------------------------------------------------- on a GPU
@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("presetup", [False, True])
def test_language_model_forward_runs_on_the_gpu(tiny_folders, presetup):
    autocast = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    check_language_placement(tiny_folders, "gpu", autocast, presetup)


@pytest.mark.cuda
@cuda
def test_vision_and_embedding_backbones_on_the_gpu(tiny_folders):
    vision = VisionModelDataModule(
        tiny_folders["clip"],
        "vision.layers.1.resid_post",
        images="offline:digits",
        batch_size=34,
        buffer_tokens=136,
        images_per_capture=8,
    )
    probe, root = fit_two_steps(vision, 32, "gpu")
    assert root.type == "cuda" and vision.backbone.device == root
    assert all(d == root for d in probe.batch_devices)
    embeddings = EmbeddingDataModule(tiny_folders["bert"], tiny_folders["tsv"], pooling="mean")
    _, root = fit_two_steps(embeddings, 32, "gpu")
    assert embeddings.backbone.device == root


@pytest.mark.cuda
@cuda
def test_the_stream_syncs_with_the_gpu_only_inside_the_model(tiny_folders):
    backbone = Backbone.from_pretrained(tiny_folders["gpt2"], device="cuda")
    real_capture = backbone.capture

    def capture_unchecked(*args, **kwargs):
        # transformers' own forward may synchronise (mask checks); the stream's code may not.
        torch.cuda.set_sync_debug_mode(0)
        try:
            return real_capture(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    backbone.capture = capture_unchecked
    stream = ActivationStream(
        backbone,
        random_texts(30, seed=0),
        SITE,
        batch_size=32,
        context_size=16,
        contexts_per_capture=4,
        buffer_tokens=128,
    )
    torch.ones(1).pin_memory()  # initialise the pinned allocator before checking
    torch.cuda.set_sync_debug_mode("error")
    try:
        batches = list(stream)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    batches = [batch[SITE] for batch in batches]
    assert batches and all(b.device.type == "cuda" and b.shape == (32, 32) for b in batches)
