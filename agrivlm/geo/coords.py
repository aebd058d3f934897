"""The one place that converts coordinates: pixel ↔ CRS ↔ lon/lat, chip [0, 1]² ↔ CRS, date ↔ [0, 1].

Conventions (the same everywhere in agrivlm):

* Pixel coordinates are ``(col, row)`` floats on the grid's pixel *edges*: ``(0, 0)`` is the outer
  top-left corner of the top-left pixel, ``(width, height)`` the outer bottom-right corner, and the
  centre of pixel ``[r, c]`` is ``(c + 0.5, r + 0.5)``. ``(x, y) = transform * (col, row)`` as in
  rasterio, so rotated and south-up transforms need no special case.
* Normalized positions ``(u, v)`` are fractions of a grid's width and height in pixel space:
  ``u = col / width``, ``v = row / height``, so ``(0, 0)`` is the top-left corner *of the grid as
  stored* (for a south-up raster that is its south-west corner). LAPE's ``WIDTH`` tokens are ``u`` and
  its ``HEIGHT`` tokens are ``v``.
* CRS coordinates are ``(x, y)`` in the grid's CRS units (metres for UTM); lon/lat are degrees on
  WGS 84 (EPSG:4326) in ``(lon, lat)`` order.
* Normalized time ``t`` is the fraction of a date range ``[start, end]``; with one date, ``t = 0``.

Every function is float64 and the round-trips are exact to float precision (tested, including
rotated transforms and geographic CRSs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

import numpy as np
import numpy.typing as npt
import shapely
from affine import Affine
from pyproj import Transformer
from rasterio.crs import CRS
from rasterio.windows import Window
from rasterio.windows import transform as window_transform
from shapely.geometry import Polygon

from agrivlm.geo.dates import from_days, season_windows, to_days

ArrayLike = npt.ArrayLike
FloatArray = npt.NDArray[np.float64]

#: Geographic CRS of lon/lat outputs.
WGS84 = CRS.from_epsg(4326)


@lru_cache(maxsize=64)
def _transformer(src_wkt: str, dst_wkt: str) -> Transformer:
    return Transformer.from_crs(src_wkt, dst_wkt, always_xy=True)


def transform_xy(src: CRS, dst: CRS, x: ArrayLike, y: ArrayLike) -> tuple[FloatArray, FloatArray]:
    """Reproject points ``(x, y)`` from ``src`` to ``dst`` (each in its CRS units, x = easting/lon)."""
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if src == dst:
        return xs.copy(), ys.copy()
    tx, ty = _transformer(src.to_wkt(), dst.to_wkt()).transform(xs, ys)
    return np.asarray(tx, dtype=np.float64), np.asarray(ty, dtype=np.float64)


def pixel_to_crs(transform: Affine, col: ArrayLike, row: ArrayLike) -> tuple[FloatArray, FloatArray]:
    """Pixel-edge coordinates ``(col, row)`` → CRS ``(x, y)``: ``transform * (col, row)``."""
    c, r = np.asarray(col, dtype=np.float64), np.asarray(row, dtype=np.float64)
    a, b, xoff, d, e, yoff = transform.a, transform.b, transform.c, transform.d, transform.e, transform.f
    return a * c + b * r + xoff, d * c + e * r + yoff


def crs_to_pixel(transform: Affine, x: ArrayLike, y: ArrayLike) -> tuple[FloatArray, FloatArray]:
    """CRS ``(x, y)`` → pixel-edge ``(col, row)`` (floats; ``floor`` gives the pixel index)."""
    return pixel_to_crs(~transform, x, y)


@dataclass(frozen=True)
class GeoGrid:
    """A pixel grid in a CRS: a whole stack or one chip of it.

    Attributes:
        transform: affine pixel-edge ``(col, row)`` → CRS ``(x, y)``.
        crs: coordinate reference system of ``x, y``.
        width: number of columns (pixels).
        height: number of rows (pixels).

    """

    transform: Affine
    crs: CRS
    width: int
    height: int

    # -- pixel <-> CRS ------------------------------------------------------------------
    def pixel_to_crs(self, col: ArrayLike, row: ArrayLike) -> tuple[FloatArray, FloatArray]:
        """Pixel-edge ``(col, row)`` of this grid → CRS ``(x, y)``."""
        return pixel_to_crs(self.transform, col, row)

    def crs_to_pixel(self, x: ArrayLike, y: ArrayLike) -> tuple[FloatArray, FloatArray]:
        """CRS ``(x, y)`` → pixel-edge ``(col, row)`` of this grid."""
        return crs_to_pixel(self.transform, x, y)

    # -- normalized [0, 1]^2 <-> CRS -------------------------------------------------------
    def norm_to_pixel(self, u: ArrayLike, v: ArrayLike) -> tuple[FloatArray, FloatArray]:
        """Normalized ``(u, v)`` (fractions of width, height) → pixel-edge ``(col, row)``."""
        return np.asarray(u, dtype=np.float64) * self.width, np.asarray(v, dtype=np.float64) * self.height

    def pixel_to_norm(self, col: ArrayLike, row: ArrayLike) -> tuple[FloatArray, FloatArray]:
        """Pixel-edge ``(col, row)`` → normalized ``(u, v)``."""
        return np.asarray(col, dtype=np.float64) / self.width, np.asarray(row, dtype=np.float64) / self.height

    def norm_to_crs(self, u: ArrayLike, v: ArrayLike) -> tuple[FloatArray, FloatArray]:
        """Normalized ``(u, v)`` in this grid → CRS ``(x, y)``."""
        return self.pixel_to_crs(*self.norm_to_pixel(u, v))

    def crs_to_norm(self, x: ArrayLike, y: ArrayLike) -> tuple[FloatArray, FloatArray]:
        """CRS ``(x, y)`` → normalized ``(u, v)`` in this grid (outside [0, 1] when off the grid)."""
        return self.pixel_to_norm(*self.crs_to_pixel(x, y))

    # -- lon/lat -----------------------------------------------------------------------------
    def crs_to_lonlat(self, x: ArrayLike, y: ArrayLike) -> tuple[FloatArray, FloatArray]:
        """CRS ``(x, y)`` → WGS 84 ``(lon, lat)`` in degrees."""
        return transform_xy(self.crs, WGS84, x, y)

    def lonlat_to_crs(self, lon: ArrayLike, lat: ArrayLike) -> tuple[FloatArray, FloatArray]:
        """WGS 84 ``(lon, lat)`` → CRS ``(x, y)``."""
        return transform_xy(WGS84, self.crs, lon, lat)

    def norm_to_lonlat(self, u: ArrayLike, v: ArrayLike) -> tuple[FloatArray, FloatArray]:
        """Normalized ``(u, v)`` → WGS 84 ``(lon, lat)``."""
        return self.crs_to_lonlat(*self.norm_to_crs(u, v))

    def lonlat_to_norm(self, lon: ArrayLike, lat: ArrayLike) -> tuple[FloatArray, FloatArray]:
        """WGS 84 ``(lon, lat)`` → normalized ``(u, v)``."""
        return self.crs_to_norm(*self.lonlat_to_crs(lon, lat))

    # -- shapes --------------------------------------------------------------------------------
    def corners(self) -> FloatArray:
        """CRS coordinates of the four outer corners, ``(4, 2)``: TL, TR, BR, BL in pixel order."""
        cols = np.array([0.0, self.width, self.width, 0.0])
        rows = np.array([0.0, 0.0, self.height, self.height])
        return np.stack(self.pixel_to_crs(cols, rows), axis=1)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(minx, miny, maxx, maxy)`` of the grid's footprint in CRS units (rotation-aware)."""
        c = self.corners()
        return float(c[:, 0].min()), float(c[:, 1].min()), float(c[:, 0].max()), float(c[:, 1].max())

    def footprint(self) -> Polygon:
        """The grid's outline as a polygon in its CRS (exact for rotated transforms)."""
        return Polygon(self.corners())

    def norm_box_to_polygon(self, box: Sequence[float]) -> Polygon:
        """A normalized box ``(u1, v1, u2, v2)`` → its polygon in the CRS (rotation-aware)."""
        u1, v1, u2, v2 = (float(b) for b in box)
        us = np.array([u1, u2, u2, u1])
        vs = np.array([v1, v1, v2, v2])
        return Polygon(np.stack(self.norm_to_crs(us, vs), axis=1))

    def norm_polygon_to_crs(self, points: Sequence[Sequence[float]]) -> Polygon | None:
        """A normalized ring ``[(u, v), ...]`` (not closed, ≥ 3 points) → a valid polygon in the CRS, or None.

        The vertices map through :meth:`norm_to_crs` (rotation-aware). A ring that crosses itself (a model
        can write one) is repaired with ``shapely.make_valid`` and its largest polygonal part kept; a vertex
        repeated right after itself is written once; a ring with no area (fewer than 3 distinct vertices, all
        on one line) gives None.
        """
        xy = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        xy = xy[np.any(xy != np.roll(xy, 1, axis=0), axis=1)] if len(xy) > 1 else xy  # a vertex written twice
        if len(xy) < 3:
            return None
        x, y = self.norm_to_crs(xy[:, 0], xy[:, 1])
        poly = Polygon(np.stack([x, y], axis=1))
        if not poly.is_valid:
            fixed = shapely.make_valid(poly)
            parts = [g for g in shapely.get_parts(shapely.get_parts(fixed))
                     if isinstance(g, Polygon) and not g.is_empty]
            poly = max(parts, key=lambda g: g.area) if parts else Polygon()
        return None if poly.is_empty or poly.area <= 0.0 else poly

    def subgrid(self, window: Window) -> GeoGrid:
        """The grid of a window of this one, with its own transform (``rasterio.windows.transform``)."""
        return GeoGrid(
            transform=window_transform(window, self.transform),
            crs=self.crs,
            width=int(window.width),
            height=int(window.height),
        )


