"""Embeddings of texts and images in the space a concept bank lives in.

Two kinds of encoder are supported: CLIP (text and image towers projected into their
shared space, so text concept phrases and images are comparable) and sentence encoders
(mean of the last hidden states over real tokens, as sentence-transformers' MiniLM does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_interp.errors import ConfigError

Pooling = Literal["auto", "clip", "mean", "cls", "tokens"]


def is_clip(model: Any) -> bool:
    """Whether ``model`` has CLIP-style projected text and image features."""
    return hasattr(model, "get_text_features") and hasattr(model, "get_image_features")


def _features(output: Any) -> Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected feature;
    # earlier releases return the tensor itself.
    return output if isinstance(output, Tensor) else output.pooler_output


def mean_pool(hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Mean of ``hidden [b, t, d]`` over the positions where ``attention_mask`` is 1."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


def _resolve(backbone: Any, pooling: Pooling) -> str:
    if pooling == "auto":
        return "clip" if is_clip(backbone.model) else "mean"
    if pooling == "clip" and not is_clip(backbone.model):
        raise ConfigError(
            f"pooling='clip' needs a CLIP model with text and image towers, got "
            f"{type(backbone.model).__name__}; use pooling='mean' for sentence encoders"
        )
    if pooling not in ("clip", "mean", "cls", "tokens"):
        raise ConfigError(f"pooling must be auto, clip, mean, cls or tokens, got {pooling!r}")
    return pooling


@torch.no_grad()
def embed(
    backbone: Any,
    inputs: Any,
    pooling: Pooling = "auto",
    normalize: bool = False,
    autocast_dtype: str | torch.dtype | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Embed one batch of texts or images with a frozen backbone.

    Args:
        backbone: A :class:`~lightning_interp.backbones.Backbone`.
        inputs: Raw texts, pixel values ``[b, 3, h, w]``, or a dict of model inputs.
        pooling: ``"clip"`` (projected CLIP features), ``"mean"`` (masked mean of the
            last hidden state), ``"cls"`` (first token), ``"tokens"`` (the whole last
            hidden state and the attention mask, for the concept-transformer head; for
            CLIP images the vision tower's CLS and patch tokens), or
            ``"auto"`` (clip for CLIP, else mean).
        normalize: L2-normalise pooled embeddings (CLIP and sentence-transformers do);
            token embeddings are returned as the model computed them.
        autocast_dtype: Run the forward under autocast in this dtype (results are float32).

    Returns:
        ``[b, d]`` embeddings, or ``(tokens [b, t, d], mask [b, t])`` for ``"tokens"``
        (zeros at padding), on the backbone's device.
    """
    with backbone.autocast(autocast_dtype):
        return _embed(backbone, backbone.encode(inputs), _resolve(backbone, pooling), normalize)


def _embed(
    backbone: Any, encoded: dict[str, Any], pooling: str, normalize: bool
) -> Tensor | tuple[Tensor, Tensor]:
    model = backbone.model
    is_image = "pixel_values" in encoded
    if pooling == "clip":
        if is_image:
            out = model.get_image_features(pixel_values=encoded["pixel_values"])
        else:
            keep = {k: encoded[k] for k in ("input_ids", "attention_mask") if k in encoded}
            out = model.get_text_features(**keep)
        pooled = _features(out)
    else:
        if is_clip(model):
            tower = model.vision_model if is_image else model.text_model
        else:
            tower = model
        # Pooled in float32 even under autocast: a bf16 sum over 512 tokens loses digits.
        hidden = backbone._call(tower, encoded).last_hidden_state.float()
        mask = encoded.get("attention_mask")
        if mask is None:
            mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        if pooling == "tokens":
            # Pad positions hold whatever the model computed there: zero them, so a token
            # row does not depend on which (longer) inputs shared its batch.
            mask = mask.bool()
            return hidden.masked_fill(~mask.unsqueeze(-1), 0.0), mask
        pooled = hidden[:, 0] if pooling == "cls" else mean_pool(hidden, mask)
    pooled = pooled.float()
    return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled


def pad_tokens(chunks: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Concatenate ``(tokens [b, t_i, d], mask [b, t_i])`` chunks, zero-padding to the longest.

    Padded positions are zeros in ``tokens`` and False in the mask.

    Example:
        >>> a = (torch.ones(1, 2, 3), torch.ones(1, 2, dtype=torch.bool))
        >>> b = (torch.ones(2, 4, 3), torch.ones(2, 4, dtype=torch.bool))
        >>> tokens, mask = pad_tokens([a, b])
        >>> tokens.shape, mask.sum(1).tolist()
        (torch.Size([3, 4, 3]), [2, 4, 4])
    """
    if not chunks:
        raise ConfigError("nothing to embed: the input list is empty")
    n = sum(t.shape[0] for t, _ in chunks)
    length = max(t.shape[1] for t, _ in chunks)
    first = chunks[0][0]
    tokens = first.new_zeros(n, length, first.shape[-1])
    mask = torch.zeros(n, length, dtype=torch.bool, device=first.device)
    row = 0
    for chunk, chunk_mask in chunks:
        b, t = chunk_mask.shape
        tokens[row : row + b, :t] = chunk
        mask[row : row + b, :t] = chunk_mask
        row += b
    return tokens, mask


def embed_all(
    backbone: Any,
    inputs: Sequence[Any] | Tensor,
    pooling: Pooling = "auto",
    normalize: bool = False,
    batch_size: int = 64,
    autocast_dtype: str | torch.dtype | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`embed` over many inputs in batches, returned on the CPU.

    Returns:
        ``[n, d]`` embeddings, or for ``pooling="tokens"`` ``(tokens [n, t, d], mask [n, t])``
        padded to the longest input (see :func:`pad_tokens`).
    """
    chunks = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        out = embed(backbone, chunk, pooling, normalize, autocast_dtype)
        chunks.append(tuple(t.cpu() for t in out) if isinstance(out, tuple) else out.cpu())
    if not chunks:
        raise ConfigError("nothing to embed: the input list is empty")
    if isinstance(chunks[0], tuple):
        return pad_tokens(chunks)
    return torch.cat(chunks)


def text_encoder(
    backbone: Any,
    pooling: Pooling = "auto",
    normalize: bool = True,
    batch_size: int = 64,
    autocast_dtype: str | torch.dtype | None = None,
) -> Callable[[Sequence[str]], Tensor]:
    """A ``texts -> [n, d]`` function for :meth:`ConceptBank.from_phrases`.

    For CLIP the phrases go through the text tower into the shared image-text space;
    for a sentence encoder they are mean-pooled like the sentences they will be compared to.
    """
    pooling = _resolve(backbone, pooling)
    if pooling == "tokens":
        raise ConfigError("concept phrases need a pooled embedding; use clip, mean or cls")
    return partial(
        embed_all,
        backbone,
        pooling=pooling,
        normalize=normalize,
        batch_size=batch_size,
        autocast_dtype=autocast_dtype,
    )
