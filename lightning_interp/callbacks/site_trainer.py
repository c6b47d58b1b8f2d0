"""One site's dictionary trained beside a user's run: buffer, learner, optimizer, one step.

:class:`SiteTrainer` is what :class:`~lightning_interp.callbacks.DictionaryProbe` keeps
per site. The loss, ``b_dec`` initialisation, dead-latent tracking and metrics are the
:class:`~lightning_interp.modules.learner.DictionaryLearner` our own
:class:`~lightning_interp.modules.DictionaryModule` uses; what is added here is the manual
optimisation a callback needs (Lightning's automatic optimisation belongs to the user's
module) and the cross-rank gradient average.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_interp.data.buffer import ShufflingBuffer
from lightning_interp.dictionaries import Dictionary
from lightning_interp.modules.learner import DictionaryLearner, Reduce, no_reduce


class SiteTrainer:
    """A dictionary, its optimizer and a shuffling buffer of one site's activations.

    Args:
        dictionary: The dictionary to train (fp32 weights, whatever the model's precision).
        lr: Adam learning rate.
        batch_size: Rows per optimisation step.
        buffer_size: Rows the buffer must hold before a step (each step takes
            ``batch_size`` of them, so every batch is drawn from a mix of user batches).
        dead_tokens_threshold: Rows without firing after which a latent counts as dead.
        seed: Seed of the buffer's private shuffling generator.
    """

    def __init__(
        self,
        dictionary: Dictionary,
        *,
        lr: float,
        batch_size: int,
        buffer_size: int,
        dead_tokens_threshold: int,
        seed: int,
    ) -> None:
        self.learner = DictionaryLearner(
            dictionary, dead_tokens_threshold=dead_tokens_threshold, dense_threshold=0.1
        )
        self.lr = lr
        self.batch_size = batch_size
        self.buffer = ShufflingBuffer(buffer_size, seed=seed)
        self.seed = seed
        self.optimizer = torch.optim.Adam(dictionary.parameters(), lr=lr)
        self.steps = 0
        self.rows_buffered = 0  # rows captured on this rank, ever

    @property
    def dictionary(self) -> Dictionary:
        """The dictionary being trained."""
        return self.learner.dictionary

    def add(self, rows: Tensor) -> None:
        """Buffer activation rows ``[N, d_in]`` (checked against the dictionary's width)."""
        self.dictionary.check_input(rows)
        self.buffer.add(rows.to(self.dictionary.dtype))
        self.rows_buffered += rows.shape[0]

    @property
    def ready(self) -> bool:
        """Whether the buffer holds enough rows for a step."""
        return self.buffer.is_full and len(self.buffer) >= self.batch_size

    def step(self, reduce: Reduce = no_reduce, world_size: int = 1) -> dict[str, Tensor]:
        """One optimisation step on a batch drawn from the buffer.

        The batch first updates the running metrics (FVU, L0, dead fraction): rows the
        dictionary has not trained on, so the metrics are an honest estimate of what it
        keeps. Under DDP every rank takes a step at once and the gradients are averaged,
        so all ranks hold the same dictionary.

        Returns:
            Detached values worth logging (``loss``, ``fvu``, ``l0``, ``dead_fraction``, ...).
        """
        rows = self.buffer.take(self.batch_size)
        self.learner.update_metrics(rows, None)
        # The user's autocast does not reach here, but be explicit: fp32 master weights.
        with torch.enable_grad(), torch.autocast(rows.device.type, enabled=False):
            loss, logged = self.learner.training_loss(rows, None, reduce=reduce)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        if world_size > 1:
            self._average_gradients(reduce)
        self.learner.before_optimizer_step()
        self.optimizer.step()
        self.learner.after_optimizer_step()
        self.steps += 1
        logged["loss"] = loss.detach()
        return logged

    @torch.no_grad()
    def _average_gradients(self, reduce: Reduce) -> None:
        # One collective for all parameters; a parameter without a gradient on this rank
        # contributes zeros, so every rank sends the same shapes.
        params = list(self.dictionary.parameters())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = reduce(torch.cat([g.reshape(-1) for g in grads]), "mean")
        offset = 0
        for param in params:
            n = param.numel()
            param.grad = flat[offset : offset + n].view_as(param).clone()
            offset += n

    def metrics(self) -> dict[str, Any]:
        """The running torchmetrics the probe reports (``fvu``, ``l0``, ``dead_fraction``)."""
        metrics = self.learner.metrics()
        return {name: metrics[name] for name in ("fvu", "l0", "dead_fraction")}

    @property
    def metric_updates(self) -> int:
        """Batches in the metrics since their last reset (torchmetrics counts them)."""
        return self.learner.val_fvu.update_count

    def reset_metrics(self) -> None:
        """Start a new metric window (every training epoch)."""
        self.learner.reset_metrics()

    def to(self, device: torch.device) -> None:
        """Move weights, counters, metrics and optimizer state to ``device``."""
        if self.dictionary.device == device:
            return
        state = self.optimizer.state_dict()
        self.learner.to(device)
        # Rebuilt and reloaded: load_state_dict moves Adam's moments to the new device.
        self.optimizer = torch.optim.Adam(self.dictionary.parameters(), lr=self.lr)
        self.optimizer.load_state_dict(state)
        self.buffer.to(device)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self, *, include_buffer: bool) -> dict[str, Any]:
        """Everything a resumed run needs (tensors moved to CPU)."""
        state: dict[str, Any] = {
            "config": self.dictionary.config.to_dict(),
            "learner": {k: v.detach().cpu() for k, v in self.learner.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "steps": self.steps,
            "rows_buffered": self.rows_buffered,
            "buffer_state": self.buffer.state_dict(),
            "buffer_rows": None,
        }
        if include_buffer and len(self.buffer):
            state["buffer_rows"] = self.buffer.rows().detach().cpu().clone()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (the dictionary must have its config)."""
        self.learner.load_state_dict(state["learner"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])
        self.rows_buffered = int(state["rows_buffered"])
        self.buffer = ShufflingBuffer(self.buffer.capacity, seed=self.seed)
        rows = state.get("buffer_rows")
        if rows is not None:
            self.buffer.add(rows.to(self.dictionary.device))
        self.buffer.load_state_dict(state["buffer_state"])
