"""A LightningDataModule of frozen-backbone embeddings with labels, for concept heads.

Inputs (texts or images) are embedded once in ``setup`` by a frozen backbone (the backbone
is frozen, so embedding per step would repeat the same work every epoch), optionally
stored in and re-read from an activation cache folder, then split into train / val / test
with a fixed seed. The backbone is loaded only when needed: a cache hit reads embeddings
without it (``text_encoder()`` loads it on demand).

With ``pooling="tokens"`` every input keeps its whole last hidden state: ``[N, T, d]``
padded to the longest input, with a ``[N, T]`` mask (True at real tokens), for the
concept-transformer head. Those batches are dicts (``embeddings``, ``labels``, ``mask``,
optional ``concepts``), trimmed to the longest input of the batch.
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
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_interp.backbones import load_backbone
from lightning_interp.data import offline
from lightning_interp.data.cache import ActivationCache, ActivationCacheWriter
from lightning_interp.data.embed import Pooling, embed_all, text_encoder
from lightning_interp.data.source import root_device, source_provenance
from lightning_interp.errors import ConfigError, ShapeMismatchError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
#: The one "site" an embedding data module serves (also its cache's site name).
EMBEDDINGS = "embeddings"


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


class TokenDataset(Dataset):
    """Rows of padded token embeddings, as dicts the concept modules read.

    Args:
        embeddings: Token embeddings ``[n, t, d]``.
        labels: Class labels ``[n]``.
        mask: ``[n, t]``, True at real tokens.
        concepts: Optional concept labels ``[n, k]``.

    Example:
        >>> data = TokenDataset(torch.zeros(3, 4, 2), torch.arange(3), torch.ones(3, 4).bool())
        >>> sorted(data[0]), len(data)
        (['embeddings', 'labels', 'mask'], 3)
    """

    def __init__(
        self, embeddings: Tensor, labels: Tensor, mask: Tensor, concepts: Tensor | None = None
    ) -> None:
        if embeddings.ndim != 3 or mask.shape != embeddings.shape[:2]:
            raise ShapeMismatchError(
                f"token embeddings must be [n, t, d] with a mask [n, t], got "
                f"{tuple(embeddings.shape)} and {tuple(mask.shape)}"
            )
        if len(labels) != len(embeddings) or (
            concepts is not None and len(concepts) != len(labels)
        ):
            raise ShapeMismatchError("embeddings, labels and concepts need one row per input")
        self.tensors = {"embeddings": embeddings, "labels": labels, "mask": mask.bool()}
        if concepts is not None:
            self.tensors["concepts"] = concepts

    def __len__(self) -> int:
        return len(self.tensors["labels"])

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {key: value[index] for key, value in self.tensors.items()}


def collate_tokens(rows: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack :class:`TokenDataset` rows, dropping trailing positions no row of them uses.

    Inputs are padded to the longest of the whole data set; a batch of short inputs need
    not carry (and attend over) that padding.
    """
    batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
    used = batch["mask"].any(0).nonzero()
    length = int(used.max()) + 1 if len(used) else 1
    batch["embeddings"] = batch["embeddings"][:, :length]
    batch["mask"] = batch["mask"][:, :length]
    return batch


