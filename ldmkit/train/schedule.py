"""Learning-rate schedules shared by the trainers.

Linear warmup over ``warmup_steps``, then either a constant rate or a half-cosine from ``lr`` down to
``final_lr_fraction * lr`` at the last step. The cosine starts where the warmup ends, or later at
``decay_start`` (constant in between), so a run trained at a constant rate can be given a decay tail
on resume without changing any step it already took (:func:`same_past_rates` checks that).
"""

from __future__ import annotations

import math
from typing import Literal

__all__ = ["LRSchedule", "lr_at", "same_past_rates"]

LRSchedule = Literal["constant", "cosine"]


def lr_at(step: int, base: float, *, steps: int, warmup_steps: int = 0, schedule: LRSchedule = "constant",
          final_lr_fraction: float = 0.0, decay_start: int | None = None) -> float:
    """The learning rate of (0-based) ``step``."""
    if warmup_steps and step < warmup_steps:
        return base * (step + 1) / warmup_steps
    if schedule == "constant":
        return base
    begin = max(warmup_steps, decay_start or 0)
    if step < begin:
        return base
    t = min(1.0, (step - begin) / max(1, steps - begin))
    lo = base * final_lr_fraction
    return lo + (base - lo) * 0.5 * (1.0 + math.cos(math.pi * t))


def same_past_rates(old: dict, new: dict, base_old: float, base_new: float, done: int) -> bool:
    """True if two schedules (keyword arguments of :func:`lr_at`) agree on every step before ``done``."""
    return all(lr_at(s, base_old, **old) == lr_at(s, base_new, **new) for s in range(done))
