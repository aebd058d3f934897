"""The chip grid's defaults, in a module light enough for the command line to read without loading rasters."""

from __future__ import annotations

from typing import Literal

#: The chip grid every reader of chips starts from (``agrivlm ingest``, the explorer, the recipes' ``chips``, a
#: checkpoint's input settings, the quickstart): 32-px chips; the model's inputs step by 16 px (overlapping, so a
#: field cut by one chip's edge is whole in the next), a catalogue or a map grid by the chip size; the last
#: row/column snapped to the raster's edge.
CHIP_SIZE = 32
CHIP_STRIDE = 16
CHIP_EDGE: Literal["snap", "drop"] = "snap"
