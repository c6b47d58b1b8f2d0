"""A Lightning callback that times training steps and writes tokens/s to a JSON file.

Used by ``benchmarks/gpu_check.py`` and ``benchmarks/end_to_end.py`` through the CLI
(``--trainer.callbacks+=benchmarks.throughput.TokensPerSecond``, with the repository root on
``PYTHONPATH``). The clock starts at the start of batch ``skip`` (warm-up excluded: CUDA
context, autotuning, the stream's first buffer fill) and stops at the end of training; on CUDA
both ends call ``torch.cuda.synchronize()`` so queued kernels are counted. Everything between
is counted: the activation stream's captures, the steps, logging.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch


def _rows(batch: Any) -> int:
    """Activation rows in a batch: the first 2-D tensor's length (inputs ``[N, d]``)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.ndim == 2 else 0
    values = batch.values() if isinstance(batch, dict) else batch
    if isinstance(values, (list, tuple, type({}.values()))):
        for value in values:
            rows = _rows(value)
            if rows:
                return rows
    return 0


class TokensPerSecond(L.Callback):
    """Tokens (activation rows) per second of training after ``skip`` warm-up batches.

    Args:
        out: JSON file to write ``{"tokens": ..., "seconds": ..., "tokens_per_second": ...}``.
        skip: Batches left out of the timing.
    """

    def __init__(self, out: str, skip: int = 5) -> None:
        self.out, self.skip = Path(out), skip
        self.start: float | None = None
        self.tokens = 0
        self.batches = 0

    def _sync(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: D102
        if batch_idx == self.skip:
            self._sync(pl_module)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        if self.start is not None:
            self.tokens += _rows(batch)
            self.batches += 1

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: D102
        self._sync(pl_module)
        seconds = time.perf_counter() - self.start if self.start is not None else 0.0
        result = {
            "tokens": self.tokens,
            "batches": self.batches,
            "seconds": seconds,
            "tokens_per_second": self.tokens / seconds if seconds > 0 else None,
            "device": str(pl_module.device),
            "max_memory_allocated_mb": (
                torch.cuda.max_memory_allocated(pl_module.device) / 2**20
                if pl_module.device.type == "cuda"
                else None
            ),
        }
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(result, indent=1))
