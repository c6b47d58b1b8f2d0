"""What a training step does with a batch or a loss it cannot use: raise, or skip and count.

A single NaN or infinite activation spreads through one optimizer step into every weight
(Adam's moments keep it for good), and a batch of zero rows makes the geometric-median
``b_dec`` initialisation return NaN. :class:`BatchGuard` checks each batch before it touches
any state, and each loss before its backward pass, and under the module's ``on_nonfinite``
policy either raises a one-line error naming the global step, the batch index and the input
at fault (``"raise"``, the default) or skips the step and counts it (``"skip"``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_interp.errors import ConfigError, NonFiniteError, ShapeMismatchError

NonFinitePolicy = Literal["raise", "skip"]
POLICIES = ("raise", "skip")

# How many skipped batches are announced one by one before only every 100th is.
_ANNOUNCED = 5


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether every element of every tensor is finite, in one cheap test.

    A sum is NaN or infinite whenever one of its terms is (IEEE arithmetic propagates NaN,
    and Inf plus anything is Inf or NaN), so finite sums prove finite elements: one
    reduction per tensor and one device sync in all, instead of a boolean copy of every
    tensor and a sync each. The converse does not hold: finite values whose sum overflows
    (large bf16/fp16 activations) return ``False``, and callers then run the exact
    per-element check, which finds nothing.

    Args:
        tensors: Tensors on one device (a batch's parts, or scalar losses).
    """
    tensors = list(tensors)
    if not tensors:
        return True
    with torch.no_grad():
        # float32: holds the sum of every float dtype (a float64 sum beyond its range
        # becomes Inf, which only sends the caller to the exact check).
        device = tensors[0].device
        sums = torch.stack([t.detach().sum().to(device, torch.float32) for t in tensors])
        return bool(torch.isfinite(sums).all())


def nonfinite_summary(tensor: Tensor) -> str | None:
    """``None`` if ``tensor`` is all finite, else how many NaN/Inf values and rows it holds.

    Example:
        >>> nonfinite_summary(torch.tensor([[1.0, float("nan")], [2.0, 3.0]]))
        '1 NaN and 0 infinite values in 1 of 2 rows'
    """
    if all_finite([tensor]):
        return None
    finite = torch.isfinite(tensor)  # exact: the sum may have overflowed finite values
    if bool(finite.all()):
        return None
    nan = int(torch.isnan(tensor).sum())
    inf = int((~finite).sum()) - nan
    rows = finite.reshape(finite.shape[0], -1) if tensor.ndim else finite.reshape(1, 1)
    bad_rows = int((~rows).any(1).sum())
    return f"{nan} NaN and {inf} infinite values in {bad_rows} of {rows.shape[0]} rows"


def batch_parts(inputs: Tensor, targets: Tensor | None, label: str = "") -> dict[str, Tensor]:
    """A batch's tensors labelled for :func:`batch_problem` (``"inputs"``, ``"targets"``).

    Args:
        inputs: Input rows.
        targets: Target rows (transcoders), or ``None``.
        label: Appended to each label (e.g. ``" of 'k4' (site 'mlp_out')"``).
    """
    parts = {f"inputs{label}": inputs}
    if targets is not None:
        parts[f"targets{label}"] = targets
    return parts


def batch_problem(parts: Mapping[str, Tensor]) -> tuple[str, str] | None:
    """The first unusable part of a batch as ``(kind, description)``, or ``None``.

    ``kind`` is ``"empty"`` (zero rows) or ``"nonfinite"``.

    Args:
        parts: Label (e.g. ``"inputs"``, ``"targets of 'k4' (site 'mlp_out')"``) -> rows.
    """
    tensors = parts.values()
    if all(t.ndim and t.shape[0] for t in tensors) and all_finite(tensors):
        return None  # the usual case, decided by one fused test
    for label, tensor in parts.items():
        if tensor.ndim == 0 or tensor.shape[0] == 0:
            return "empty", f"{label} have 0 rows"
        summary = nonfinite_summary(tensor)
        if summary is not None:
            return "nonfinite", f"{label} hold {summary}"
    return None


def nonfinite_parameters(modules: Iterable[tuple[str, nn.Module]]) -> list[str]:
    """Names (``"<module>.<tensor>"``) of parameters and buffers holding NaN or Inf."""
    bad = []
    for prefix, module in modules:
        tensors = [*module.named_parameters(), *module.named_buffers()]
        for name, tensor in tensors:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad.append(f"{prefix}.{name}" if prefix else name)
    return bad


