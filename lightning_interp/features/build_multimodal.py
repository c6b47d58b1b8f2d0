"""Feature stores of a multimodal LLM's language-model site over (image, caption) sequences.

A dictionary trained through :class:`~lightning_interp.data.ImageTextDataModule` reads the
language model's positions of sequences "image tokens, then the caption"
(:func:`~lightning_interp.backbones.multimodal.vlm_inputs`). Here a *context* is one such
sequence and its *tokens* are its positions: every sequence has the same ``L`` positions
(the same caption, the same number of image tokens), so the image pass's whole-sequence
machinery (:mod:`~lightning_interp.features.sequences`) runs unchanged over position ids, as
it does for CLIP patches: an example is an (image, latent) pair valued at the latent's
maximum over the kept positions, and it holds the latent's activation at every position.

Rows come from :meth:`~lightning_interp.data.multimodal_datamodule.ImageTextActivations.
capture_with_positions`, the code path training read, so the kept positions (``token_types``:
image tokens, text tokens or both) and the activations are the training rows exactly.

Each position is an image token (its ordinal ``k`` among the image's tokens) or a caption
token. store.json's ``multimodal`` block (version 1) records per position the ordinal (``-1``
for text) and per ordinal the pixel box :func:`~lightning_interp.backbones.image_patches.
image_token_boxes` gives, in the ``image_size`` square the vision tower is fed;
``contexts.safetensors`` adds ``<prefix>box`` ``[F, examples, 4]``, the box of each example's
maximum (``-1`` when it is a text token), and ``<prefix>image`` like image stores; thumbnails
are ``images/<index>.png``, squared as the model sees them. LLaVA-Next's tiling (boxes in two
frames, one layout per image size) is refused.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_interp.backbones.image_patches import NO_PIXELS, image_token_boxes
from lightning_interp.backbones.multimodal import (
    ANYRES,
    PROJECTOR,
    image_resolution,
    image_token_id,
    token_type_mask,
    vlm_inputs,
)
from lightning_interp.errors import ConfigError, OutputExistsError
from lightning_interp.features.build import TokenProgress
from lightning_interp.features.build_images import ImageSet
from lightning_interp.features.layout import partial_folder, store_meta
from lightning_interp.features.sequences import finish_store, whole_sequence_pass
from lightning_interp.features.store import FeatureSettings

MULTIMODAL_VERSION = 1


def sequence_layout(stream: Any) -> dict[str, Any]:
    """The positions every sequence of ``stream`` shares, and the box of each image token.

    Args:
        stream: An :class:`~lightning_interp.data.multimodal_datamodule.ImageTextActivations`.

    Returns:
        ``input_ids`` ``[L]``, ``keep`` ``[L]`` bool (the positions ``token_types`` keeps),
        ``ordinals`` ``[L]`` (image-token ordinal, -1 for text), ``boxes``
        ``[n_image_tokens, 4]`` and ``size`` (the side the boxes are measured in).

    Raises:
        ConfigError: a vision-tower or projector site, or an any-resolution family.
    """
    config = stream.backbone.model.config
    if getattr(config, "model_type", "") in ANYRES:
        raise ConfigError(
            "LLaVA-Next tiles each image by its size, so its image tokens have no one box "
            "layout; build a multimodal store for a one-tile family (LLaVA, SmolVLM, Qwen2-VL...)"
        )
    if stream.site == PROJECTOR or stream.site.startswith("vision."):
        raise ConfigError(
            f"{stream.site!r} holds image rows only; a multimodal store reads a language-model "
            "site such as 'layers.3.resid_post' (use an image store for vision sites)"
        )
    inputs = vlm_inputs(
        config,
        stream.images[:1],
        [stream.caption_ids],
        mean=stream.mean,
        std=stream.std,
        pad_token_id=stream.pad_token_id,
        size=stream.image_size,
    )
    ids = inputs["input_ids"][0]
    image = ids == image_token_id(config)
    size = image_resolution(config, stream.image_size)
    return {
        "input_ids": ids,
        "keep": token_type_mask(ids[None], config, stream.token_types)[0],
        "ordinals": torch.where(image, image.long().cumsum(0) - 1, -1),
        "boxes": image_token_boxes(config, size),
        "size": size,
    }


def _names(layout: dict[str, Any], tokenizer: Any) -> dict[str, str]:
    """vocab.json: each position's text (a caption token's string, ``image token k``)."""
    ids, ordinals = layout["input_ids"].tolist(), layout["ordinals"].tolist()
    text = tokenizer.batch_decode([[i] for i in ids]) if tokenizer is not None else None
    return {
        str(p): f"image token {k}" if k >= 0 else (text[p] if text else f"⟨{ids[p]}⟩")
        for p, k in enumerate(ordinals)
    }


def _example_boxes(layout: dict[str, Any]) -> Any:
    """Adds ``<prefix>box``: the box of each example's maximum, -1 for text or padding."""
    ordinals, boxes = layout["ordinals"], layout["boxes"].int()

    def add(contexts: dict[str, Tensor]) -> dict[str, Tensor]:
        out = dict(contexts)
        for prefix in ("top_", "quantile_"):
            ordinal = ordinals[contexts[f"{prefix}center"].long()]
            ordinal = ordinal.masked_fill(contexts[f"{prefix}source"] < 0, -1)
            picked = boxes[ordinal.clamp(min=0)]
            out[f"{prefix}box"] = picked.masked_fill((ordinal < 0)[..., None], NO_PIXELS)
        return out

    return add


