"""One bounded-memory pass over a stack: per-chip clear fractions and per-parcel index sums per date.

The stack is read tile by tile (``tile_px`` × ``tile_px`` pixels of every date); each tile feeds

* every chip window overlapping it: the number of *clear* pixels per date (data in the index bands,
  not masked by the date's cloud mask);
* every parcel overlapping it: pixel counts and index sums per date, over clear pixels and over all
  pixels with data. A pixel belongs to a parcel when its centre is inside the polygon (rasterio's
  ``rasterize`` rule); where parcels overlap, the later one in ``field_id`` order gets the pixel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import shapely
from rasterio.features import rasterize
from rasterio.windows import Window
from tqdm.auto import tqdm

from agrivlm.errors import ConfigError
from agrivlm.geo.stack import Stack


@dataclass(frozen=True)
class IndexBands:
    """How the vegetation index is computed from the stack's bands (0-based band positions)."""

    #: Band holding the index, when ``pair`` is ``None``.
    band: int = 0
    #: ``(a, b)`` → index = ``(a − b) / (a + b)`` (e.g. NIR, red → NDVI).
    pair: tuple[int, int] | None = None

    @classmethod
    def from_config(
        cls, band_names: Sequence[str], band: int | str, pair: tuple[int | str, int | str] | None
    ) -> IndexBands:
        """Resolve 1-based numbers or band names against the stack's ``band_names``."""

        def resolve(b: int | str) -> int:
            if isinstance(b, int):
                if not 1 <= b <= len(band_names):
                    raise ConfigError(f"source.band: band {b} does not exist; the stack has {len(band_names)} band(s)")
                return b - 1
            if b not in band_names:
                raise ConfigError(f"source.band: no band named {b!r}; the stack's bands are {list(band_names)}")
            return list(band_names).index(b)

        if pair is not None:
            return cls(pair=(resolve(pair[0]), resolve(pair[1])))
        return cls(band=resolve(band))

    @property
    def bands(self) -> tuple[int, ...]:
        """Bands read for the index."""
        return self.pair if self.pair is not None else (self.band,)

    def compute(self, data: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        """Index ``(T, h, w)`` float64 from ``data`` ``(T, C, h, w)``; NaN where an input is missing."""
        if self.pair is None:
            return data[:, self.band].astype(np.float64)
        a, b = data[:, self.pair[0]].astype(np.float64), data[:, self.pair[1]].astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = (a - b) / (a + b)
        out[~np.isfinite(out)] = np.nan
        return out


@dataclass
class StackScan:
    """What one pass over the stack found (``T`` dates, ``K`` chips, ``P`` parcels)."""

    #: Acquisition times ``(T,)`` ``datetime64[s]``.
    times: npt.NDArray[np.datetime64]
    #: ``(T, K)`` fraction of each chip's pixels that are clear on each date.
    chip_clear: npt.NDArray[np.float64]
    #: ``(P,)`` pixels of each parcel (centres inside).
    parcel_px: npt.NDArray[np.int64]
    #: ``(T, P)`` clear pixels of each parcel per date.
    parcel_clear: npt.NDArray[np.int64]
    #: ``(T, P)`` sum of the index over clear pixels.
    parcel_clear_sum: npt.NDArray[np.float64]
    #: ``(T, P)`` pixels with data (cloudy or not).
    parcel_data: npt.NDArray[np.int64]
    #: ``(T, P)`` sum of the index over pixels with data (cloudy included: for plots of what masking removed).
    parcel_data_sum: npt.NDArray[np.float64]

    def clear_mean(self, min_clear_fraction: float) -> npt.NDArray[np.float64]:
        """``(T, P)`` mean index over clear pixels; NaN where under ``min_clear_fraction`` of the parcel is clear."""
        px = np.maximum(self.parcel_px, 1)[None, :]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = self.parcel_clear_sum / np.maximum(self.parcel_clear, 1)
        ok = (self.parcel_clear / px >= min_clear_fraction) & (self.parcel_px[None, :] > 0)
        return np.where(ok, mean, np.nan)

    def data_mean(self) -> npt.NDArray[np.float64]:
        """``(T, P)`` mean index over all pixels with data (cloud-contaminated values included)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.parcel_data > 0, self.parcel_data_sum / np.maximum(self.parcel_data, 1), np.nan)


def _tiles(h: int, w: int, tile_px: int) -> list[Window]:
    """The ``tile_px`` × ``tile_px`` tiles covering an ``h`` × ``w`` grid, row by row (edge tiles smaller)."""
    return [
        Window(c, r, min(tile_px, w - c), min(tile_px, h - r))
        for r in range(0, h, tile_px)
        for c in range(0, w, tile_px)
    ]


def _add_chip_clear(
    chip_clear_px: npt.NDArray[np.int64], cw: npt.NDArray[np.int64], tile: Window, clear: npt.NDArray[np.bool_]
) -> None:
    """Add one tile's clear pixels per date to ``chip_clear_px`` ``(T, K)`` of the chips ``cw`` overlapping it.

    ``cw`` holds the chip windows as ``(row0, row1, col0, col1)`` rows; ``clear`` is the tile's ``(T, th, tw)``.
    """
    t = chip_clear_px.shape[0]
    tr0, tc0 = int(tile.row_off), int(tile.col_off)
    r0 = np.clip(cw[:, 0] - tr0, 0, int(tile.height))
    r1 = np.clip(cw[:, 1] - tr0, 0, int(tile.height))
    c0 = np.clip(cw[:, 2] - tc0, 0, int(tile.width))
    c1 = np.clip(cw[:, 3] - tc0, 0, int(tile.width))
    hit = np.flatnonzero((r1 > r0) & (c1 > c0))
    if hit.size:
        integral = np.zeros((t, int(tile.height) + 1, int(tile.width) + 1), dtype=np.int32)
        integral[:, 1:, 1:] = clear.cumsum(axis=1, dtype=np.int32).cumsum(axis=2, dtype=np.int32)
        a0, a1, b0, b1 = r0[hit], r1[hit], c0[hit], c1[hit]
        chip_clear_px[:, hit] += (
            integral[:, a1, b1] - integral[:, a0, b1] - integral[:, a1, b0] + integral[:, a0, b0]
        )


def _add_parcel_sums(
    out: StackScan, stack: Stack, tree: shapely.STRtree, geoms: npt.NDArray[np.object_], tile: Window,
    values: npt.NDArray[np.float64], has_data: npt.NDArray[np.bool_], clear: npt.NDArray[np.bool_],
) -> None:
    """Add one tile's pixel counts and index sums per date to ``out``'s parcel statistics.

    ``values``, ``has_data`` and ``clear`` are the tile's ``(T, th, tw)`` index, data and clear flags.
    """
    t, p = out.parcel_clear.shape
    tile_grid = stack.grid.subgrid(tile)
    hits = np.sort(tree.query(tile_grid.footprint()))
    if hits.size == 0:
        return
    ids = rasterize(
        ((geoms[i], int(i) + 1) for i in hits),
        out_shape=(int(tile.height), int(tile.width)),
        transform=tile_grid.transform,
        fill=0,
        dtype="int32",
    ).ravel()
    inside = ids > 0
    if not inside.any():
        return
    pid = ids[inside] - 1
    out.parcel_px += np.bincount(pid, minlength=p)
    vals = np.nan_to_num(values.reshape(t, -1)[:, inside])
    hd, cl = has_data.reshape(t, -1)[:, inside], clear.reshape(t, -1)[:, inside]
    for d in range(t):
        out.parcel_clear[d] += np.bincount(pid, weights=cl[d], minlength=p).astype(np.int64)
        out.parcel_clear_sum[d] += np.bincount(pid, weights=vals[d] * cl[d], minlength=p)
        out.parcel_data[d] += np.bincount(pid, weights=hd[d], minlength=p).astype(np.int64)
        out.parcel_data_sum[d] += np.bincount(pid, weights=vals[d] * hd[d], minlength=p)


def scan_stack(
    stack: Stack,
    index: IndexBands,
    chip_windows: Sequence[Window] = (),
    parcels: Sequence[shapely.Geometry] = (),
    tile_px: int = 512,
    progress: bool = True,
) -> StackScan:
    """Read the stack once, tile by tile, and accumulate chip and parcel statistics.

    Args:
        stack: the open (or openable) stack.
        index: how to compute the index from its bands.
        chip_windows: windows on the stack's grid whose clear fractions are wanted.
        parcels: polygons in the stack's CRS (order = the parcel axis of the result).
        tile_px: tile side in pixels; memory is about ``T × C × tile_px² × 4`` bytes.
        progress: show a tqdm bar over tiles.

    """
    t = len(stack.steps)
    k, p = len(chip_windows), len(parcels)
    chip_clear_px = np.zeros((t, k), dtype=np.int64)
    out = StackScan(
        times=stack.times,
        chip_clear=np.zeros((t, k)),
        parcel_px=np.zeros(p, dtype=np.int64),
        parcel_clear=np.zeros((t, p), dtype=np.int64),
        parcel_clear_sum=np.zeros((t, p)),
        parcel_data=np.zeros((t, p), dtype=np.int64),
        parcel_data_sum=np.zeros((t, p)),
    )
    geoms = np.asarray(list(parcels), dtype=object)
    # chip windows as (row0, row1, col0, col1) arrays: each tile finds its chips and sums them with an
    # integral image, so the cost does not grow with chips × tiles in Python
    cw = np.array([[w.row_off, w.row_off + w.height, w.col_off, w.col_off + w.width] for w in chip_windows],
                  dtype=np.int64).reshape(-1, 4)
    tree = shapely.STRtree(geoms) if p else None
    tiles = _tiles(stack.grid.height, stack.grid.width, tile_px)
    with stack:
        for tile in tqdm(tiles, desc="scan", unit="tile", disable=not progress):
            data, nodata, cloud = stack.read_window(tile)
            values = index.compute(data)  # (T, th, tw)
            has_data = np.isfinite(values) & ~nodata[:, list(index.bands)].any(axis=1)
            clear = has_data & ~cloud
            if k:
                _add_chip_clear(chip_clear_px, cw, tile, clear)
            if tree is not None:
                _add_parcel_sums(out, stack, tree, geoms, tile, values, has_data, clear)
    areas = np.array([float(win.width * win.height) for win in chip_windows]) if k else np.zeros(0)
    out.chip_clear = chip_clear_px / np.maximum(areas, 1.0)[None, :]
    return out
