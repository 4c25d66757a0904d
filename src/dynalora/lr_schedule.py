"""Learning-rate schedules shared by the training recipes."""

from __future__ import annotations

import math


def cosine_lr(step: int, steps: int, warmup_steps: int, lr: float, progress: float | None = None) -> float:
    """Linear warm-up, then cosine decay to 0 over ``steps`` (or over ``progress`` ∈ [0, 1] when given)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if progress is None:
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
