"""One site's dictionary trained beside a user's run: defaults, plan, buffer, one step.

:class:`SiteTrainer` is what :class:`~lightning_interp.callbacks.DictionaryProbe` keeps
per site. The loss, ``b_dec`` initialisation, dead-latent tracking and metrics are the
:class:`~lightning_interp.modules.learner.DictionaryLearner` our own
:class:`~lightning_interp.modules.DictionaryModule` uses; what is added here is the manual
optimisation a callback needs (Lightning's automatic optimisation belongs to the user's
module), the cross-rank gradient average, and a plan that sizes batches and row reuse to
the data the run will show the probe.

Defaults follow EleutherAI's sparsify (``sparsify/config.py`` and ``sparsify/trainer.py``):
``expansion_factor=32``, ``k=32`` and, for Adam, ``lr = 2e-4 / sqrt(d_latent / 2**14)``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_interp._io import check_folder_name
from lightning_interp.data import sharding
from lightning_interp.data.buffer import ShufflingBuffer
from lightning_interp.dictionaries import Dictionary
from lightning_interp.errors import ConfigError
from lightning_interp.modules.learner import DictionaryLearner, Reduce, no_reduce

# sparsify's SparseCoderConfig defaults (Gao et al. 2024 also used k=32 on GPT-2 small).
DEFAULT_EXPANSION_FACTOR = 32
DEFAULT_K = 32
# Rows per step when data are plentiful; sparsify steps on far more (32 sequences of 2,048
# tokens), but a probe shares the user's device and memory.
DEFAULT_BATCH_SIZE = 1024
# Smallest batch the plan picks for a small run: below it Adam's steps get noisy.
MIN_AUTO_BATCH_SIZE = 128
# Most uses of one row the plan allows: past this, reuse cannot stand in for data and the
# probe warns instead. (On sklearn digits, 28 uses of 2,874 rows still gave a held-out FVU
# of 0.09, so the cap is not what overfitting would call for.)
MAX_AUTO_REPLAY = 32
# Steps a dictionary needs to be useful. Measured on a 64-wide MLP layer (sklearn digits,
# 2,048 latents, k=16): validation FVU 0.25 after 300 steps and 0.10 after 1,000, at the
# sparsify learning rate.
DEFAULT_MIN_STEPS = 500
# The plan aims this much above min_steps (partial last batches, see plan_training).
PLAN_MARGIN = 1.1
# With reuse, the buffer spans this many user batches, so a step mixes rows of many.
WINDOW_BATCHES = 8


def default_k(d_in: int) -> int:
    """The ``k=32`` of sparsify, at most a quarter of the width.

    A TopK code with ``k`` close to ``d_in`` can copy its input through and is no longer
    sparse in the sense that matters; the cap only bites on sites narrower than 128.
    """
    return max(1, min(DEFAULT_K, d_in // 4))


def default_lr(d_latent: int) -> float:
    """The Adam learning rate of sparsify, ``2e-4 / sqrt(d_latent / 2**14)``."""
    return 2e-4 / math.sqrt(d_latent / 2**14)


@dataclass(frozen=True)
class TrainingPlan:
    """How a site's dictionary trains: rows per step, uses of each row, buffer size.

    Attributes:
        batch_size: Rows per optimisation step (per DDP rank).
        replay: How many times each captured row is trained on (each row enters the
            buffer that many times, shuffled among the others).
        buffer_size: Rows (copies included) the buffer holds before a step is taken.
        expected_steps: Steps the run should allow (the rows left in the buffer at the
            end excluded), estimated when planned; ``inf`` when the run's length is unknown.
    """

    batch_size: int
    replay: int
    buffer_size: int
    expected_steps: float


def plan_training(
    rows_per_batch: float,
    batches: float,
    *,
    batch_size: int | None = None,
    replay: int | None = None,
    buffer_size: int | None = None,
    min_steps: int = DEFAULT_MIN_STEPS,
) -> TrainingPlan:
    """Size batches and row reuse so that the run gives at least ``min_steps`` steps.

    Plentiful data (``rows / DEFAULT_BATCH_SIZE >= min_steps``, or a run of unknown
    length) train as sparsify does: batches of 1,024 rows, each row once. A small run
    first shrinks the batch (to no fewer than 128 rows), then reuses each row up to 32
    times, drawing from a buffer that spans several user batches.

    Args:
        rows_per_batch: Rows one captured user batch gives this site (on one rank).
        batches: Captured user batches the run will still give (``inf`` if unknown).
        batch_size: Fixed rows per step, or ``None`` to choose.
        replay: Fixed uses of each row, or ``None`` to choose.
        buffer_size: Fixed buffer size in rows, or ``None`` to choose.
        min_steps: Steps the run must give; the plan aims 10% higher, because the estimate
            counts each epoch's last batch as full when it is often partial.

    Example:
        >>> plan_training(64, 69)  # a small MLP, 3 epochs of 1,437 rows
        TrainingPlan(batch_size=128, replay=19, buffer_size=9728, expected_steps=579.5)
        >>> plan_training(8 * 1024, float("inf"))  # a language model, run of unknown length
        TrainingPlan(batch_size=1024, replay=1, buffer_size=4096, expected_steps=inf)
    """
    rows = rows_per_batch * batches
    known = math.isfinite(rows) and rows > 0
    target = PLAN_MARGIN * min_steps
    if batch_size is None:
        batch_size = DEFAULT_BATCH_SIZE
        if known:
            fitting = 2 ** math.floor(math.log2(max(rows / target, 1)))
            batch_size = int(min(DEFAULT_BATCH_SIZE, max(MIN_AUTO_BATCH_SIZE, fitting)))
        if buffer_size is not None:
            batch_size = min(batch_size, buffer_size)
    # With reuse, the buffer spans several user batches, so that copies of one batch do
    # not fill it alone; these rows are still in the buffer when training ends.
    window = WINDOW_BATCHES * rows_per_batch
    if known:
        window = min(window, rows / 4)
    if replay is None:
        replay = 1
        if known and rows - 4 * batch_size < target * batch_size:
            needed = math.ceil(target * batch_size / (rows - window))
            replay = int(min(MAX_AUTO_REPLAY, max(1, needed)))
    if buffer_size is None:
        buffer_size = 4 * batch_size
        if replay > 1:
            buffer_size = max(buffer_size, math.ceil(replay * window))
    if buffer_size < batch_size:
        raise ConfigError(f"buffer_size ({buffer_size}) must be >= batch_size ({batch_size})")
    expected = max(rows * replay - buffer_size, 0) / batch_size if known else math.inf
    return TrainingPlan(batch_size, replay, int(buffer_size), expected)


# ---------------------------------------------------------------------- probe checkpoints
def site_folder(name: str) -> str:
    """A folder name for a site (``model.h.1:input`` becomes ``model.h.1-input``).

    Raises:
        UnsafePathError: what is left is not one safe folder level (``..``, a leading dot).
    """
    return check_folder_name(re.sub(r"[^A-Za-z0-9._-]", "-", name), "site")


# What differs between DDP ranks in a site's state: each rank buffers its own activations.
RANK_KEYS = ("buffer_rows", "buffer_state", "rows_buffered")


def gather_rank_buffers(sites: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Under DDP, replace each site's buffer by every rank's (under ``"ranks"``).

    Only rank 0 writes the checkpoint, but the dictionaries are identical on every rank
    and the buffers are not; every rank calls ``state_dict`` while a checkpoint is
    dumped, so this collective is matched.
    """
    rank, ranks = sharding.world()
    if ranks == 1:
        return sites
    local = {name: {key: state[key] for key in RANK_KEYS} for name, state in sites.items()}
    gathered: list[Any] = [None] * ranks
    torch.distributed.all_gather_object(gathered, local)
    return {
        name: {
            **{k: v for k, v in state.items() if k not in RANK_KEYS},
            "ranks": [g[name] for g in gathered],
        }
        for name, state in sites.items()
    }


