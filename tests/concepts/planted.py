"""Synthetic problems with planted concepts: x = c A + noise, y = f(c)."""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp.concepts import ConceptBank

CLASSES = ["neither", "only_b", "only_a", "both"]
QUIET = dict(
    accelerator="cpu",
    devices=1,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
)


@dataclass
class Planted:
    """Embeddings, concepts, labels and the planted directions of a synthetic problem."""

    x: torch.Tensor
    c: torch.Tensor
    y: torch.Tensor
    directions: torch.Tensor
    names: list[str]

    def split(self, n_train: int) -> tuple[tuple, tuple]:
        train = (self.x[:n_train], self.y[:n_train], self.c[:n_train])
        test = (self.x[n_train:], self.y[n_train:], self.c[n_train:])
        return train, test

    def bank(self, distractors: int = 0, seed: int = 1) -> ConceptBank:
        g = torch.Generator().manual_seed(seed)
        extra = torch.randn(distractors, self.x.shape[1], generator=g)
        names = self.names + [f"distractor_{i}" for i in range(distractors)]
        return ConceptBank(names, torch.cat([self.directions, extra]))


def planted(n: int = 1200, d: int = 32, k: int = 6, noise: float = 0.5, seed: int = 0) -> Planted:
    """Binary concepts ``c`` (k of them) in embeddings ``x = (2c - 1) A + noise``.

    The label is ``2 * c_0 + c_1`` (four classes); concepts 2.. are distractors for the
    label but real concepts in the data.
    """
    g = torch.Generator().manual_seed(seed)
    directions = torch.linalg.qr(torch.randn(d, k, generator=g))[0].T * 2.0
    c = (torch.rand(n, k, generator=g) > 0.5).float()
    x = (2 * c - 1) @ directions + noise * torch.randn(n, d, generator=g)
    y = (2 * c[:, 0] + c[:, 1]).long()
    names = [f"concept_{i}" for i in range(k)]
    return Planted(x, c, y, directions, names)


def loader(tensors: tuple, batch_size: int = 128, shuffle: bool = True) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(*tensors), batch_size=batch_size, shuffle=shuffle, generator=generator
    )


def fit(module: L.LightningModule, train: tuple, epochs: int, **trainer_kwargs) -> L.Trainer:
    trainer = L.Trainer(max_epochs=epochs, **{**QUIET, **trainer_kwargs})
    trainer.fit(module, loader(train))
    return trainer


def accuracy(head, x: torch.Tensor, y: torch.Tensor, **kwargs) -> float:
    with torch.no_grad():
        return float((head(x, **kwargs).logits.argmax(-1) == y).float().mean())


def planted_tokens(
    n: int = 800, tokens: int = 6, d: int = 16, k: int = 4, noise: float = 0.3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token sequences where each present concept sits on one random token.

    Returns ``(x [n, tokens, d], mask [n, tokens], c [n, k], y [n], where [n, k])``: the
    label is ``2 * c_0 + c_1``; ``where`` is the token holding each concept (-1: absent).
    The last token of every other sequence is padding (masked, and pure noise).
    """
    g = torch.Generator().manual_seed(seed)
    directions = torch.linalg.qr(torch.randn(d, k, generator=g))[0].T * 3.0
    c = (torch.rand(n, k, generator=g) > 0.5).float()
    x = noise * torch.randn(n, tokens, d, generator=g)
    mask = torch.ones(n, tokens, dtype=torch.bool)
    mask[::2, -1] = False
    where = torch.full((n, k), -1)
    for i in range(n):
        length = int(mask[i].sum())
        for j in torch.nonzero(c[i]).flatten().tolist():
            t = int(torch.randint(length, (1,), generator=g))
            x[i, t] += directions[j]
            where[i, j] = t
    y = (2 * c[:, 0] + c[:, 1]).long()
    return x, mask, c, y, where
