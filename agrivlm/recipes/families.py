"""The registry of family builders (each receives a :class:`~agrivlm.recipes.state.BuildState`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agrivlm.recipes.context import ChipContext
from agrivlm.recipes.schema import Record
from agrivlm.recipes.state import BuildState

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
