"""What every family builder receives: the shared, read-only inputs of one recipe run (:class:`BuildState`).

Its own module, below the family builders (``fields``, ``growth``, ``landcover``, ``spatial``) and the registry
(:mod:`agrivlm.recipes.families`), so the builders import it without importing the registry that imports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from agrivlm.recipes.config import PhenologyConfig
from agrivlm.recipes.context import RecordFactory
from agrivlm.recipes.phenology import GrowthTruth
from agrivlm.recipes.scan import StackScan


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
