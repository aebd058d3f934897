"""Learning-rate factors (multipliers of the base LR) for the main and the LAPE parameter groups.

The LAPE group follows the LAPE initialisation report: during ``lape_warmup_steps`` its factor ramps
linearly from 0.1 to ``lape_lr_multiplier`` (default 0.5), then stays there; on top of that both
groups follow the base schedule (constant, linear or cosine decay after a base warmup).
"""

from __future__ import annotations

import math
from typing import Literal

BaseSchedule = Literal["constant", "linear", "cosine"]

#: LAPE LR factor at step 0 of its warmup.
LAPE_WARMUP_START = 0.1


def lape_lr_factor(step: int, multiplier: float = 0.5, warmup_steps: int = 0) -> float:
    """LAPE group's LR factor at optimizer step ``step`` (0-based), before the base schedule.

    ``0.1 → multiplier`` linearly over ``warmup_steps`` steps, then ``multiplier``.
    """
    if warmup_steps <= 0 or step >= warmup_steps:
        return multiplier
    return LAPE_WARMUP_START + (multiplier - LAPE_WARMUP_START) * step / warmup_steps


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
