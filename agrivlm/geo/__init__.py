"""Ingestion: GeoTIFF stacks, chips, dates and the one module of coordinate conversions."""

from agrivlm.geo.chips import Chip, ChipStream, Edge, chip_windows
from agrivlm.geo.coords import GeoGrid, TimeAxis
from agrivlm.geo.dates import resolve_date
from agrivlm.geo.stack import Stack, open_stack, resolve_inputs
from agrivlm.geo.validate import validate_file, validate_files

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
