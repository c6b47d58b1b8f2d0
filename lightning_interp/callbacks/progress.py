"""Progress for log files: plain lines instead of a redrawn bar.

Lightning's bars redraw themselves with carriage returns every step; written to a file
(``nohup``, ``> run.log``, a batch job) that is thousands of frames on one line. The CLI
uses :class:`LogProgress` instead when stdout is not a terminal; any Lightning project can
pass it to its own ``Trainer(callbacks=[...])``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar


class LogProgress(ProgressBar):
    """Progress for log files: one plain line about 20 times an epoch, and after validation.

    Used instead of Lightning's redrawn bar when stdout is not a terminal (``nohup``,
    ``> run.log``, a batch job), where a bar refreshed every step floods the file.

    Args:
        lines_per_epoch: Training lines printed per epoch (when its length is known;
            otherwise one every 100 steps).
    """

    def __init__(self, lines_per_epoch: int = 20) -> None:
        super().__init__()
        self.lines_per_epoch = lines_per_epoch
        self._enabled = True
        self._start = time.monotonic()

    def disable(self) -> None:
        """Print nothing (Lightning calls this on ranks other than 0)."""
        self._enabled = False

    def enable(self) -> None:
        """Print again."""
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the clock."""
        self._start = time.monotonic()

    def _metrics(self, trainer: L.Trainer, pl_module: L.LightningModule, val: bool) -> str:
        items = []
        for key, value in self.get_metrics(trainer, pl_module).items():
            if key.startswith("val") != val or key == "v_num":
                continue
            text = f"{value:.4g}" if isinstance(value, float) else str(value)
            items.append(f"{key}={text}")
        return " ".join(items)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        """Print a line every ~1/20 of the epoch, and at its last batch."""
        total = self.total_train_batches
        done = i + 1
        every = math.ceil(total / self.lines_per_epoch) if math.isfinite(total) else 100
        if not self._enabled or (done % every and done != total):
            return
        of = f"/{int(total)}" if math.isfinite(total) else ""
        elapsed = time.strftime("%H:%M:%S", time.gmtime(time.monotonic() - self._start))
        metrics = self._metrics(trainer, pl_module, val=False)
        print(f"epoch {trainer.current_epoch} batch {done}{of} [{elapsed}] {metrics}", flush=True)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Print the validation metrics shown in the progress bar."""
        if self._enabled and not trainer.sanity_checking:
            metrics = self._metrics(trainer, pl_module, val=True)
            print(f"validation at step {trainer.global_step}: {metrics}", flush=True)
