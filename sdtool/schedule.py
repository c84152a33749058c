"""Learning-rate schedules as pure functions of the (fractional) epoch.

The factor depends only on progress, never on mutable scheduler objects, so exact resume needs no
scheduler state: the engine recomputes the lr from the step counter.
"""

from __future__ import annotations

import math

from sdtool.errors import SdtoolError


def official_milestones(epochs: int) -> list[int]:
    """The official code's decay points: E//3, 2E//3 and E-10 (those inside the run, deduplicated)."""
    return sorted({m for m in (epochs // 3, 2 * epochs // 3, epochs - 10) if 0 < m < epochs})


def lr_factor(
    t: float, epochs: int, schedule: str, milestones: list[int] | None = None, gamma: float = 0.1, warmup: float = 0.0
) -> float:
    """Multiplier of the peak lr at fractional epoch t in [0, epochs)."""
    if schedule == "step":
        ms = official_milestones(epochs) if milestones is None else milestones
        f = gamma ** sum(1 for m in ms if int(t) >= m)
    elif schedule == "cosine":
        start = min(warmup, epochs)
        span = max(epochs - start, 1e-12)
        f = 0.5 * (1 + math.cos(math.pi * min(max(t - start, 0.0), span) / span))
    elif schedule == "onecycle":
        # torch's OneCycleLR shape: lr/25 -> lr over the first 30 %, cosine down to lr/(25*1e4).
        p = t / epochs
        lo, hi, end = 1 / 25, 1.0, 1 / 25 / 1e4
        if p < 0.3:
            f = lo + (hi - lo) * 0.5 * (1 - math.cos(math.pi * p / 0.3))
        else:
            f = end + (hi - end) * 0.5 * (1 + math.cos(math.pi * (p - 0.3) / 0.7))
        return f  # onecycle has its own warm-up
    elif schedule == "constant":
        f = 1.0
    else:
        raise SdtoolError(f"unknown schedule {schedule!r}; valid: step, cosine, onecycle, constant")
    if warmup > 0 and t < warmup:
        f *= t / warmup
    return f
