"""A LightningDataModule of frozen-backbone embeddings with labels, for concept heads.

Inputs (texts or images) are embedded once in ``setup`` by a frozen backbone (the backbone
is frozen, so embedding per step would repeat the same work every epoch), optionally
stored in and re-read from an activation cache folder, then split into train / val / test
with a fixed seed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from safetensors import safe_open
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp.data import offline
from lightning_interp.data.cache import ActivationCache, ActivationCacheWriter
from lightning_interp.data.embed import Pooling, embed_all, text_encoder
from lightning_interp.data.lm_datamodule import load_backbone
from lightning_interp.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _polarity() -> tuple[list[str], Tensor, list[str], None]:
    rows = offline.labelled_sentences()
    return [t for t, _ in rows], torch.tensor([y for _, y in rows]), ["negative", "positive"], None


def _tsv(path: Path) -> tuple[list[str], Tensor, list[str], None]:
    pairs = [ln.split("\t", 1) for ln in path.read_text(encoding="utf-8").splitlines() if ln]
    if any(len(p) != 2 for p in pairs):
        raise ConfigError(f"{path}: every line must be 'label<TAB>text'")
    names = sorted({label for label, _ in pairs})
    return [t for _, t in pairs], torch.tensor([names.index(lb) for lb, _ in pairs]), names, None


def _tensors(path: Path) -> tuple[Tensor, Tensor, list[str] | None, Tensor | None]:
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        meta = handle.metadata() or {}
        key = "pixel_values" if "pixel_values" in keys else "input_ids"
        if key not in keys or "labels" not in keys:
            raise ConfigError(f"{path} needs 'labels' and 'pixel_values' or 'input_ids' tensors")
        inputs, labels = handle.get_tensor(key), handle.get_tensor("labels").long()
        concepts = handle.get_tensor("concepts") if "concepts" in keys else None
    names = json.loads(meta["class_names"]) if "class_names" in meta else None
    return inputs, labels, names, concepts


def _image_folder(path: Path) -> tuple[list[Any], Tensor, list[str], None]:
    try:
        from PIL import Image
    except ImportError:
        raise ConfigError(
            f"{path} is an image folder; reading images needs Pillow (`pip install pillow`)"
        ) from None
    names = sorted(p.name for p in path.iterdir() if p.is_dir())
    images, labels = [], []
    for index, name in enumerate(names):
        for file in sorted((path / name).iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                images.append(Image.open(file).convert("RGB"))
                labels.append(index)
    if not images:
        raise ConfigError(f"{path} holds no images in class sub-folders (root/<class>/*.png)")
    return images, torch.tensor(labels), names, None


def load_labelled(source: str) -> tuple[Any, Tensor, list[str] | None, Tensor | None]:
    """Inputs, labels, class names and optional concept labels of a data source.

    Args:
        source: ``offline:polarity`` (200 movie-review sentences), a ``.tsv`` file
            (``label<TAB>text``), a ``.safetensors`` file (``pixel_values`` or ``input_ids``,
            ``labels``, optional ``concepts``; class names as JSON in the metadata key
            ``class_names``), or an image folder ``root/<class>/*.png`` (needs Pillow).
    """
    if source == "offline:polarity":
        return _polarity()
    path = Path(source)
    if path.is_file() and path.suffix == ".tsv":
        return _tsv(path)
    if path.is_file() and path.suffix == ".safetensors":
        return _tensors(path)
    if path.is_dir():
        return _image_folder(path)
    raise ConfigError(
        f"data source {source!r} is not offline:polarity, a .tsv or .safetensors file, or an "
        f"image folder"
    )


def texts(inputs: Sequence[Any]) -> bool:
    """Whether ``inputs`` is a list of strings."""
    return bool(inputs) and isinstance(inputs[0], str)


def _backbone_for(model: str, images: bool) -> Any:
    """The backbone, with a tokenizer, or a processor only when raw images need one.

    CLIP's processor needs Pillow; texts and pixel tensors need only the tokenizer.
    """
    import transformers

    backbone = load_backbone(model, load_tokenizer=False)
    path = backbone.model.name_or_path
    auto = transformers.AutoProcessor if images else transformers.AutoTokenizer
    backbone.tokenizer = auto.from_pretrained(path)
    return backbone


class EmbeddingDataModule(L.LightningDataModule):
    """Pooled embeddings of a frozen backbone with class (and optional concept) labels.

    Batches are ``(embeddings, labels)`` or ``(embeddings, labels, concepts)``.

    Args:
        model: Hub id, local folder, or ``offline:minilm``.
        data: A source accepted by :func:`load_labelled`.
        pooling: ``"clip"`` for CLIP's projected features, ``"mean"`` for sentence
            encoders, ``"auto"`` to choose by model.
        normalize: L2-normalise embeddings (CLIP and sentence encoders compare by cosine).
        class_names: Override the source's class names.
        batch_size: Rows per training batch.
        val_fraction: Share held out for validation.
        test_fraction: Share held out for testing.
        seed: Seed of the split.
        cache_dir: If set, embeddings are read from this activation cache, or written
            there on first use.
        embed_batch_size: Inputs per backbone forward.
    """

    def __init__(
        self,
        model: str,
        data: str,
        pooling: Pooling = "auto",
        normalize: bool = True,
        class_names: list[str] | None = None,
        batch_size: int = 256,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        cache_dir: str | None = None,
        embed_batch_size: int = 64,
    ) -> None:
        super().__init__()
        if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
            raise ConfigError("val_fraction and test_fraction must be >= 0 and sum below 1")
        if pooling == "tokens":
            raise ConfigError(
                "EmbeddingDataModule holds one pooled vector per input; for the concept "
                "transformer, embed token sequences with lightning_interp.data.embed.embed("
                "backbone, inputs, pooling='tokens') and batch (x, y, concepts, mask) yourself"
            )
        self.save_hyperparameters()
        self.backbone: Any = None
        self.class_names: list[str] = list(class_names or [])
        self.splits: dict[str, tuple[Tensor, ...]] = {}

    def setup(self, stage: str | None = None) -> None:
        """Load the backbone, embed (or read cached) inputs, split them (once)."""
        if self.splits:
            return
        h = self.hparams
        inputs, labels, names, concepts = load_labelled(h.data)
        self.backbone = _backbone_for(
            h.model, images=isinstance(inputs, list) and not texts(inputs)
        )
        self.class_names = list(h.class_names or names or range(int(labels.max()) + 1))
        self.class_names = [str(n) for n in self.class_names]
        x = self._embeddings(inputs)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(h.seed))
        n_test, n_val = int(len(order) * h.test_fraction), int(len(order) * h.val_fraction)
        parts = {
            "test": order[:n_test],
            "val": order[n_test : n_test + n_val],
            "train": order[n_test + n_val :],
        }
        for name, rows in parts.items():
            tensors = (x[rows], labels[rows])
            self.splits[name] = tensors + (
                (concepts[rows].float(),) if concepts is not None else ()
            )

    def _embeddings(self, inputs: Any) -> Tensor:
        h = self.hparams
        if h.cache_dir and (Path(h.cache_dir) / "manifest.json").is_file():
            return ActivationCache(h.cache_dir).read("embeddings").float()
        x = embed_all(self.backbone, inputs, h.pooling, h.normalize, h.embed_batch_size)
        if h.cache_dir:
            meta = {"model": h.model, "data": h.data, "pooling": h.pooling}
            widths = {"embeddings": x.shape[1]}
            with ActivationCacheWriter(
                h.cache_dir, sites=["embeddings"], widths=widths, metadata=meta
            ) as writer:
                writer.add(x)
        return x

    def text_encoder(self) -> Callable[[Sequence[str]], Tensor]:
        """Embeds concept phrases into the same space as the data (same pooling)."""
        self.setup()
        pooling = self.hparams.pooling
        return text_encoder(self.backbone, pooling, normalize=self.hparams.normalize)

    def train_embeddings(self) -> tuple[Tensor, Tensor]:
        """All training embeddings and labels."""
        self.setup()
        return self.splits["train"][0], self.splits["train"][1]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        tensors = self.splits[split]
        if len(tensors[0]) == 0:
            raise ConfigError(f"the {split} split is empty; raise its fraction or add data")
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(
            TensorDataset(*tensors),
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            generator=generator,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches."""
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches."""
        return self._loader("test", shuffle=False)