def own_rank_buffer(state: dict[str, Any]) -> dict[str, Any]:
    """The calling rank's view of a site state saved by :func:`gather_rank_buffers`."""
    if "ranks" not in state:
        return state
    rank, ranks = sharding.world()
    if len(state["ranks"]) != ranks:
        raise ConfigError(
            f"the checkpoint holds probe buffers of {len(state['ranks'])} DDP ranks but this "
            f"run has {ranks}; resume with the same number of devices"
        )
    shared = {k: v for k, v in state.items() if k != "ranks"}
    return {**shared, **state["ranks"][rank]}


class SiteTrainer:
    """A dictionary, its optimizer and a shuffling buffer of one site's activations.

    Rows captured during a user batch are staged (:meth:`stage`) and handed over at the
    batch's end (:meth:`absorb`): they first update the running metrics, so FVU, L0 and
    the dead fraction are measured on rows the dictionary has never trained on, then go
    into the buffer ``plan.replay`` times each. Steps draw ``plan.batch_size`` rows from
    the buffer while it is full.

    Args:
        dictionary: The dictionary to train (placed where the user's model is).
        lr: Adam learning rate.
        dead_tokens_threshold: Rows without firing after which a latent counts as dead.
        seed: Seed of the buffer's private shuffling generator.
        plan: Batch size, reuse and buffer size; ``None`` until the probe has seen a
            batch and called :meth:`configure`.
    """

    def __init__(
        self,
        dictionary: Dictionary,
        *,
        lr: float,
        dead_tokens_threshold: int,
        seed: int,
        plan: TrainingPlan | None = None,
    ) -> None:
        self.learner = DictionaryLearner(
            dictionary, dead_tokens_threshold=dead_tokens_threshold, dense_threshold=0.1
        )
        self.lr = lr
        self.seed = seed
        self.optimizer = torch.optim.Adam(dictionary.parameters(), lr=lr)
        self.steps = 0
        self.rows_buffered = 0  # distinct rows captured on this rank, ever
        self.plan: TrainingPlan | None = None
        self.buffer: ShufflingBuffer | None = None
        self._staged: list[Tensor] = []
        if plan is not None:
            self.configure(plan)

    @property
    def dictionary(self) -> Dictionary:
        """The dictionary being trained."""
        return self.learner.dictionary

    def configure(self, plan: TrainingPlan) -> None:
        """Adopt a :class:`TrainingPlan` (once; it is kept in checkpoints)."""
        self.plan = plan
        self.buffer = ShufflingBuffer(plan.buffer_size, seed=self.seed)

    def stage(self, rows: Tensor) -> None:
        """Keep activation rows ``[N, d_in]`` of the current user batch until :meth:`absorb`.

        The rows are copied onto the dictionary's device and dtype: the user's forward
        may still modify them in place (``ReLU(inplace=True)`` after the site), and a
        site's activations need not live where the dictionary does.
        """
        self.dictionary.check_input(rows)
        self._staged.append(
            rows.detach().to(device=self.dictionary.device, dtype=self.dictionary.dtype, copy=True)
        )

    @property
    def staged_rows(self) -> int:
        """Rows staged since the last :meth:`absorb`."""
        return sum(rows.shape[0] for rows in self._staged)

    @torch.no_grad()
    def absorb(self) -> None:
        """Measure the staged rows, then buffer ``plan.replay`` copies of each."""
        if not self._staged:
            return
        assert self.buffer is not None and self.plan is not None, "configure() first"
        rows = torch.cat(self._staged)
        self._staged = []
        with torch.autocast(rows.device.type, enabled=False):
            self.learner.update_metrics(rows, None)
        self.buffer.add(rows.repeat(self.plan.replay, 1) if self.plan.replay > 1 else rows)
        self.rows_buffered += rows.shape[0]

    @property
    def ready(self) -> bool:
        """Whether the buffer holds enough rows for a step."""
        return (
            self.buffer is not None
            and self.plan is not None
            and self.buffer.is_full
            and len(self.buffer) >= self.plan.batch_size
        )

    def step(self, reduce: Reduce = no_reduce, world_size: int = 1) -> dict[str, Tensor]:
        """One optimisation step on a batch drawn from the buffer.

        Under DDP every rank takes a step at once and the gradients are averaged, so all
        ranks hold the same dictionary.

        Returns:
            Detached values worth logging (``loss``, ``fvu``, ``l0``, ``dead_fraction``, ...).
        """
        assert self.buffer is not None and self.plan is not None, "configure() first"
        rows = self.buffer.take(self.plan.batch_size)
        # The user's autocast does not reach here, but be explicit: the step runs in the
        # dictionary's own dtype.
        with torch.enable_grad(), torch.autocast(rows.device.type, enabled=False):
            loss, logged = self.learner.training_loss(rows, None, reduce=reduce)
            self.optimizer.zero_grad(set_to_none=True)
            if loss.requires_grad:  # a closed-form learner (semi-NMF) has already stepped
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
        """Move weights, counters, metrics, optimizer state and rows to ``device``."""
        if self.dictionary.device == device:
            return
        state = self.optimizer.state_dict()
        self.learner.to(device)
        # Rebuilt and reloaded: load_state_dict moves Adam's moments to the new device.
        self.optimizer = torch.optim.Adam(self.dictionary.parameters(), lr=self.lr)
        self.optimizer.load_state_dict(state)
        if self.buffer is not None:
            self.buffer.to(device)
        self._staged = [rows.to(device) for rows in self._staged]

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self, *, include_buffer: bool) -> dict[str, Any]:
        """Everything a resumed run needs (tensors moved to CPU)."""
        state: dict[str, Any] = {
            "config": self.dictionary.config.to_dict(),
            "learner": {k: v.detach().cpu() for k, v in self.learner.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "steps": self.steps,
            "rows_buffered": self.rows_buffered,
            "plan": None if self.plan is None else asdict(self.plan),
            "buffer_state": None if self.buffer is None else self.buffer.state_dict(),
            "buffer_rows": None,
        }
        if include_buffer and self.buffer is not None and len(self.buffer):
            state["buffer_rows"] = self.buffer.rows().detach().cpu().clone()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (the dictionary must have its config)."""
        self.learner.load_state_dict(state["learner"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])
        self.rows_buffered = int(state["rows_buffered"])
        self.plan, self.buffer = None, None
        if state.get("plan") is not None:
            self.configure(TrainingPlan(**state["plan"]))
            assert self.buffer is not None
            rows = state.get("buffer_rows")
            if rows is not None:
                self.buffer.add(rows.to(self.dictionary.device))
            self.buffer.load_state_dict(state["buffer_state"])