def training_sequences(data: Any) -> Any:
    """The training reader of a set-up ImageTextDataModule, over every image in load order.

    Training and validation images together, so a store built at the end of ``fit`` and one
    built later by ``lightning-interp features`` read the same sequences.
    """
    stream = copy.copy(data.train_set)
    stream.images = torch.cat([data.train_set.images, data.val_set.images])
    return stream


def build_multimodal_feature_store(
    dictionary: Any,
    stream: Any,
    out: str | Path,
    *,
    name: str = "images",
    max_images: int | None = None,
    settings: FeatureSettings | None = None,
    source: str = "",
    thumbnail: int = 96,
    checkpoint_every: int = 100,
    progress: bool | TokenProgress = True,
) -> Path:
    """Run the (image, caption) feature pass and write the store at ``out``.

    Resumes ``<out>.partial/`` as the other passes do.

    Args:
        dictionary: A :class:`~lightning_interp.dictionaries.Dictionary` reading
            ``stream.site``.
        stream: The :class:`~lightning_interp.data.multimodal_datamodule.
            ImageTextActivations` training read (its backbone, images, caption, token
            types and normalisation); image ``i`` of the store is ``stream.images[i]``.
        out: Folder of the store (must not exist).
        name: How store.json names the images.
        max_images: Read only the first ``max_images`` (``None``: all).
        settings: What to record; its ``window`` is ignored (an example is a whole
            sequence) and ``logit_lens`` does not apply.
        source: How store.json names the dictionary.
        thumbnail: Side in pixels of the stored thumbnails.
        checkpoint_every: Capture batches between checkpoints (0: none).
        progress: Print images read and images/s on stderr, or a
            :class:`~lightning_interp.features.build.TokenProgress`.

    Returns:
        ``out``.

    Raises:
        OutputExistsError: ``out`` exists.
        ConfigError: not a language-model site, an any-resolution family, no images, or
            ``<out>.partial`` holds a build with other settings.
    """
    out = Path(out)
    settings = settings or FeatureSettings()
    if out.exists():
        raise OutputExistsError(f"{out} exists; remove it or choose another --out")
    images = ImageSet(
        stream.images,
        name=name,
        images_per_capture=stream.images_per_capture,
        max_images=max_images,
        thumbnail=thumbnail,
    )
    if images.count == 0:
        raise ConfigError(f"{name!r} holds no images; a feature pass needs some")
    if dictionary.config.provenance.activation_scale != 1.0:
        dictionary = dictionary.with_scale_folded()  # takes raw activations, same codes
    layout = sequence_layout(stream)
    dtype = dictionary.W_dec.dtype

    def encode(start: int, stop: int) -> Any:
        rows, _ = stream.capture_with_positions(torch.arange(start, stop))
        return dictionary.encode_sparse(rows.to(dictionary.W_dec.device, dtype))

    # What a resumed pass must share besides the settings: the sequences read.
    sequences = {
        "images": images.fingerprint(),
        "site": stream.site,
        "source": source,
        "caption_ids": list(stream.caption_ids),
        "token_types": stream.token_types,
        "image_size": layout["size"],
    }
    run = {"checkpoint_every": checkpoint_every, "progress": progress}
    acc, state, recorded = whole_sequence_pass(
        dictionary, settings, layout["keep"], images, encode, out, fingerprint=sequences, **run
    )
    config = stream.backbone.model.config
    meta = {
        **store_meta(dictionary, recorded, stream.site, source),
        "logit_lens": 0,
        "modality": "multimodal",
        "image": {"image_size": layout["size"], "thumbnail": thumbnail},
        "multimodal": {
            "version": MULTIMODAL_VERSION,
            "family": config.model_type,
            "token_types": stream.token_types,
            "image_token_id": image_token_id(config),
            "input_ids": layout["input_ids"].tolist(),
            "ordinals": layout["ordinals"].tolist(),
            "boxes": layout["boxes"].tolist(),
        },
    }
    names = _names(layout, getattr(stream.backbone, "tokenizer", None))
    finish_store(out, meta, acc, state, images, names, add=_example_boxes(layout))
    shutil.rmtree(partial_folder(out), ignore_errors=True)
    return out
