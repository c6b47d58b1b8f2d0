"""The page data of one example of a latent page: a text context, an image, an image + caption.

Split from :mod:`~lightning_interp.features.dashboard` (which renders the pages); each
function returns what a template macro draws (``latent.html.j2``'s ``context``,
``image_examples.html.j2``'s ``patches`` and ``multimodal``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from lightning_interp.features.dashboard_store import DashboardStore, TokenTexts


class ImageExample(NamedTuple):
    """One example of an image or multimodal store, as ``contexts.safetensors`` holds it.

    Attributes:
        tokens: Positions (-1 padding).
        acts: The latent's activation at each.
        centre: Position of the example's maximum.
        value: The example's maximum.
        image: The image's index (``None``: the store records none).
    """

    tokens: list[int]
    acts: list[float]
    centre: int
    value: float
    image: int | None


def shade(act: float, scale: float) -> str:
    """Activation / latent max, clamped to [0, 1], as the CSS variable's text."""
    return f"{min(max(act / scale, 0.0), 1.0) if scale > 0 else 0.0:.2f}"


def context(
    texts: TokenTexts,
    tokens: list[int],
    acts: list[float],
    centre: int,
    value: float,
    scale: float,
) -> dict[str, Any]:
    """One context as segments: runs of silent tokens merged, each firing token on its own.

    Merging keeps pages small (most tokens of a sparse latent's window are silent); a firing
    token carries its shade (activation / latent max, clamped to [0, 1]) and its activation.
    """
    segments: list[dict[str, Any]] = []
    for position, (token, act) in enumerate(zip(tokens, acts, strict=True)):
        if token < 0:
            continue
        text = texts[token]
        if act > 0 or position == centre:
            segments.append(
                {
                    "text": text,
                    "shade": shade(act, scale),
                    "act": f"{act:.4g}",
                    "centre": position == centre,
                }
            )
        elif segments and segments[-1]["shade"] is None:
            segments[-1]["text"] += text
        else:
            segments.append({"text": text, "shade": None})
    return {"value": value, "segments": segments}


def patches(store: DashboardStore, example: ImageExample, scale: float) -> dict[str, Any]:
    """An image example: its thumbnail, the firing patches shaded over it, the class token.

    Tokens are positions (``build_images``): the class token first when the store has one,
    then the patches row by row. Only firing patches (and the centre) become cells, placed
    by row and column, so a sparse latent's page stays small.
    """
    tokens, acts, centre, value, image = example
    spec = store.meta.get("image") or {}
    first = int(bool(spec.get("class_token")))
    present = [(token, act) for token, act in zip(tokens, acts, strict=True) if token >= 0]
    # A store without a grid (older layouts): the smallest square that holds the tokens.
    side = int(spec["grid"][1]) if spec else math.isqrt(max(len(present) - 1, 0)) + 1
    cells = [
        {
            "name": store.tokens[token],
            "row": (token - first) // side + 1,
            "col": (token - first) % side + 1,
            "shade": shade(act, scale),
            "act": act,
            "centre": token == centre,
        }
        for token, act in present
        if token >= first and (act > 0 or token == centre)
    ]
    cls = next(({"act": a, "shade": shade(a, scale)} for t, a in present if t == 0), None)
    return {
        "value": value,
        "side": side,
        "cells": cells,
        "cls": cls if first and spec.get("tokens") != "patches" else None,  # else never counted
        "image": image,
        "thumb": image is not None and image in store.thumbnails,
    }


def multimodal(store: DashboardStore, example: ImageExample, scale: float) -> dict[str, Any]:
    """An (image, caption) example: the caption as a text context, boxes over the thumbnail.

    Tokens are positions (``build_multimodal``); store.json's ``multimodal`` block gives
    each its image-token ordinal and each ordinal its pixel box in the ``image_size`` square.
    Each firing image token (and the centre) becomes a box shaded by its activation; larger
    boxes first, so a class token's whole-image box lies under the patches.
    """
    tokens, acts, centre, value, image = example
    spec, size = store.meta["multimodal"], store.meta["image"]["image_size"]
    ordinals, boxes = spec["ordinals"], spec["boxes"]
    shown = []
    for token, act in zip(tokens, acts, strict=True):
        k = ordinals[token] if token >= 0 else -1
        if k < 0 or boxes[k][0] < 0 or not (act > 0 or token == centre):
            continue
        top, left, bottom, right = (100 * v / size for v in boxes[k])
        shown.append(
            {
                "name": store.tokens[token],
                "style": f"top:{top:.2f}%;left:{left:.2f}%;"
                f"height:{bottom - top:.2f}%;width:{right - left:.2f}%",
                "shade": shade(act, scale),
                "act": act,
                "centre": token == centre,
                "area": (bottom - top) * (right - left),
            }
        )
    text = [t if t >= 0 and ordinals[t] < 0 else -1 for t in tokens]  # the caption only
    return {
        "value": value,
        "boxes": sorted(shown, key=lambda b: -b["area"]),
        "caption": context(store.tokens, text, acts, centre, value, scale)["segments"],
        "image": image,
        "thumb": image is not None and image in store.thumbnails,
    }
