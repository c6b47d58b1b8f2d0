"""A LightningDataModule streaming a multimodal LLM's activations over (image, caption) pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_interp.backbones import Backbone
from lightning_interp.backbones.multimodal import (
    PROJECTOR,
    TokenTypes,
    image_token_id,
    token_type_mask,
    vlm_inputs,
)
from lightning_interp.data.image_datamodule import (
    VisionModelDataModule,
    image_normalisation,
    load_images,
)
from lightning_interp.data.images import ImageActivations
from lightning_interp.data.source import root_device, source_provenance
from lightning_interp.errors import ConfigError


class ImageTextActivations(ImageActivations):
    """A multimodal LLM's activations over (image, caption) pairs, as shuffled batches of rows.

    Each capture builds the model inputs in torch
    (:func:`~lightning_interp.backbones.multimodal.vlm_inputs`: the image tokens, then the
    caption) and keeps, at a language-model site, the positions ``token_types`` names (image
    tokens, text tokens or both; padding never). Vision-tower and projector sites hold image
    rows only: every row is kept, and ``token_types="text"`` is refused there.

    Args:
        backbone: A :class:`~lightning_interp.backbones.Backbone` over a multimodal LLM.
        images: ``[N, C, H, W]`` in ``[0, 1]``.
        site: A site of the model (``layers.3.resid_post``, ``vision.layers.2.mlp_out``,
            ``projector``).
        caption_ids: Token ids of the caption every image is paired with.
        token_types: ``"image"``, ``"text"`` or ``"all"``.
        mean: Image normalisation mean.
        std: Image normalisation std.
        pad_token_id: Id padding shorter sequences.
        image_size: Image side fed to the vision tower (default: its config's).
        **kwargs: ``batch_size``, ``images_per_capture``, ``buffer_tokens``, ``seed``,
            ``autocast_dtype``, as for :class:`~lightning_interp.data.images.ImageActivations`.
    """

    def __init__(
        self,
        backbone: Backbone,
        images: Tensor,
        site: str,
        *,
        caption_ids: list[int],
        token_types: TokenTypes = "image",
        mean: tuple[float, ...],
        std: tuple[float, ...],
        pad_token_id: int = 0,
        image_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, images, site, **kwargs)
        if token_types not in ("image", "text", "all"):
            raise ConfigError(f"token_types must be 'image', 'text' or 'all', got {token_types!r}")
        self.caption_ids = list(caption_ids)
        self.token_types = token_types
        self.mean, self.std = mean, std
        self.pad_token_id = pad_token_id
        self.image_size = image_size

    def _capture(self, indices: Tensor) -> Tensor:
        return self.capture_with_positions(indices)[0]

    def capture_with_positions(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """The rows of images ``indices`` (in order, unshuffled) and where each came from.

        Args:
            indices: Indices into ``images``.

        Returns:
            ``rows [R, d]`` as training reads them, and ``positions [R, 2]`` (long): the
            image's index into ``images``, and the row's image-token ordinal within that
            image (``-1`` for a text token). The ordinal indexes
            :func:`~lightning_interp.backbones.image_patches.image_token_boxes`, the pixel
            box the token summarises. At a ``projector`` site the ordinal is the row's
            place in the projector output (LLaVA-Next's: tile patches, not image tokens);
            vision-tower rows are patches (with a class token for CLIP towers) and get ``-1``.
        """
        config = self.backbone.model.config
        inputs = vlm_inputs(
            config,
            self.images[indices],
            [self.caption_ids] * len(indices),
            mean=self.mean,
            std=self.std,
            pad_token_id=self.pad_token_id,
            size=self.image_size,
        )
        acts = self.backbone.capture(inputs, self.site, autocast_dtype=self.autocast_dtype)
        acts = acts[self.site]
        ids = inputs["input_ids"]
        if acts.shape[:2] == ids.shape:  # a language-model site: one row per position
            mask = token_type_mask(ids, config, self.token_types, inputs["attention_mask"])
            image = ids == image_token_id(config)
            ordinal = torch.where(image, image.long().cumsum(1) - 1, -1)
            positions = torch.stack([indices[:, None].expand_as(ids), ordinal], dim=-1)
            return acts[mask.to(acts.device)], positions[mask]
        if self.token_types == "text":
            raise ConfigError(
                f"{self.site!r} is not a language-model site (its rows are image patches or "
                f"image tokens): use token_types 'image' or 'all', or a 'layers.{{i}}' site"
            )
        rows = acts.reshape(-1, acts.shape[-1])
        per_image = len(rows) // len(indices)
        ordinal = (
            torch.arange(per_image) if self.site == PROJECTOR else torch.full((per_image,), -1)
        )
        positions = torch.stack(
            [indices.repeat_interleave(per_image), ordinal.repeat(len(indices))], dim=-1
        )
        return rows, positions


def _normalisation(model: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The model's image mean and std: its ``preprocessor_config.json``'s, else CLIP's.

    Read from the model folder, or from the Hub cache for a Hub id (no download offline).
    """
    if not Path(model).is_dir():
        try:
            from transformers.utils import cached_file

            found = cached_file(model, "preprocessor_config.json")
        except OSError:  # offline and not cached: CLIP's published values
            found = None
        if found is not None:
            model = str(Path(found).parent)
    return image_normalisation(model)


class ImageTextDataModule(VisionModelDataModule):
    """Activations of a frozen multimodal LLM over images paired with a caption.

    LLaVA(-Next, -OneVision), Qwen2-VL, Idefics3/SmolVLM, PaliGemma and Gemma-3 (LLaVA-Next
    tiles each image by its own size, see
    :func:`~lightning_interp.backbones.multimodal.anyres_layout`). Every image is paired with
    the same caption (after the image tokens). Language-model sites (``layers.{i}...``)
    keep the positions ``token_types`` names; vision-tower sites (``vision.layers.{i}...``)
    and ``projector`` keep every image row. The last ``val_fraction`` of the images is held
    out. Batches are ``{site: rows}``; an
    :class:`~lightning_interp.data.source.ActivationSource`.

    Args:
        model: Hub id or local folder of a multimodal LLM (loaded with
            ``AutoModelForImageTextToText``; its tokenizer tokenizes the caption).
        site: A site, e.g. ``layers.12.resid_post``, ``vision.layers.8.resid_post`` or
            ``projector``.
        images: ``offline:digits``, a folder of images, or ``hf:<dataset>[:<split>]``.
        caption: Text following each image.
        token_types: At language-model sites, train on ``image`` tokens, ``text`` tokens or
            ``all``.
        **kwargs: As for :class:`~lightning_interp.data.VisionModelDataModule`:
            ``batch_size``, ``buffer_tokens``, ``images_per_capture``, ``val_fraction``,
            ``image_size`` (default: the vision tower's), ``model_dtype``,
            ``autocast_dtype``, ``seed`` (its ``tokens`` does not apply here).
    """

    def __init__(
        self,
        model: str,
        site: str,
        images: str = "offline:digits",
        caption: str = "a handwritten digit",
        token_types: TokenTypes = "image",
        **kwargs: Any,
    ) -> None:
        if token_types not in ("image", "text", "all"):
            raise ConfigError(f"token_types must be 'image', 'text' or 'all', got {token_types!r}")
        super().__init__(model, site, images, **kwargs)
        # The parent saved its own arguments; these are the ones this class was built with.
        self.save_hyperparameters({**self.hparams, "caption": caption, "token_types": token_types})
        self.train_set: ImageTextActivations | None = None
        self.val_set: ImageTextActivations | None = None

    @property
    def provenance(self) -> dict[str, Any]:
        """Backbone, images, and (in ``extra``) the caption and token types read."""
        h = self.hparams
        provenance = source_provenance(h.model, h.images)
        # What a feature pass must rebuild the same way: the caption and the positions kept.
        provenance["extra"].update(caption=h.caption, token_types=h.token_types)
        if h.image_size is not None:
            provenance["extra"]["image_size"] = h.image_size
        return provenance

    def setup(self, stage: str | None = None) -> None:
        """Load the model and its tokenizer onto the trainer's device, load the images."""
        device = root_device(self)
        if self.backbone is not None:
            if device is not None:
                self.backbone.to(device)
            return
        import transformers

        from lightning_interp._dtypes import dtype_from_name

        h = self.hparams
        kwargs = {} if h.model_dtype is None else {"dtype": dtype_from_name(h.model_dtype)}
        # No processor: these models' image processors need torchvision.
        model = transformers.AutoModelForImageTextToText.from_pretrained(h.model, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(h.model)
        self.backbone = Backbone(model.to(device or "cpu"), tokenizer, name=h.model)
        pixels = load_images(h.images)
        n_val = max(1, int(len(pixels) * h.val_fraction))
        if len(pixels) <= n_val:
            raise ConfigError(f"{h.images!r} holds {len(pixels)} images; too few to hold some out")
        mean, std = _normalisation(h.model)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        common = dict(
            site=h.site,
            caption_ids=tokenizer(h.caption)["input_ids"],
            token_types=h.token_types,
            mean=mean,
            std=std,
            pad_token_id=pad,
            image_size=h.image_size,
            batch_size=h.batch_size,
            images_per_capture=h.images_per_capture,
            buffer_tokens=h.buffer_tokens,
            seed=h.seed,
            autocast_dtype=h.autocast_dtype,
        )
        self.train_set = ImageTextActivations(self.backbone, pixels[:-n_val], **common)
        self.val_set = ImageTextActivations(self.backbone, pixels[-n_val:], **common)
