"""A chip grid over a stack, streamed window by window.

Each chip is ``(T, C, h, w)`` with its own affine transform (``rasterio.windows.transform``), CRS,
bounds and dates. Only one chip's window of each date is in memory at a time, whatever the raster's
size. Chips whose every pixel of every date is nodata are skipped and counted.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import numpy.typing as npt
from rasterio.windows import Window

from agrivlm.errors import IngestError
from agrivlm.geo.coords import GeoGrid, TimeAxis
from agrivlm.geo.stack import Stack


class Edge(str, Enum):
    """What to do where the stride does not end exactly on the raster's last row/column."""

    #: Add one last chip flush with the edge (it overlaps its neighbour more), so every pixel is covered.
    SNAP = "snap"
    #: Leave the remainder uncovered; every chip keeps the regular stride.
    DROP = "drop"


def _starts(size: int, chip: int, stride: int, edge: Edge) -> list[int]:
    starts = list(range(0, size - chip + 1, stride))
    if edge is Edge.SNAP and starts[-1] + chip < size:
        starts.append(size - chip)
    return starts


def chip_windows(
    height: int, width: int, chip_size: int | tuple[int, int], stride: int | tuple[int, int] | None = None,
    edge: Edge | str = Edge.SNAP,
) -> list[Window]:
    """Windows of a chip grid, row-major.

    Args:
        height: raster height in pixels.
        width: raster width in pixels.
        chip_size: chip size in pixels, ``n`` or ``(rows, cols)``.
        stride: step between chips in pixels (default: ``chip_size``, no overlap); smaller overlaps.
        edge: :class:`Edge` rule for the remainder.

    Raises:
        IngestError: a chip larger than the raster, or a non-positive size or stride.

    """
    ch, cw = (chip_size, chip_size) if isinstance(chip_size, int) else chip_size
    stride = (ch, cw) if stride is None else stride
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    if min(ch, cw, sh, sw) <= 0:
        raise IngestError(f"chip size {ch}x{cw} and stride {sh}x{sw} must be positive")
    if ch > height or cw > width:
        raise IngestError(
            f"chip size {ch}x{cw} px is larger than the raster ({height}x{width} px); use --chip-size ≤ "
            f"{min(height, width)}"
        )
    edge = Edge(edge)
    return [
        Window(c, r, cw, ch)
        for r in _starts(height, ch, sh, edge)
        for c in _starts(width, cw, sw, edge)
    ]


@dataclass
class Chip:
    """One chip of a stack: every date of one window, with its own georeference."""

    #: Stable id from the window: ``r{row_off}_c{col_off}``.
    chip_id: str
    #: Position in the grid's row-major order.
    index: int
    #: Pixel window on the stack's reference grid.
    window: Window
    #: The chip's own grid: transform (pixel edges → CRS), CRS, width, height.
    grid: GeoGrid
    #: Acquisition times ``(T,)``.
    times: npt.NDArray[np.datetime64]
    #: Pixels ``(T, C, h, w)`` float32, NaN where there is no data.
    data: npt.NDArray[np.float32]
    #: ``(T, C, h, w)`` True where there is no data.
    nodata: npt.NDArray[np.bool_]
    #: ``(T, h, w)`` True where the date's mask file masks the pixel (clouds); all False without masks.
    mask: npt.NDArray[np.bool_]
    #: Data files of each date (``+``-joined for same-day mosaics).
    files: list[str] = field(default_factory=list)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(minx, miny, maxx, maxy)`` in the stack's CRS units."""
        return self.grid.bounds

    @property
    def time_axis(self) -> TimeAxis:
        """The chip's own date range (normalized time 0 = its first frame, 1 = its last)."""
        return TimeAxis.from_dates(self.times)

    @property
    def valid_fraction(self) -> float:
        """Fraction of (date, band, pixel) values that hold data."""
        return float(1.0 - self.nodata.mean())

    @property
    def clear_fraction(self) -> float:
        """Fraction of (date, pixel) values with data in every band and not masked (cloud-free)."""
        return float((~self.nodata.any(axis=1) & ~self.mask).mean())


def chip_id(window: Window) -> str:
    """The id of the chip at ``window``: ``r{row_off:06d}_c{col_off:06d}``."""
    return f"r{int(window.row_off):06d}_c{int(window.col_off):06d}"


@dataclass
class ChipStream:
    """Iterate the chips of a stack window by window (bounded memory), skipping all-nodata chips.

    After iteration ``kept`` and ``skipped`` count the chips; ``skipped_ids`` names the skipped ones.
    """

    stack: Stack
    chip_size: int | tuple[int, int]
    stride: int | tuple[int, int] | None = None
    edge: Edge | str = Edge.SNAP
    skip_empty: bool = True
    kept: int = 0
    skipped: int = 0
    skipped_ids: list[str] = field(default_factory=list)

    @property
    def windows(self) -> list[Window]:
        """The grid's windows, row-major."""
        return chip_windows(self.stack.grid.height, self.stack.grid.width, self.chip_size, self.stride, self.edge)

    def __len__(self) -> int:
        return len(self.windows)

    def read(self, index: int, window: Window) -> Chip:
        """Read the chip at ``window`` (every date) into memory."""
        data, nodata, mask = self.stack.read_window(window)
        return Chip(
            chip_id=chip_id(window),
            index=index,
            window=window,
            grid=self.stack.grid.subgrid(window),
            times=self.stack.times,
            data=data,
            nodata=nodata,
            mask=mask,
            files=["+".join(s.path.name for s in step.sources) for step in self.stack.steps],
        )

    def __iter__(self) -> Iterator[Chip]:
        self.kept, self.skipped, self.skipped_ids = 0, 0, []
        with self.stack:
            for index, window in enumerate(self.windows):
                chip = self.read(index, window)
                if self.skip_empty and chip.nodata.all():
                    self.skipped += 1
                    self.skipped_ids.append(chip.chip_id)
                    continue
                self.kept += 1
                yield chip