class EmbeddingDataModule(L.LightningDataModule):
    """Embeddings of a frozen backbone with class (and optional concept) labels.

    Batches are ``(embeddings, labels)`` or ``(embeddings, labels, concepts)``; with
    ``pooling="tokens"`` they are dicts with ``embeddings [b, t, d]``, ``labels``, ``mask
    [b, t]`` (True at real tokens) and optional ``concepts`` (see :class:`TokenDataset`).

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
            there on first use (token embeddings as ``N * T`` rows with a ``mask`` site).
            A cache written with another model, data, pooling, normalize or autocast, or
            holding another number of inputs, raises :class:`ConfigError`.
        embed_batch_size: Inputs per backbone forward.
        autocast_dtype: Run the backbone under autocast (``bfloat16`` on GPUs).

    Attached to a Trainer, the backbone is loaded onto ``trainer.strategy.root_device``
    (each DDP rank's own GPU) and embeds there; the embeddings are kept on the CPU.

    It is an :class:`~lightning_interp.data.source.ActivationSource` of one site,
    ``"embeddings"``, unscaled, with no downstream inputs.
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
        autocast_dtype: str | None = None,
    ) -> None:
        super().__init__()
        if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
            raise ConfigError("val_fraction and test_fraction must be >= 0 and sum below 1")
        self.save_hyperparameters()
        # The backbone is loaded on first need (embedding, text_encoder), not for a cache hit.
        self.backbone: Any = None
        self._raw_images = False
        self.class_names: list[str] = list(class_names or [])
        self.splits: dict[str, tuple[Tensor, ...]] = {}

    def setup(self, stage: str | None = None) -> None:
        """Embed (or read cached) inputs, split them (once); the backbone loads if needed."""
        if self.splits:
            return
        h = self.hparams
        inputs, labels, names, concepts = load_labelled(h.data)
        self._raw_images = isinstance(inputs, list) and not texts(inputs)
        self.class_names = list(h.class_names or names or range(int(labels.max()) + 1))
        self.class_names = [str(n) for n in self.class_names]
        x, mask = self._embeddings(inputs, len(labels))
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(h.seed))
        n_test, n_val = int(len(order) * h.test_fraction), int(len(order) * h.val_fraction)
        parts = {
            "test": order[:n_test],
            "val": order[n_test : n_test + n_val],
            "train": order[n_test + n_val :],
        }
        for name, rows in parts.items():
            tensors = (x[rows], labels[rows])
            tensors += (concepts[rows].float(),) if concepts is not None else ()
            # Token splits end with the mask: (x, y[, concepts], mask).
            self.splits[name] = tensors + ((mask[rows],) if mask is not None else ())

    @property
    def tokens(self) -> bool:
        """Whether the data are token sequences (``pooling="tokens"``)."""
        return self.hparams.pooling == "tokens"

    @property
    def provenance(self) -> dict[str, Any]:
        """Backbone (its Hub id) and data (Hub id or description) of the embeddings."""
        return source_provenance(self.hparams.model, self.hparams.data)

    @property
    def sites(self) -> list[str]:
        """``["embeddings"]``: the embeddings are the one thing served."""
        return [EMBEDDINGS]

    @property
    def site_widths(self) -> dict[str, int]:
        """Width of the embeddings (sets the data up if needed)."""
        self.setup()
        return {EMBEDDINGS: int(self.splits["train"][0].shape[-1])}

    @property
    def scales(self) -> dict[str, float]:
        """No scaling: embeddings are served as the backbone computed them."""
        return {}

    def downstream_inputs(self) -> list[dict[str, Tensor]]:
        """None: a classifier's embeddings are not spliced into a language model."""
        return []

    def _load_backbone(self) -> Any:
        """The frozen backbone, loaded on first use, on the trainer's device if attached."""
        if self.backbone is None:
            self.backbone = _backbone_for(self.hparams.model, images=self._raw_images)
        device = root_device(self)
        if device is not None:
            self.backbone.to(device)
        return self.backbone

    def _embeddings(self, inputs: Any, rows: int) -> tuple[Tensor, Tensor | None]:
        h = self.hparams
        if h.cache_dir and (Path(h.cache_dir) / "manifest.json").is_file():
            return self._read_cache(ActivationCache(h.cache_dir), rows)
        out = embed_all(
            self._load_backbone(),
            inputs,
            h.pooling,
            h.normalize,
            h.embed_batch_size,
            autocast_dtype=h.autocast_dtype,
        )
        x, mask = out if isinstance(out, tuple) else (out, None)
        if h.cache_dir:
            meta = {
                "model": h.model,
                "data": h.data,
                "pooling": h.pooling,
                "normalize": bool(h.normalize),
                "provenance": self.provenance,
            }
            if h.autocast_dtype is not None:  # absent when off: older caches still match
                meta["autocast_dtype"] = h.autocast_dtype
            rows = {EMBEDDINGS: x}
            if mask is not None:
                # The cache holds rows: N * T token rows, the mask as a width-1 site beside.
                meta["tokens_per_input"] = x.shape[1]
                rows["mask"] = mask.unsqueeze(-1).float()
            widths = {site: t.shape[-1] for site, t in rows.items()}
            with ActivationCacheWriter(
                h.cache_dir, sites=list(rows), widths=widths, metadata=meta
            ) as writer:
                writer.add(rows)
        return x, mask

    def _read_cache(self, cache: ActivationCache, rows: int) -> tuple[Tensor, Tensor | None]:
        """The cached embeddings, if the cache was written with these settings and data."""
        h, meta = self.hparams, cache.metadata
        fix = f"delete {cache.directory} (it is rebuilt) or use another cache_dir"
        cached_tokens = meta.get("pooling") == "tokens"
        if cached_tokens != self.tokens:
            raise ConfigError(
                f"the cache in {cache.directory} holds "
                f"{'token' if cached_tokens else 'pooled'} embeddings but pooling="
                f"{h.pooling!r}; {fix}"
            )
        expected = {
            "model": h.model,
            "data": h.data,
            "pooling": h.pooling,
            "normalize": bool(h.normalize),
        }
        for key, value in expected.items():
            if key not in meta:
                raise ConfigError(
                    f"the cache in {cache.directory} does not record its {key} (written by an "
                    f"older version), so it cannot be checked against {key}={value!r}; {fix}"
                )
            if meta[key] != value:
                raise ConfigError(
                    f"the cache in {cache.directory} was written with {key}={meta[key]!r} but "
                    f"this data module has {key}={value!r}; {fix}"
                )
        if meta.get("autocast_dtype") != h.autocast_dtype:
            raise ConfigError(
                f"the cache in {cache.directory} was embedded with autocast_dtype="
                f"{meta.get('autocast_dtype')!r} but this data module has autocast_dtype="
                f"{h.autocast_dtype!r}; {fix}"
            )
        length = int(meta["tokens_per_input"]) if cached_tokens else 1
        if cache.total_tokens != rows * length:
            cached = cache.total_tokens / length
            raise ConfigError(
                f"the cache in {cache.directory} holds {cached:g} embeddings but {h.data} has "
                f"{rows} labelled inputs (the data changed since it was written); {fix}"
            )
        x = cache.read(EMBEDDINGS).float()
        if not cached_tokens:
            return x, None
        mask = cache.read("mask").reshape(-1, length) > 0.5
        return x.reshape(-1, length, x.shape[-1]), mask

    @property
    def concept_count(self) -> int | None:
        """Labelled concepts per input (``None``: the data carry none); sets up the data."""
        self.setup()
        tensors = self.splits["train"]
        labelled = len(tensors) - int(self.tokens) == 3  # (x, y, concepts[, mask])
        return tensors[2].shape[1] if labelled else None

    def text_encoder(self) -> Callable[[Sequence[str]], Tensor]:
        """Embeds concept phrases into the same space as the data (same pooling)."""
        self.setup()
        pooling = self.hparams.pooling
        return text_encoder(
            self._load_backbone(),
            pooling,
            normalize=self.hparams.normalize,
            autocast_dtype=self.hparams.autocast_dtype,
        )

    def train_embeddings(self) -> tuple[Tensor, Tensor]:
        """All training embeddings and labels."""
        self.setup()
        return self.splits["train"][0], self.splits["train"][1]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        tensors = self.splits[split]
        if len(tensors[0]) == 0:
            raise ConfigError(f"the {split} split is empty; raise its fraction or add data")
        generator = torch.Generator().manual_seed(self.hparams.seed)
        if self.tokens:
            x, y, *concepts, mask = tensors
            dataset, collate = TokenDataset(x, y, mask, *concepts), collate_tokens
        else:
            dataset, collate = TensorDataset(*tensors), None
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            generator=generator,
            collate_fn=collate,
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
