"""Learning rate as a pure function of the optimizer step: linear warm-up, then cosine decay.

Being a function of the step alone, the schedule needs no state in a checkpoint: a resumed run at step ``s``
uses exactly the rate an uninterrupted run would.
"""

from __future__ import annotations

import math


def lr_at(step: int, *, base_lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based: the rate used by the ``step + 1``-th update).

    Warm-up: ``base_lr * (step + 1) / warmup_steps`` for the first ``warmup_steps`` steps (never 0, so the first
    update moves the weights); then cosine from ``base_lr`` down to ``min_lr_ratio * base_lr`` at ``max_steps``.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    floor = base_lr * min_lr_ratio
    return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
