"""A chip grid over a stack, streamed group by group with bounded memory.

Each chip is ``(T, C, h, w)`` with its own affine transform (``rasterio.windows.transform``), CRS,
bounds and dates. Chips whose every pixel of every date is nodata are skipped and counted.

How it is fast: the chips are partitioned into :class:`ChipGroup` s, rectangles of neighbouring
chips that live in the same internal blocks (tiles or strips) of the files. Each group's window is
read once per date, in the files' own data type, by GDAL straight into one buffer, and its chips are
cut from that buffer, so every block is decoded once however the chips overlap it (reading chip by
chip would decode a 512-px tile four times for 256-px chips, and a full-width strip once per chip).
Reader threads (GDAL releases the GIL while decoding; each thread has its own file handles) each take
whole runs of groups that share blocks, so a block split between two groups by the memory cap is
decoded by one thread and its second read hits that handle's GDAL block cache.

Memory is bounded whatever the raster's size: per reader thread one group's decoded buffer
(:attr:`ChipStream.max_group_bytes`) and :attr:`ChipStream.prefetch` finished chips waiting for the
consumer, plus GDAL's block cache, capped while the stream reads (:attr:`ChipStream.gdal_cache_bytes`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import numpy.typing as npt
from rasterio.windows import Window

from agrivlm.errors import IngestError
from agrivlm.geo.coords import GeoGrid, TimeAxis
from agrivlm.geo.stack import Stack, gdal_cache_cap


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
    #: Pixels ``(T, C, h, w)`` float32, NaN where there is no data; from ``ChipStream(native=True)`` the files'
    #: own data type and values where they allow it (``data.dtype`` says; :meth:`as_float` gives the float32 form).
    data: npt.NDArray[Any]
    #: ``(T, C, h, w)`` True where there is no data.
    nodata: npt.NDArray[np.bool_]
    #: ``(T, h, w)`` True where the date's mask file masks the pixel (clouds); all False without masks.
    mask: npt.NDArray[np.bool_]
    #: Data files of each date (``+``-joined for same-day mosaics).
    files: list[str] = field(default_factory=list)

    def as_float(self) -> Chip:
        """The chip with float32 ``data``, NaN where there is no data (itself when it already is)."""
        if self.data.dtype == np.float32:
            return self
        data = self.data.astype(np.float32)
        np.copyto(data, np.float32(np.nan), where=self.nodata)
        return dataclasses.replace(self, data=data)

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
        return float(1.0 - np.count_nonzero(self.nodata) / max(self.nodata.size, 1))

    @property
    def clear_fraction(self) -> float:
        """Fraction of (date, pixel) values with data in every band and not masked (cloud-free)."""
        unclear = self.nodata.any(axis=1)
        unclear |= self.mask
        return float(1.0 - np.count_nonzero(unclear) / max(unclear.size, 1))


def chip_id(window: Window) -> str:
    """The id of the chip at ``window``: ``r{row_off:06d}_c{col_off:06d}``."""
    return f"r{int(window.row_off):06d}_c{int(window.col_off):06d}"


@dataclass(frozen=True)
class ChipGroup:
    """Neighbouring chips read together: one window of every date, cut into the member chips."""

    #: The union of the members' windows on the reference grid (read once per date).
    window: Window
    #: ``(index, window)`` of every member chip, in row-major order.
    members: tuple[tuple[int, Window], ...]


def _runs(starts: Sequence[int], size: int, block: int, limit: int) -> list[list[int]]:
    """Split sorted chip start offsets (one axis) into runs read together.

    A run takes the chips that end inside the blocks its first chip touches (``block`` px, the file's
    tile or strip size on this axis), so a block is never split between two runs unless one run
    would exceed ``limit`` px (and a run always holds at least one chip).
    """
    runs: list[list[int]] = []
    i = 0
    while i < len(starts):
        first = starts[i]
        end = math.ceil((first + size) / block) * block if block > 0 else first + size
        end = min(end, first + max(limit, size))
        j = i + 1
        while j < len(starts) and starts[j] + size <= end:
            j += 1
        runs.append(list(range(i, j)))
        i = j
    return runs


def chip_groups(
    height: int, width: int, chip_size: int | tuple[int, int], stride: int | tuple[int, int] | None = None,
    edge: Edge | str = Edge.SNAP, block_shape: tuple[int, int] = (0, 0), bytes_per_pixel: float = 1.0,
    max_group_bytes: int = 256 * 2**20,
) -> list[ChipGroup]:
    """Partition the chip grid of :func:`chip_windows` into block-aligned groups.

    Args:
        height: raster height in pixels.
        width: raster width in pixels.
        chip_size: chip size in pixels, ``n`` or ``(rows, cols)``.
        stride: step between chips in pixels (default: ``chip_size``).
        edge: :class:`Edge` rule for the remainder.
        block_shape: the files' internal block ``(rows, cols)`` (a strip is ``(k, width)``); ``(0, 0)``
            groups nothing (one chip per group).
        bytes_per_pixel: decoded bytes of one pixel of a group (all dates and bands).
        max_group_bytes: cap on a group's decoded bytes (a single chip may exceed it).

    Returns:
        Groups in reading order (runs of rows, then runs of columns); every chip in exactly one.

    """
    ch, cw = (chip_size, chip_size) if isinstance(chip_size, int) else chip_size
    windows = chip_windows(height, width, chip_size, stride, edge)
    rows = sorted({int(w.row_off) for w in windows})
    cols = sorted({int(w.col_off) for w in windows})
    bh, bw = block_shape
    groups = []
    max_px = max_group_bytes / max(bytes_per_pixel, 1e-9)
    for row_run in _runs(rows, ch, bh, int(max_px // cw)):
        r0, r1 = rows[row_run[0]], rows[row_run[-1]] + ch
        for col_run in _runs(cols, cw, bw, int(max_px // (r1 - r0))):
            c0, c1 = cols[col_run[0]], cols[col_run[-1]] + cw
            members = tuple(
                (i * len(cols) + j, Window(cols[j], rows[i], cw, ch)) for i in row_run for j in col_run
            )
            groups.append(ChipGroup(Window(c0, r0, c1 - c0, r1 - r0), members))
    return groups


def default_workers() -> int:
    """Reader threads by default: the usable cores, at most 4 (more rarely helps one local disk)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def _share_blocks(a: ChipGroup, b: ChipGroup, block_shape: tuple[int, int]) -> bool:
    """Whether two groups touch a common block of the files (so one thread should read both)."""
    bh, bw = (max(x, 1) for x in block_shape)

    def span(start: float, size: float, b: int) -> range:
        return range(int(start) // b, (int(start) + int(size) - 1) // b + 1)

    rows_a, rows_b = span(a.window.row_off, a.window.height, bh), span(b.window.row_off, b.window.height, bh)
    cols_a, cols_b = span(a.window.col_off, a.window.width, bw), span(b.window.col_off, b.window.width, bw)
    return bool(set(rows_a) & set(rows_b)) and bool(set(cols_a) & set(cols_b))


def block_runs(groups: Sequence[ChipGroup], block_shape: tuple[int, int]) -> list[list[ChipGroup]]:
    """Consecutive groups joined into runs wherever neighbours share a block of the files."""
    runs: list[list[ChipGroup]] = []
    for g in groups:
        if runs and block_shape != (0, 0) and _share_blocks(runs[-1][-1], g, block_shape):
            runs[-1].append(g)
        else:
            runs.append([g])
    return runs


_DONE = object()  # end of one run in a reader thread's queue


@dataclass
class ChipStream:
    """Iterate the chips of a stack with bounded memory, skipping all-nodata chips.

    Chips come group by group (:func:`chip_groups`: chips sharing the files' blocks are read
    together), row-major within a group, in the same order on every run; ``chip.index`` is the chip's
    row-major position in the grid (sort by it for the grid's order). After iteration ``kept`` and
    ``skipped`` count the chips; ``skipped_ids`` names the skipped ones, in stream order.

    Memory: per reader thread at most one group's decoded pixels (``max_group_bytes``) and
    ``prefetch`` finished chips, plus the chip the consumer holds and GDAL's block cache
    (``gdal_cache_bytes``); the raster's size does not enter it.
    """

    stack: Stack
    chip_size: int | tuple[int, int]
    stride: int | tuple[int, int] | None = None
    edge: Edge | str = Edge.SNAP
    skip_empty: bool = True
    kept: int = 0
    skipped: int = 0
    skipped_ids: list[str] = field(default_factory=list)
    #: Reader threads (default :func:`default_workers`); 0 reads in the consuming thread.
    workers: int | None = None
    #: Finished chips each reader thread may hold ready ahead of the consumer.
    prefetch: int = 2
    #: Cap on one group's decoded pixels, all dates and bands, in bytes (a single chip may exceed it).
    max_group_bytes: int = 256 * 2**20
    #: GDAL's block cache cap while the stream reads (restored after). Groups are read block-aligned,
    #: so a large cache buys little, and GDAL's default (5 % of RAM) would dominate the stream's
    #: memory. ``None``, or ``GDAL_CACHEMAX`` set in the environment or a ``rasterio.Env``, leaves it.
    gdal_cache_bytes: int | None = 64 * 2**20
    #: Chips in the files' own data type (``chip.data`` keeps the stored values, nodata pixels included, which
    #: ``chip.nodata`` marks): one copy per chip instead of a float32 conversion and a NaN fill. Applies where every
    #: date is one file of one data type on the reference grid (else float32; ``chip.data.dtype`` says which);
    #: :meth:`Chip.as_float` gives the float32 form the processor takes. On uncompressed GeoTIFFs the conversion
    #: is what kept float32 chips below 0.8x raw rasterio (``benchmarks/ingest.py``, ``agrivlm native``).
    native: bool = False
    _scratch: threading.local = field(default_factory=threading.local, repr=False, compare=False)

    @property
    def windows(self) -> list[Window]:
        """The grid's windows, row-major."""
        return chip_windows(self.stack.grid.height, self.stack.grid.width, self.chip_size, self.stride, self.edge)

    def __len__(self) -> int:
        return len(self.windows)

    @property
    def bytes_per_pixel(self) -> float:
        """Decoded bytes of one pixel of a group, all dates and bands (and mask files)."""
        total = 0.0
        for step in self.stack.steps:
            for info, mask in zip(step.sources, step.masks, strict=True):
                total += info.count * np.dtype(info.dtype).itemsize + (2 if mask is not None else 0)
        return total

    @property
    def block_shape(self) -> tuple[int, int]:
        """The internal block ``(rows, cols)`` of the first file on the reference grid (``(0, 0)``: none)."""
        warped = set(self.stack.warped_files)
        on_grid = [s.block_shape for step in self.stack.steps for s in step.sources if s.path not in warped]
        return on_grid[0] if on_grid else (0, 0)

    def groups(self) -> list[ChipGroup]:
        """The chip grid partitioned into block-aligned groups, in reading order."""
        return chip_groups(
            self.stack.grid.height, self.stack.grid.width, self.chip_size, self.stride, self.edge,
            block_shape=self.block_shape, bytes_per_pixel=self.bytes_per_pixel, max_group_bytes=self.max_group_bytes,
        )

    def read(self, index: int, window: Window) -> Chip:
        """Read the chip at ``window`` (every date) into memory."""
        block = self.stack.read_block(window)
        data, nodata, mask, _ = block.cut_flagged(0, 0, int(window.height), int(window.width), self.native)
        return self._chip(index, window, data, nodata, mask)

    def _chip(
        self, index: int, window: Window, data: npt.NDArray[Any], nodata: npt.NDArray[np.bool_],
        mask: npt.NDArray[np.bool_],
    ) -> Chip:
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

    def read_group(self, group: ChipGroup) -> Iterator[tuple[Chip, bool]]:
        """Read one group's window once, then cut its chips one by one; each with True if all nodata.

        The decoded pixels go to a buffer the calling thread reuses for its next group (chips are
        copies), so reading a group costs no fresh allocation.
        """
        local = self._scratch
        need = int(group.window.height * group.window.width * self.bytes_per_pixel)
        if getattr(local, "buf", None) is None or local.buf.nbytes < need:
            local.buf = np.empty(need, dtype=np.uint8)
        block = self.stack.read_block(group.window, scratch=local.buf)
        g = group.window
        for index, window in group.members:
            data, nodata, mask, empty = block.cut_flagged(
                int(window.row_off - g.row_off), int(window.col_off - g.col_off), int(window.height),
                int(window.width), self.native,
            )
            yield self._chip(index, window, data, nodata, mask), empty

    def iter_groups(self, groups: Sequence[ChipGroup]) -> Iterator[tuple[Chip, bool]]:
        """Read ``groups`` with the reader threads; yield ``(chip, all_nodata)`` in the groups' order.

        The stack must be open (``with stack:``). Runs of groups sharing blocks (:func:`block_runs`)
        go to the threads in turn; each thread hands its chips over through its own bounded queue, and
        the consumer takes the runs in order, so the order is deterministic and memory bounded.
        """
        with gdal_cache_cap(self.gdal_cache_bytes):
            yield from self._iter_groups(groups)

    def _iter_groups(self, groups: Sequence[ChipGroup]) -> Iterator[tuple[Chip, bool]]:
        workers = default_workers() if self.workers is None else self.workers
        runs = block_runs(groups, self.block_shape)
        n = min(workers, len(runs))
        if n <= 0:
            try:
                for group in groups:
                    yield from self.read_group(group)
            finally:
                self._scratch.buf = None  # the calling thread lives on: do not keep its buffer
            return
        queues: list[queue.Queue[object]] = [queue.Queue(maxsize=max(1, self.prefetch)) for _ in range(n)]
        stop = threading.Event()

        def put(q: queue.Queue[object], item: object) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        def reader(k: int) -> None:
            q = queues[k]
            try:
                for run in runs[k::n]:
                    for group in run:
                        for item in self.read_group(group):
                            if not put(q, item):
                                return
                    if not put(q, _DONE):
                        return
            except BaseException as exc:  # handed to the consumer, which raises it
                put(q, exc)

        threads = [threading.Thread(target=reader, args=(k,), name=f"agrivlm-read-{k}", daemon=True)
                   for k in range(n)]
        for t in threads:
            t.start()
        try:
            for r in range(len(runs)):
                q = queues[r % n]
                while True:
                    item = q.get()
                    if item is _DONE:
                        break
                    if isinstance(item, BaseException):
                        raise item
                    yield item  # type: ignore[misc]
        finally:
            stop.set()
            for t in threads:
                t.join()

    def __iter__(self) -> Iterator[Chip]:
        self.kept, self.skipped, self.skipped_ids = 0, 0, []
        with self.stack:
            for chip, empty in self.iter_groups(self.groups()):
                if self.skip_empty and empty:
                    self.skipped += 1
                    self.skipped_ids.append(chip.chip_id)
                    continue
                self.kept += 1
                yield chip
