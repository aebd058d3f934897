"""A field's NDVI over the stack's dates, from the pixels inside its polygon, with clouds left out.

Only the field's bounding window is read (every date, one windowed read each), so a curve costs
``T × window`` pixels whatever the raster's size. A pixel counts on a date when it has data and the
date's mask does not mask it; the date's value is the mean NDVI of those pixels, and the date is *used*
(drawn on the curve) when at least ``min_clear`` of the field's pixels are clear.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
from rasterio.features import geometry_mask
from rasterio.windows import Window
from shapely.geometry.base import BaseGeometry

from agrivlm.explore.errors import ExploreError
from agrivlm.explore.overlay import ndvi_from
from agrivlm.geo.stack import Stack

#: Fraction of a field's pixels that must be clear (data, no cloud) for a date to be used on the curve.
MIN_CLEAR = 0.5


def field_window(stack: Stack, geometry: BaseGeometry) -> Window | None:
    """The smallest pixel window of the stack's grid that holds ``geometry`` (stack CRS), clipped to it.

    ``None`` when the field lies outside the grid. Rotation-aware (all four bound corners are mapped).
    """
    minx, miny, maxx, maxy = geometry.bounds
    cols, rows = stack.grid.crs_to_pixel([minx, maxx, maxx, minx], [miny, miny, maxy, maxy])
    c0, c1 = max(math.floor(cols.min()), 0), min(math.ceil(cols.max()), stack.grid.width)
    r0, r1 = max(math.floor(rows.min()), 0), min(math.ceil(rows.max()), stack.grid.height)
    if c1 <= c0 or r1 <= r0:
        return None
    return Window(c0, r0, c1 - c0, r1 - r0)


def field_pixels(stack: Stack, geometry: BaseGeometry) -> tuple[Window, np.ndarray]:
    """The field's window and its pixels ``(h, w)`` bool.

    Pixels whose centre is inside the polygon, or every pixel the polygon touches when it is too small to
    hold a pixel centre.

    Raises:
        ExploreError: the field lies outside the stack.

    """
    window = field_window(stack, geometry)
    if window is None:
        raise ExploreError("the field lies outside the stack; no pixel of it can be read")
    grid = stack.grid.subgrid(window)
    shape = (grid.height, grid.width)
    inside = geometry_mask([geometry], out_shape=shape, transform=grid.transform, invert=True, all_touched=False)
    if not inside.any():
        inside = geometry_mask([geometry], out_shape=shape, transform=grid.transform, invert=True, all_touched=True)
    if not inside.any():
        raise ExploreError("the field covers no pixel of the stack")
    return window, inside


def ndvi_curve(stack: Stack, geometry: BaseGeometry, roles: Mapping[str, int], min_clear: float = MIN_CLEAR
               ) -> pd.DataFrame:
    """NDVI of a field on every date of the stack.

    Args:
        stack: the stack (its masks, if any, mark clouds).
        geometry: the field's polygon in the stack's CRS.
        roles: band roles (:func:`agrivlm.explore.overlay.band_roles`); NDVI is the NDVI band or from red/NIR.
        min_clear: fraction of the field's pixels that must be clear for the date to be ``used``.

    Returns:
        one row per date: ``date`` (datetime64), ``ndvi`` (mean over clear pixels; NaN when none),
        ``clear_fraction`` (clear pixels / field pixels), ``cloud_fraction`` (masked pixels with data / field
        pixels), ``n_pixels`` (field pixels), ``used`` (bool).

    """
    window, inside = field_pixels(stack, geometry)
    data, _, mask = stack.read_window(window)
    ndvi = ndvi_from(data, roles)  # (T, h, w)
    valid = np.isfinite(ndvi) & inside[None]
    clouded = valid & mask
    clear = valid & ~mask
    n = int(inside.sum())
    sums = np.where(clear, ndvi, 0.0).sum(axis=(1, 2))
    counts = clear.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    clear_fraction = counts / n
    return pd.DataFrame({
        "date": pd.to_datetime(stack.times),
        "ndvi": mean.astype(np.float64),
        "clear_fraction": clear_fraction.astype(np.float64),
        "cloud_fraction": (clouded.sum(axis=(1, 2)) / n).astype(np.float64),
        "n_pixels": n,
        "used": (clear_fraction >= min_clear) & (counts > 0),
    })


def stages_for(field_id: str, tables: Mapping[str, list[pd.DataFrame]]) -> pd.DataFrame:
    """Growth-stage rows of one field from the predicted and true tables.

    Args:
        field_id: the field's id.
        tables: ``{"predicted": [...], "true": [...]}`` tables from :func:`~agrivlm.explore.inputs.read_map_stages`.

    Returns:
        ``date``, ``stage``, ``source`` (``"predicted"`` / ``"true"``), sorted by source then date.

    """
    parts = []
    for source, frames in tables.items():
        for frame in frames:
            rows = frame.loc[frame["field_id"] == field_id, ["date", "stage"]]
            if not rows.empty:
                parts.append(rows.assign(source=source))
    if not parts:
        return pd.DataFrame({"date": pd.Series(dtype="datetime64[ns]"), "stage": pd.Series(dtype=str),
                             "source": pd.Series(dtype=str)})
    return pd.concat(parts, ignore_index=True).sort_values(["source", "date"], ignore_index=True)