class BatchGuard:
    """Applies the ``on_nonfinite`` policy to a training module's batches and losses.

    Under DDP the ranks first agree (one all-reduce of a flag): if a batch or loss is bad
    on any rank, every rank skips the step (automatic optimisation must step on all ranks
    or none) or raises.

    Args:
        policy: ``"raise"`` (a typed error naming step, batch and input) or ``"skip"``
            (no optimizer step; counted in :attr:`skipped`).
        any_rank: ``(bad, device) -> bool``: whether ``bad`` holds on any DDP rank (``bad``
            itself on one process).
        announce: Prints a message on global rank zero (``LightningModule.print``).
    """

    def __init__(
        self,
        policy: NonFinitePolicy,
        any_rank: Callable[[bool, torch.device], bool],
        announce: Callable[[str], None],
    ) -> None:
        if policy not in POLICIES:
            raise ConfigError(f"on_nonfinite must be one of {POLICIES}, got {policy!r}")
        self.policy = policy
        self.any_rank = any_rank
        self.announce = announce
        self.skipped = {"train": 0, "val": 0}

    def usable(
        self,
        parts: Mapping[str, Tensor],
        *,
        where: str,
        step: int,
        batch_idx: int,
        stage: str = "train",
    ) -> bool:
        """Whether a batch may be used; raises under ``"raise"``, counts under ``"skip"``.

        Args:
            parts: The batch's tensors by label (see :func:`batch_problem`).
            where: Names the module for the message (``"DictionaryModule"``).
            step: The trainer's global step.
            batch_idx: Index of the batch in its epoch.
            stage: ``"train"`` or ``"val"``.
        """
        problem = batch_problem(parts)
        device = next(iter(parts.values())).device
        # Only training steps must agree across ranks (an optimizer step on all or none);
        # validation decides per rank, as ranks may hold different numbers of batches.
        bad = self.any_rank(problem is not None, device) if stage == "train" else bool(problem)
        if not bad:
            return True
        what = f"{stage} batch {batch_idx} at global step {step}"
        description = problem[1] if problem else "the batch on another DDP rank is unusable"
        return self._fail_or_skip(
            "empty" if problem and problem[0] == "empty" else "nonfinite",
            f"{where}: {what}: {description}",
            stage,
        )

    def usable_loss(
        self,
        losses: Mapping[str, Tensor],
        *,
        where: str,
        step: int,
        batch_idx: int,
        weights: Iterable[tuple[str, nn.Module]],
    ) -> bool:
        """Whether every loss is finite; raises or counts (as :meth:`usable`) if not.

        A non-finite loss on finite inputs comes from the weights or the step size. When a
        weight is already NaN or infinite, skipping cannot help, so it raises whatever the
        policy.

        Args:
            losses: Label -> scalar loss (one per dictionary).
            where: Names the module for the message.
            step: The trainer's global step.
            batch_idx: Index of the batch in its epoch.
            weights: ``(name, dictionary)`` pairs checked when a loss is not finite.
        """
        bad = []
        if not all_finite(losses.values()):
            bad = [label for label, loss in losses.items() if not bool(torch.isfinite(loss).all())]
        device = next(iter(losses.values())).device
        if not self.any_rank(bool(bad), device):
            return True
        what = f"{where}: train batch {batch_idx} at global step {step}"
        broken = nonfinite_parameters(weights)
        if broken:
            raise NonFiniteError(
                f"{what}: the loss is not finite because weights {broken} already hold NaN "
                f"or Inf; lower the learning rate or train in 32-true precision, and resume "
                f"from a checkpoint saved before step {step}"
            )
        description = f"the loss of {bad} is not finite" if bad else "a loss on another DDP rank"
        return self._fail_or_skip(
            "nonfinite", f"{what}: {description} (finite inputs: overflow?)", "train"
        )

    def _fail_or_skip(self, kind: str, message: str, stage: str) -> bool:
        if self.policy == "raise":
            error = ShapeMismatchError if kind == "empty" else NonFiniteError
            raise error(
                f"{message}; fix the data (e.g. look for NaN/Inf or empty batches in the "
                f"activation cache or stream), or pass on_nonfinite='skip' to the module to "
                f"skip and count such batches"
            )
        self.skipped[stage] = self.skipped.get(stage, 0) + 1
        count = self.skipped[stage]
        if count <= _ANNOUNCED or count % 100 == 0:
            self.announce(f"skipped ({count} {stage} batches so far): {message}")
        return False
