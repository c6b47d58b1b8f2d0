"""A LightningDataModule streaming a frozen vision tower's activations over images."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_interp.backbones import Backbone
from lightning_interp.data.images import ImageActivations, TokenChoice
from lightning_interp.data.renamed import moved_names
from lightning_interp.data.source import BackboneSites, root_device, source_provenance
from lightning_interp.errors import ConfigError

# VisionModelActivations was this data module's name before it was renamed (one release).
__getattr__ = moved_names(
    __name__, {"VisionModelActivations": "lightning_interp.data:VisionModelDataModule"}
)

# CLIP's published normalisation (OpenAI), used when the model folder has no
# preprocessor_config.json to read it from.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _optional(module: str, pip_name: str, purpose: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ConfigError(f"{purpose} needs {pip_name!r}: pip install {pip_name}") from error


def load_images(source: str) -> Tensor:
    """Images of a source as a float tensor ``[N, C, H, W]`` in ``[0, 1]``.

    Args:
        source: ``offline:digits`` (scikit-learn's 1,797 8x8 digits, no download), a
            folder of image files (needs Pillow), or ``hf:<dataset>[:<split>]`` with an
            ``image`` column (needs ``datasets``; split slices such as ``train[:5000]``
            work).
    """
    if source == "offline:digits":
        datasets = _optional("sklearn.datasets", "scikit-learn", "offline:digits")
        pixels = torch.as_tensor(datasets.load_digits().images, dtype=torch.float32) / 16.0
        return pixels[:, None]
    if source.startswith("hf:"):
        name, _, split = source[3:].partition(":")
        hf_datasets = _optional("datasets", "datasets", f"image source {source!r}")
        images = hf_datasets.load_dataset(name, split=split or "train")["image"]
        return torch.stack([_pil_to_tensor(image) for image in images])
    folder = Path(source)
    if folder.is_dir():
        image_module = _optional("PIL.Image", "pillow", "a folder of images")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ConfigError(f"{folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        return torch.stack([_pil_to_tensor(image_module.open(p)) for p in files])
    raise ConfigError(
        f"image source {source!r} is neither 'offline:digits', 'hf:<dataset>' nor a folder"
    )


def image_normalisation(model: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` from the model folder's ``preprocessor_config.json``, else CLIP's."""
    config_file = Path(model) / "preprocessor_config.json"
    if config_file.is_file():
        import json

        values = json.loads(config_file.read_text())
        return tuple(values["image_mean"]), tuple(values["image_std"])
    return CLIP_MEAN, CLIP_STD


def _pil_to_tensor(image: Any) -> Tensor:
    rgb = image.convert("RGB")
    data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    return data.view(rgb.height, rgb.width, 3).permute(2, 0, 1).float() / 255.0


def preprocess(
    images: Tensor, size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> Tensor:
    """CLIP-style preprocessing in torch: grey to RGB, bicubic resize, normalise.

    transformers' CLIP image processor needs torchvision; this needs nothing but torch.
    """
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    images = F.interpolate(
        images, size=(size, size), mode="bicubic", align_corners=False, antialias=True
    ).clamp(0.0, 1.0)
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    return (images - mean_t) / std_t


class VisionModelDataModule(BackboneSites, L.LightningDataModule):
    """Activations of a frozen vision tower (CLIP ViT and kin) over images.

    The last ``val_fraction`` of the images is held out for validation. Attached to a
    Trainer, ``setup`` puts the backbone on ``trainer.strategy.root_device``, so the vision
    forward (under ``autocast_dtype`` when set) and the shuffling buffer run there. Batches
    are ``{site: rows}``; an :class:`~lightning_interp.data.source.ActivationSource`.

    Args:
        model: Hub id or local folder of a CLIP (or CLIP vision) model.
        site: A vision site, e.g. ``vision.layers.8.resid_post``.
        images: ``offline:digits``, a folder of images, or ``hf:<dataset>[:<split>]``.
        tokens: Rows per image: ``all`` tokens, the ``cls`` token or the ``patches``.
        batch_size: Rows per batch.
        buffer_tokens: Rows of the shuffling buffer.
        images_per_capture: Images per backbone forward.
        val_fraction: Share of images held out.
        image_size: Input resolution (default: the model config's).
        model_dtype: Load the weights in this dtype.
        autocast_dtype: Run the backbone under autocast (``bfloat16`` on GPUs).
        seed: Seed of the image order and shuffling.
    """

    def __init__(
        self,
        model: str,
        site: str,
        images: str = "offline:digits",
        tokens: TokenChoice = "all",
        batch_size: int = 4096,
        buffer_tokens: int = 65_536,
        images_per_capture: int = 32,
        val_fraction: float = 0.05,
        image_size: int | None = None,
        model_dtype: str | None = None,
        autocast_dtype: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.backbone: Backbone | None = None
        self.train_set: ImageActivations | None = None
        self.val_set: ImageActivations | None = None

    @property
    def sites(self) -> list[str]:
        """The one site served, canonical (sets the data module up if needed)."""
        self.setup()
        return self.backbone.resolve_sites(self.hparams.site)

    @property
    def scales(self) -> dict[str, float]:
        """No scaling: batches are raw activations."""
        return {}

    def downstream_inputs(self) -> list[dict[str, torch.Tensor]]:
        """None: spliced language-model metrics do not apply to a vision tower."""
        return []

    def _normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return image_normalisation(self.hparams.model)

    @property
    def provenance(self) -> dict[str, Any]:
        """Backbone (its Hub id), images (Hub id or description), the tokens kept."""
        provenance = source_provenance(self.hparams.model, self.hparams.images)
        # What a feature pass must read the same way (lightning_interp.features.build_images).
        provenance["extra"]["image_tokens"] = self.hparams.tokens
        if self.hparams.image_size is not None:
            provenance["extra"]["image_size"] = self.hparams.image_size
        return provenance

    def setup(self, stage: str | None = None) -> None:
        """Load the backbone onto the trainer's device, preprocess the images (once)."""
        device = root_device(self)
        if self.backbone is not None:
            if device is not None:  # set up before the trainer was attached: move it now
                self.backbone.to(device)
            return
        h = self.hparams
        # No processor: transformers' CLIP image processor needs torchvision.
        self.backbone = Backbone.from_pretrained(
            h.model, dtype=h.model_dtype, device=device, load_tokenizer=False
        )
        config = self.backbone.model.config
        vision_config = getattr(config, "vision_config", config)
        size = h.image_size or vision_config.image_size
        mean, std = self._normalisation()
        pixels = preprocess(load_images(h.images), size, mean, std)
        n_val = max(1, int(len(pixels) * h.val_fraction))
        if len(pixels) <= n_val:
            raise ConfigError(f"{h.images!r} holds {len(pixels)} images; too few to hold some out")
        common = dict(
            site=h.site,
            batch_size=h.batch_size,
            tokens=h.tokens,
            images_per_capture=h.images_per_capture,
            buffer_tokens=h.buffer_tokens,
            seed=h.seed,
            autocast_dtype=h.autocast_dtype,
        )
        self.train_set = ImageActivations(self.backbone, pixels[:-n_val], **common)
        self.val_set = ImageActivations(self.backbone, pixels[-n_val:], **common)

    def train_dataloader(self) -> DataLoader:
        """Training stream (a new image order every epoch)."""
        return DataLoader(self.train_set, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        """Held-out stream."""
        return DataLoader(self.val_set, batch_size=None)

    def test_dataloader(self) -> DataLoader:
        """The held-out stream again (``lightning-interp test`` reports ``test/...``)."""
        return DataLoader(self.val_set, batch_size=None)

    def state_dict(self) -> dict[str, Any]:
        """The training stream's epoch (resumes at epoch boundaries)."""
        return {} if self.train_set is None else {"train": dict(self.train_set.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if "train" in state:
            self.setup()
            self.train_set.load_state_dict(state["train"])
