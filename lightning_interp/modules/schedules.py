"""Learning-rate and coefficient schedules as plain functions of the step."""

from __future__ import annotations


def warmup_then_decay(step: int, *, warmup_steps: int, decay_steps: int, total_steps: int) -> float:
    """Multiplier for the learning rate at ``step``.

    Linear warm-up from ~0 to 1 over ``warmup_steps``, flat, then a linear decay to 0 over
    the last ``decay_steps`` of ``total_steps`` (the shape Anthropic and SAELens use:
    decaying at the end trades a little speed for a lower final loss).

    Example:
        >>> [round(warmup_then_decay(s, warmup_steps=2, decay_steps=2, total_steps=6), 2)
        ...  for s in range(6)]
        [0.5, 1.0, 1.0, 1.0, 1.0, 0.5]
    """
    factor = 1.0
    if warmup_steps > 0 and step < warmup_steps:
        factor = (step + 1) / warmup_steps
    decay_start = total_steps - decay_steps
    if decay_steps > 0 and step >= decay_start:
        factor = min(factor, max(0.0, (total_steps - step) / decay_steps))
    return factor


def linear_warmup(step: int, warmup_steps: int) -> float:
    """Ramp from ``1/warmup_steps`` to 1 over ``warmup_steps`` steps (1 when there is none)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)
