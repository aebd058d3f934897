"""Learning-rate factors (multipliers of the base LR) for the main and the LAPE parameter groups.

The LAPE group follows the LAPE initialisation report (§4.2 ``get_lape_learning_rate``: ``base_lr · 0.1 ·
(current_step / warmup_steps)`` during the warm-up, ``base_lr · 0.5`` after it): during
``lape_warmup_steps`` its factor ramps linearly from 0 to :data:`LAPE_WARMUP_PEAK` (0.1), then jumps to
``lape_lr_multiplier`` (the report's 0.5) and stays there; on top of that both groups follow the base
schedule (constant, linear or cosine decay after a base warmup).
"""

from __future__ import annotations

import math
from typing import Literal

BaseSchedule = Literal["constant", "linear", "cosine"]

#: LAPE LR factor that the warm-up ramps towards (reached at ``step = warmup_steps``, the report's ``0.1``).
LAPE_WARMUP_PEAK = 0.1


def lape_lr_factor(step: int, multiplier: float = 0.5, warmup_steps: int = 0) -> float:
    """LAPE group's LR factor at optimizer step ``step`` (0-based), before the base schedule.

    As the report's ``get_lape_learning_rate``: ``0.1 · step / warmup_steps`` while ``step <
    warmup_steps`` (0 at step 0, 0.05 half-way), then ``multiplier``; no warm-up (``warmup_steps <= 0``)
    is ``multiplier`` from the start.
    """
    if warmup_steps <= 0 or step >= warmup_steps:
        return multiplier
    return LAPE_WARMUP_PEAK * step / warmup_steps


def base_lr_factor(step: int, max_steps: int, warmup_steps: int = 0, schedule: BaseSchedule = "constant") -> float:
    """Base LR factor at ``step``: linear warmup from 0 over ``warmup_steps``, then the schedule's decay."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(max((step - warmup_steps) / max(max_steps - warmup_steps, 1), 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown LR schedule {schedule!r}; use constant, linear or cosine")
