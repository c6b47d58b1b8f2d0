"""Plain user LightningModules (not built with lightning-interp) that the callbacks plug into."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy
from transformers import GPT2Config, GPT2LMHeadModel


def digits(split: str) -> TensorDataset:
    """sklearn digits (offline), standardised; 1,437 train / 360 val rows."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(data.target)
    cut = 1437
    return TensorDataset(x[:cut], y[:cut]) if split == "train" else TensorDataset(x[cut:], y[cut:])


class DigitsMLP(L.LightningModule):
    """A user's MLP: 64 -> hidden -> 10, with dropout (so it draws from the global RNG)."""

    def __init__(self, hidden: int = 64, dropout: float = 0.1, lr: float = 1e-2) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 10)
        )
        self.lr = lr
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=10, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.val_acc(logits, y)
        self.log("val_acc", self.val_acc)

    def test_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("test_loss", F.cross_entropy(logits, y))
        self.test_acc(logits, y)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class DigitsData(L.LightningDataModule):
    """The digits as a LightningDataModule (for LightningCLI)."""

    def __init__(self, batch_size: int = 64, shuffle: bool = True) -> None:
        super().__init__()
        self.batch_size, self.shuffle = batch_size, shuffle

    def train_dataloader(self) -> DataLoader:
        return DataLoader(digits("train"), batch_size=self.batch_size, shuffle=self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(digits("val"), batch_size=120)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


def token_batches(n: int = 64, seq: int = 16, vocab: int = 64, seed: int = 0) -> list[dict]:
    """Dict batches of 8 random token rows, right-padded to varying lengths."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq), generator=generator)
    lengths = torch.randint(seq // 2, seq + 1, (n,), generator=generator)
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    return [
        {"input_ids": ids[i : i + 8], "attention_mask": mask[i : i + 8]} for i in range(0, n, 8)
    ]


class TinyGPT(L.LightningModule):
    """A user's tiny GPT-2 language model (random init from a config, dropout on)."""

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        config = GPT2Config(
            vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, n_inner=64
        )
        self.model = GPT2LMHeadModel(config)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        out = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels
        )
        self.log("train_loss", out.loss)
        return out.loss

    def validation_step(self, batch, batch_idx):
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        out = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels
        )
        self.log("val_loss", out.loss)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)
