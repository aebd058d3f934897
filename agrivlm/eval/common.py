"""Helpers shared by the evaluators: safe ratios, JSON-safe values, refusing to overwrite, atomic JSON.

Kept light (numpy only) so that ``agrivlm eval`` refuses bad arguments before loading the geo stack.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agrivlm.errors import EvalError

#: Files written by ``write_field_report`` into its output folder.
FIELD_REPORT_FILES: tuple[str, ...] = ("summary.json", "fields.csv", "fields.png")

#: Files written by ``write_growth_report`` (those that apply).
GROWTH_REPORT_FILES: tuple[str, ...] = ("summary.json", "stages.csv", "confusion_matrix.png", "key_dates.csv")


def ratio(num: float, den: float) -> float:
    """``num / den``, NaN when ``den`` is 0 (an undefined score, written as JSON ``null``)."""
    return num / den if den > 0 else math.nan


def json_safe(value: Any) -> Any:
    """Nested dicts/lists of numbers → plain JSON values; NaN and ±inf → ``None``, numpy scalars → Python."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return None if not math.isfinite(float(value)) else float(value)
    return value


def check_outputs(out: Path, names: Sequence[str], overwrite: bool) -> None:
    """Refuse to replace existing report files in ``out`` unless ``overwrite``."""
    if overwrite:
        return
    for name in names:
        if (out / name).exists():
            raise EvalError(f"{out / name}: already exists; pass --overwrite to replace it")
