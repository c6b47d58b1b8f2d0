"""One streaming pass of a vision dictionary over images: an image feature store.

For a CLIP vision dictionary a *context* is an image and its *tokens* are the vision tower's
positions: the class token at 0 (CLIP puts it first, see
:func:`~lightning_interp.data.images.select_tokens`), then the ``g x g`` patches row by row
(a tower without a class token has the patches only). The text pass's
:class:`~lightning_interp.features.store.FeatureAccumulator` runs unchanged on the position
ids as token ids, so an example is an (image, latent) pair valued at the latent's maximum
over the image's kept positions, as saev ranks images "by max over all patches" and keeps
every patch's value (Stevens et al., ``saev/visuals.py`` ``get_topk_patch``, read at
theonlyladybug/saev); unlike it, an image appears at most once per latent.

Which positions count is the dictionary's training choice (``tokens`` of
:class:`~lightning_interp.data.VisionModelDataModule`, recorded in its provenance):
``"all"`` (the CLIP recipe's) keeps the class token and the patches, ``"patches"`` leaves
the class token out of every statistic (it shows as 0), ``"cls"`` keeps it alone.

Every example holds the whole image: the accumulator cuts ``2L - 1`` positions centred on
the example's (``L`` = sequence length), which hold all ``L`` wherever the centre is, and
the finish puts each at its position: the store's ``window`` is ``L``, slot ``j`` is position
``j``, ``top_center`` the position of the maximum. While the pass runs the accumulators hold
``F x (T + Q*S) x (2L - 1)`` slots (CLIP ViT-B/32 at 224 px: ``L = 50``).

The store adds ``top_image``/``quantile_image`` (image index, -1 padding) to
``contexts.safetensors``, an ``"image"`` block to ``store.json`` (patch grid, class token,
positions kept, input size) and ``images/<index>.png``, a thumbnail of every image in an
example, squared as the model sees it so the patch grid lies on it exactly. Resumable and
atomic as the text pass (:mod:`~lightning_interp.features.build`).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_interp.data.image_datamodule import (
    CLIP_MEAN,
    CLIP_STD,
    image_normalisation,
    load_images,
    preprocess,
)
from lightning_interp.data.images import TokenChoice
from lightning_interp.errors import ConfigError, OutputExistsError
from lightning_interp.features.build import TokenProgress
from lightning_interp.features.layout import partial_folder, store_meta
from lightning_interp.features.sequences import (  # noqa: F401 (png_bytes, whole_images: as before)
    IMAGES_FOLDER,
    finish_store,
    png_bytes,
    whole_images,
    whole_sequence_pass,
)
from lightning_interp.features.store import FeatureSettings

CLASS_TOKEN = "CLS"


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """The images a pass reads, in order (image ``i`` of the store is ``images[i]``).

    Attributes:
        images: Raw pixels in ``[0, 1]``: a ``[N, C, H, W]`` tensor, or a sequence of
            ``[C, H, W]`` tensors (sizes may differ); one channel is grey.
        name: How store.json names them (e.g. ``offline:digits``).
        tokens: Positions that count: ``"all"``, ``"patches"`` or ``"cls"`` (as the
            dictionary was trained).
        images_per_capture: Images per backbone forward.
        max_images: Read only the first ``max_images`` (``None``: all).
        image_size: Input resolution (default: the vision config's ``image_size``).
        mean: Per-channel normalisation mean (CLIP's by default).
        std: Per-channel normalisation standard deviation.
        thumbnail: Side in pixels of the stored thumbnails.
    """

    images: Tensor | Sequence[Tensor]
    name: str = "images"
    tokens: TokenChoice = "all"
    images_per_capture: int = 32
    max_images: int | None = None
    image_size: int | None = None
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    thumbnail: int = 96

    def __post_init__(self) -> None:
        if self.tokens not in ("all", "patches", "cls"):
            raise ConfigError(f"tokens must be 'all', 'patches' or 'cls', got {self.tokens!r}")
        for name in ("images_per_capture", "max_images", "image_size", "thumbnail"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"ImageSet's {name} must be positive, got {value}")

    @classmethod
    def load(cls, source: str, model: str | None = None, **kwargs: Any) -> ImageSet:
        """The images of ``source`` (what the vision data module takes) in load order.

        Args:
            source: ``offline:digits``, a folder of image files (sorted by name) or
                ``hf:<dataset>[:<split>]``.
            model: The model folder or Hub id whose ``preprocessor_config.json`` gives the
                normalisation (CLIP's when absent).
            **kwargs: More fields.
        """
        mean, std = image_normalisation(model) if model else (CLIP_MEAN, CLIP_STD)
        return cls(load_images(source), name=source, mean=mean, std=std, **kwargs)

    @classmethod
    def from_provenance(
        cls,
        provenance: Any,
        source: str | None = None,
        model: str | None = None,
        **kwargs: Any,
    ) -> ImageSet:
        """The images a dictionary was trained on, read as it was, from its provenance.

        Args:
            provenance: A dictionary's
                :class:`~lightning_interp.dictionaries.config.Provenance`, or a data
                module's provenance dict.
            source: The images (default: the loadable name the data module recorded).
            model: The model folder for the normalisation (default: the recorded backbone).
            **kwargs: More fields (``max_images``...).

        Raises:
            ConfigError: no images given nor recorded.
        """
        fields = provenance if isinstance(provenance, dict) else dataclasses.asdict(provenance)
        extra = fields.get("extra") or {}
        source = source or extra.get("dataset_source") or fields.get("dataset")
        if not source:
            raise ConfigError("the dictionary's provenance records no images; pass --images ...")
        model = model or extra.get("backbone_source") or fields.get("backbone")
        # What the vision data module trained on (VisionModelDataModule.provenance).
        recorded = {
            "tokens": extra.get("image_tokens", "all"),
            "image_size": extra.get("image_size"),
        }
        return cls.load(source, model, **{**recorded, **kwargs})

    @property
    def count(self) -> int:
        """Images the pass reads."""
        n = len(self.images)
        return n if self.max_images is None else min(n, self.max_images)

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed pass must share (the pixels' count, not the pixels)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**{k: v for k, v in fields.items() if k != "images"}, "count": self.count}

    def pixels(self, start: int, stop: int, size: int) -> Tensor:
        """Model inputs ``[stop - start, 3, size, size]`` of images ``start .. stop-1``."""
        if isinstance(self.images, Tensor):
            return preprocess(self.images[start:stop].float(), size, self.mean, self.std)
        return torch.cat(
            [
                preprocess(self.images[i][None].float(), size, self.mean, self.std)
                for i in range(start, stop)
            ]
        )

    def thumbnail_rgb(self, index: int) -> Tensor:
        """Image ``index`` as the model sees it (square), ``[side, side, 3]`` uint8."""
        square = preprocess(self.images[index][None].float(), self.thumbnail, (0,) * 3, (1,) * 3)
        return square[0].mul(255).round().to(torch.uint8).permute(1, 2, 0)


@dataclasses.dataclass(frozen=True)
class PatchLayout:
    """Where the positions of a vision tower's sequence lie.

    Attributes:
        length: Sequence length ``L``.
        grid: Patches per side ``g``.
        class_token: Position 0 is a class token.
    """

    length: int
    grid: int
    class_token: bool

    def kept(self, tokens: TokenChoice) -> Tensor:
        """``[L]`` bool: the positions that count for ``tokens``."""
        keep = torch.ones(self.length, dtype=torch.bool)
        if tokens == "patches" and self.class_token:
            keep[0] = False
        elif tokens == "cls":
            if not self.class_token:
                raise ConfigError("tokens='cls' needs a vision tower with a class token")
            keep[1:] = False
        return keep

    def names(self) -> dict[str, str]:
        """vocab.json: each position's name (``CLS``, ``patch <row>,<column>``)."""
        first = int(self.class_token)
        names = {
            str(p): f"patch {(p - first) // self.grid},{(p - first) % self.grid}"
            for p in range(first, self.length)
        }
        return {"0": CLASS_TOKEN, **names} if self.class_token else names


def vision_config(backbone: Any, site: str) -> Any:
    """The config of the vision tower ``site`` lies in.

    Raises:
        ConfigError: the site is not in a vision tower.
    """
    (resolved,) = backbone.site_map.resolve(site)
    config = backbone.model.config
    vision = getattr(config, "vision_config", None) or config
    if resolved.tower not in ("vision", "") or not hasattr(vision, "patch_size"):
        raise ConfigError(
            f"site {site!r} is not in a vision tower; an image feature store needs a vision "
            "site such as 'vision.layers.8.resid_post'"
        )
    return vision


def patch_layout(site: str, length: int) -> PatchLayout:
    """The layout of a sequence of ``length`` positions read at ``site``.

    Raises:
        ConfigError: the positions are not a square grid of patches (with or without one
            class token first).
    """
    for class_token in (True, False):
        grid = math.isqrt(max(length - class_token, 0))
        if grid > 0 and grid * grid == length - class_token:
            return PatchLayout(length, grid, class_token)
    raise ConfigError(f"{length} positions at {site!r} are not a square grid of patches")


def build_image_feature_store(
    dictionary: Any,
    backbone: Any,
    images: ImageSet,
    out: str | Path,
    *,
    site: str,
    settings: FeatureSettings | None = None,
    source: str = "",
    checkpoint_every: int = 100,
    progress: bool | TokenProgress = True,
) -> Path:
    """Run the image feature pass and write the store at ``out`` (resuming ``<out>.partial/``).

    Args:
        dictionary: A :class:`~lightning_interp.dictionaries.Dictionary` reading ``site``.
        backbone: The frozen :class:`~lightning_interp.backbones.Backbone` (a CLIP model or
            its vision tower); no processor needed.
        images: The images and how they are read.
        out: Folder of the store (must not exist).
        site: A vision site (e.g. ``vision.layers.8.resid_post``).
        settings: What to record; its ``window`` is ignored (an example is a whole image)
            and ``logit_lens`` does not apply.
        source: How store.json names the dictionary.
        checkpoint_every: Capture batches between checkpoints (0: none).
        progress: Print images read and images/s on stderr; or a
            :class:`~lightning_interp.features.build.TokenProgress` (given images).

    Returns:
        ``out``.

    Raises:
        OutputExistsError: ``out`` exists.
        ConfigError: not a vision site, no images, or ``<out>.partial`` holds a build with
            other settings.
    """
    out = Path(out)
    settings = settings or FeatureSettings()
    if out.exists():
        raise OutputExistsError(f"{out} exists; remove it or choose another --out")
    if images.count == 0:
        raise ConfigError(f"{images.name!r} holds no images; a feature pass needs some")
    if dictionary.config.provenance.activation_scale != 1.0:
        dictionary = dictionary.with_scale_folded()  # takes raw activations, same codes
    (site,) = backbone.resolve_sites(site)
    size = images.image_size or vision_config(backbone, site).image_size
    dtype = dictionary.W_dec.dtype
    probe = backbone.capture({"pixel_values": images.pixels(0, 1, size)}, site, dtype=dtype)
    layout = patch_layout(site, probe[site].shape[1])
    fingerprint = {"images": images.fingerprint(), "site": site, "source": source}

    def encode(start: int, stop: int) -> Any:
        pixels = images.pixels(start, stop, size)
        acts = backbone.capture({"pixel_values": pixels}, site, dtype=dtype)[site]
        return dictionary.encode_sparse(acts[:, keep].reshape(-1, acts.shape[-1]))

    keep = layout.kept(images.tokens)
    acc, state, recorded = whole_sequence_pass(
        dictionary,
        settings,
        keep,
        images,
        encode,
        out,
        fingerprint=fingerprint,
        checkpoint_every=checkpoint_every,
        progress=progress,
    )
    meta = {
        **store_meta(dictionary, recorded, site, source),
        "logit_lens": 0,
        "modality": "image",
        "image": {
            "grid": [layout.grid, layout.grid],
            "class_token": layout.class_token,
            "tokens": images.tokens,
            "image_size": size,
            "thumbnail": images.thumbnail,
        },
    }
    finish_store(out, meta, acc, state, images, layout.names())
    shutil.rmtree(partial_folder(out), ignore_errors=True)
    return out
