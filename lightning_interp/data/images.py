"""Activations of images: CLIP vision patch tokens and/or CLS, shuffled into batches."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import IterableDataset

from lightning_interp.data import sharding
from lightning_interp.data.buffer import ShufflingBuffer
from lightning_interp.errors import ConfigError

TokenChoice = Literal["all", "cls", "patches"]


def select_tokens(acts: Tensor, tokens: TokenChoice) -> Tensor:
    """Rows to train on from vision-tower activations ``[images, 1 + patches, d]``.

    CLIP's vision tower puts the class token first: ``"cls"`` keeps it alone (one row
    per image, the image summary), ``"patches"`` keeps the patch tokens (local
    features), ``"all"`` keeps both.
    """
    if tokens == "cls":
        return acts[:, 0]
    if tokens == "patches":
        return acts[:, 1:].reshape(-1, acts.shape[-1])
    if tokens == "all":
        return acts.reshape(-1, acts.shape[-1])
    raise ConfigError(f"tokens must be 'all', 'cls' or 'patches', got {tokens!r}")


class ImageActivations(IterableDataset):
    """A backbone's vision activations over a set of images, as shuffled batches of rows.

    Each epoch visits the images in an order fixed by ``(seed, epoch)``, captures
    ``images_per_capture`` at a time (the forward stops after the site), keeps the chosen
    tokens, and mixes them in a :class:`ShufflingBuffer` before yielding batches ``{site:
    [batch_size, d]}`` (keyed by the canonical site, as every activation source's; see
    :mod:`~lightning_interp.data.batches`). DDP ranks and data-loader workers take every
    n-th capture group.

    Args:
        backbone: A :class:`~lightning_interp.backbones.Backbone` with a vision tower.
        images: Pixel values ``[N, 3, H, W]``, or a sequence of images (PIL, arrays) that
            the backbone's processor turns into pixel values.
        site: A vision site such as ``"vision.layers.6.resid_post"``.
        batch_size: Rows per batch.
        tokens: ``"all"``, ``"cls"`` or ``"patches"``.
        images_per_capture: Images per backbone forward.
        buffer_tokens: Rows held by the shuffling buffer.
        seed: Seed of the image order and of the buffer.
        autocast_dtype: Run the backbone under autocast in this dtype.
    """

    def __init__(
        self,
        backbone: Any,
        images: Tensor | Sequence[Any],
        site: str,
        *,
        batch_size: int,
        tokens: TokenChoice = "all",
        images_per_capture: int = 32,
        buffer_tokens: int = 65_536,
        seed: int = 0,
        autocast_dtype: str | torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if batch_size <= 0 or images_per_capture <= 0 or buffer_tokens < batch_size:
            raise ConfigError(
                "batch_size and images_per_capture must be positive and buffer_tokens at "
                f"least batch_size (got {batch_size}, {images_per_capture}, {buffer_tokens})"
            )
        (self.site,) = backbone.resolve_sites(site)
        self.backbone = backbone
        self.images = images
        self.batch_size = batch_size
        self.tokens = tokens
        self.images_per_capture = images_per_capture
        self.buffer_tokens = buffer_tokens
        self.seed = seed
        self.autocast_dtype = autocast_dtype
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch the next pass draws."""
        self.epoch = epoch

    def _groups(self, epoch: int) -> list[Tensor]:
        order = torch.randperm(
            len(self.images), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        )
        groups = list(order.split(self.images_per_capture))
        rank, world = sharding.shard()
        return groups[rank::world]

    def _capture(self, indices: Tensor) -> Tensor:
        if isinstance(self.images, Tensor):
            inputs: Any = {"pixel_values": self.images[indices]}
        else:
            inputs = [self.images[int(i)] for i in indices]
        acts = self.backbone.capture(inputs, self.site, autocast_dtype=self.autocast_dtype)
        return select_tokens(acts[self.site], self.tokens)

    @property
    def sites(self) -> list[str]:
        """The one site served, canonical (the key of every batch)."""
        return [self.site]

    @property
    def scales(self) -> dict[str, float]:
        """Site -> factor rows are multiplied by: none, image rows are raw activations."""
        return {}

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        epoch = self.epoch
        self.epoch += 1
        buffer = ShufflingBuffer(self.buffer_tokens, seed=self.seed * 7919 + epoch)
        for group in self._groups(epoch):
            buffer.add(self._capture(group))
            while not buffer.needs_refill and len(buffer) >= self.batch_size:
                yield {self.site: buffer.take(self.batch_size)}
        while len(buffer) >= self.batch_size:  # drain at the end of the epoch
            yield {self.site: buffer.take(self.batch_size)}

    def state_dict(self) -> Mapping[str, Any]:
        """The epoch the next pass will draw."""
        return {"epoch": self.epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (resumes at an epoch boundary)."""
        self.epoch = int(state["epoch"])
