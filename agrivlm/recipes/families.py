"""What every family builder receives, and the registry of builders."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from agrivlm.recipes.config import PhenologyConfig
from agrivlm.recipes.context import ChipContext, RecordFactory
from agrivlm.recipes.phenology import GrowthTruth
from agrivlm.recipes.scan import StackScan
from agrivlm.recipes.schema import Record


@dataclass
class BuildState:
    """Shared, read-only inputs of the family builders for one recipe run."""

    seed: int
    factory: RecordFactory
    scan: StackScan
    truth: GrowthTruth
    phenology: PhenologyConfig
    #: ``(T,)`` acquisition days (float days since 1970-01-01).
    days: npt.NDArray[np.float64]
    #: Season windows ``(label, start, end)`` over the stack's dates.
    seasons: list[tuple[str, float, float]]
    #: Frames over all dates, per chip id (``None`` = too few clear dates).
    frames_all: dict[str, list[int] | None] = field(default_factory=dict)
    #: Frames of each season, per (chip id, season label).
    frames_season: dict[tuple[str, str], list[int] | None] = field(default_factory=dict)


Builder = Callable[[BuildState, ChipContext, Any], list[Record]]


def builders() -> dict[str, Builder]:
    """``{family: builder}`` — imported lazily so each family module stays independent."""
    from agrivlm.recipes.fields import build_field_boundaries
    from agrivlm.recipes.growth import build_growth_stages
    from agrivlm.recipes.landcover import build_general_rs
    from agrivlm.recipes.spatial import build_spatial_reasoning

    return {
        "field_boundaries": build_field_boundaries,
        "growth_stages": build_growth_stages,
        "general_rs": build_general_rs,
        "spatial_reasoning": build_spatial_reasoning,
    }