def _to_datetime64(times: ArrayLike | datetime | Sequence[datetime]) -> npt.NDArray[np.datetime64]:
    return np.asarray(times, dtype="datetime64[us]")


@dataclass(frozen=True)
class TimeAxis:
    """A date range ``[start, end]`` mapped to normalized time ``t ∈ [0, 1]`` (LAPE's ``TEMP`` tokens)."""

    start: np.datetime64
    end: np.datetime64

    @classmethod
    def from_dates(cls, dates: ArrayLike | Sequence[datetime]) -> TimeAxis:
        """The range spanned by ``dates`` (any order; at least one)."""
        arr = _to_datetime64(dates).ravel()
        if arr.size == 0:
            raise ValueError("TimeAxis needs at least one date")
        return cls(start=arr.min(), end=arr.max())

    @classmethod
    def of_seasons(cls, dates: ArrayLike | Sequence[datetime], season_start: str = "01-01") -> TimeAxis:
        """The season windows ``dates`` fall in (yearly windows starting on ``season_start``, ``MM-DD``).

        From the start of the window holding the first date to the end of the window holding the last.
        The time axis of training records and of ``agrivlm infer``'s frames
        (:func:`agrivlm.pipeline.frames.frame_time_positions`): a year of dates from January is always
        ``[Jan 1, Jan 1 next year]``, so a ``TEMP`` bin names the same days of the season on every chip.
        """
        arr = _to_datetime64(dates).ravel()
        if arr.size == 0:
            raise ValueError("TimeAxis needs at least one date")
        days = to_days(arr)
        # the same windows the recipes' and `agrivlm infer`'s growth seasons are
        windows = season_windows(float(days.min()), float(days.max()), season_start)
        edges = from_days([windows[0][1], windows[-1][2]]).astype("datetime64[us]")
        return cls(start=edges[0], end=edges[1])

    @property
    def span_seconds(self) -> float:
        """Length of the range in seconds (0 for a single date)."""
        return float((self.end - self.start) / np.timedelta64(1, "us")) / 1e6

    def to_norm(self, times: ArrayLike | datetime | Sequence[datetime]) -> FloatArray:
        """Times → normalized ``t`` (0 at ``start``, 1 at ``end``; 0 everywhere for a zero-length range)."""
        arr = _to_datetime64(times)
        offset = (arr - self.start) / np.timedelta64(1, "us") / 1e6
        span = self.span_seconds
        if span == 0.0:
            return np.zeros(arr.shape, dtype=np.float64)
        return np.asarray(offset, dtype=np.float64) / span

    def from_norm(self, t: ArrayLike) -> npt.NDArray[np.datetime64]:
        """Normalized ``t`` → times (``datetime64[us]``, rounded to the microsecond)."""
        micros = np.rint(np.asarray(t, dtype=np.float64) * self.span_seconds * 1e6).astype(np.int64)
        return self.start + micros.astype("timedelta64[us]")

    def days_between(self, t1: ArrayLike, t2: ArrayLike) -> FloatArray:
        """Signed days from normalized ``t1`` to ``t2`` (for errors in days)."""
        return (np.asarray(t2, dtype=np.float64) - np.asarray(t1, dtype=np.float64)) * self.span_seconds / 86400.0


def norm_box(grid: GeoGrid, geom: shapely.Geometry) -> tuple[float, float, float, float]:
    """The box ``(u1, v1, u2, v2)`` of a geometry (CRS) in ``grid``'s normalized frame, clipped to [0, 1].

    Exact for rotated grids too: an affine map sends the geometry's vertices to pixel space, where the
    box is their min/max.
    """
    xy = shapely.get_coordinates(geom)
    u, v = grid.crs_to_norm(xy[:, 0], xy[:, 1])
    box = (float(u.min()), float(v.min()), float(u.max()), float(v.max()))
    return tuple(min(max(b, 0.0), 1.0) for b in box)  # type: ignore[return-value]
