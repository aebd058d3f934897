"""Ingestion: GeoTIFF stacks, chips, dates and the one module of coordinate conversions.

Names are imported on first use, so ``import agrivlm.geo.coords`` (pyproj, affine) does not pull in
xarray and dask through the stack module.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_WHERE = {
    "Chip": "chips",
    "ChipStream": "chips",
    "Edge": "chips",
    "chip_windows": "chips",
    "GeoGrid": "coords",
    "TimeAxis": "coords",
    "resolve_date": "dates",
    "Stack": "stack",
    "open_stack": "stack",
    "resolve_inputs": "stack",
    "validate_file": "validate",
    "validate_files": "validate",
}

__all__ = [
    "Chip",
    "ChipStream",
    "Edge",
    "GeoGrid",
    "Stack",
    "TimeAxis",
    "chip_windows",
    "open_stack",
    "resolve_date",
    "resolve_inputs",
    "validate_file",
    "validate_files",
]

if TYPE_CHECKING:
    from agrivlm.geo.chips import Chip, ChipStream, Edge, chip_windows
    from agrivlm.geo.coords import GeoGrid, TimeAxis
    from agrivlm.geo.dates import resolve_date
    from agrivlm.geo.stack import Stack, open_stack, resolve_inputs
    from agrivlm.geo.validate import validate_file, validate_files


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'agrivlm.geo' has no attribute {name!r}")
    value = getattr(import_module(f"agrivlm.geo.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
