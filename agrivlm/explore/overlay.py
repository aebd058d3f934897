"""Render one date of a stack as a PNG overlay in EPSG:4326: NDVI, true colour, false colour or one band.

The values are reprojected (not the colours): a date is read on the stack's grid (block-averaged when the
raster is larger than the overlay may be), warped to a lon/lat grid with :func:`rasterio.warp.reproject`
(nearest neighbour, so no value is invented) and only then coloured. The PNG's pixel rows run north →
south and its outer edges are the returned ``(west, south, east, north)`` in degrees, which is what a web
map's image layer in lon/lat expects.
"""

from __future__ import annotations

import base64
import io
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from affine import Affine
from matplotlib import colormaps
from PIL import Image
from rasterio.enums import Resampling
from rasterio.warp import reproject
from rasterio.windows import Window

from agrivlm.explore.errors import ExploreError
from agrivlm.geo.coords import WGS84, GeoGrid
from agrivlm.geo.stack import Stack

#: Band roles the explorer knows, with the band names (lower case) that mean them: plain names and
#: Sentinel-2 band numbers. Other sensors: pass ``roles`` explicitly (``--band red=SR_B4``).
ROLE_NAMES: dict[str, tuple[str, ...]] = {
    "ndvi": ("ndvi",),
    "red": ("red", "b04", "b4"),
    "green": ("green", "b03", "b3"),
    "blue": ("blue", "b02", "b2"),
    "nir": ("nir", "b08", "b8", "b8a", "nir08"),
}

#: The overlay views; per-band views are ``"band: <name>"``.
NDVI, TRUE_COLOUR, FALSE_COLOUR = "NDVI", "true colour", "false colour"

#: NDVI values mapped to the ends of the colour map (values outside are clipped).
NDVI_RANGE: tuple[float, float] = (-0.2, 1.0)
#: Matplotlib colour maps: NDVI (red = bare, green = dense vegetation) and single bands.
NDVI_CMAP, BAND_CMAP = "RdYlGn", "viridis"
#: Colour drawn over cloud-masked pixels (RGBA): a blue-grey, told apart from the white page and from no data.
CLOUD_RGBA: tuple[int, int, int, int] = (176, 190, 210, 235)
#: Largest side of an overlay in pixels; larger stacks are block-averaged when read.
MAX_OVERLAY_PX = 2048


def band_roles(band_names: Sequence[str], explicit: Mapping[str, str] | None = None) -> dict[str, int]:
    """Band index (0-based) of each role found.

    From ``explicit`` ``{role: band name or 1-based number}`` first, then from the band names
    (:data:`ROLE_NAMES`).

    Raises:
        ExploreError: an explicit role or band that does not exist.

    """
    lower = [re.sub(r"[^a-z0-9]", "", name.lower()) for name in band_names]
    roles: dict[str, int] = {}
    for role, band in (explicit or {}).items():
        if role not in ROLE_NAMES:
            raise ExploreError(f"--band {role}={band}: unknown role; use one of {', '.join(ROLE_NAMES)}")
        if band.isdigit() and 1 <= int(band) <= len(band_names):
            roles[role] = int(band) - 1
        elif band in band_names:
            roles[role] = list(band_names).index(band)
        else:
            raise ExploreError(
                f"--band {role}={band}: no such band; the stack's bands are {', '.join(band_names)} "
                f"(or 1..{len(band_names)})"
            )
    for role, names in ROLE_NAMES.items():
        if role in roles:
            continue
        for i, name in enumerate(lower):
            if name in names:
                roles[role] = i
                break
    return roles


def available_views(band_names: Sequence[str], roles: Mapping[str, int]) -> list[str]:
    """Views the stack supports, best first: NDVI (a band or red+NIR), true/false colour, then each band."""
    views = []
    if "ndvi" in roles or {"red", "nir"} <= roles.keys():
        views.append(NDVI)
    if {"red", "green", "blue"} <= roles.keys():
        views.append(TRUE_COLOUR)
    if {"nir", "red", "green"} <= roles.keys():
        views.append(FALSE_COLOUR)
    # Every band on its own, except an NDVI band (the NDVI view already shows it, with its fixed range).
    return views + [f"band: {name}" for i, name in enumerate(band_names) if roles.get("ndvi") != i]


def ndvi_from(data: npt.NDArray[np.floating], roles: Mapping[str, int]) -> npt.NDArray[np.float32]:
    """NDVI ``(..., H, W)`` from bands ``(..., C, H, W)``: the NDVI band, else ``(nir − red) / (nir + red)``.

    NaN where a band has no data or ``nir + red == 0``.
    """
    if "ndvi" in roles:
        return np.asarray(data[..., roles["ndvi"], :, :], dtype=np.float32)
    if not {"red", "nir"} <= roles.keys():
        raise ExploreError("NDVI needs an NDVI band or red and NIR bands; name them with --band ndvi=… or red=…/nir=…")
    red = data[..., roles["red"], :, :].astype(np.float64)
    nir = data[..., roles["nir"], :, :].astype(np.float64)
    total = nir + red
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(total != 0, (nir - red) / total, np.nan)
    return out.astype(np.float32)


def view_values(data: npt.NDArray[np.floating], roles: Mapping[str, int], view: str, band_names: Sequence[str]
                ) -> npt.NDArray[np.float32]:
    """The values a view shows, ``(K, H, W)`` float32 (K = 1 for NDVI or a band, 3 for colour composites).

    Args:
        data: one date ``(C, H, W)``, NaN = no data.
        roles: from :func:`band_roles`.
        view: one of :func:`available_views`.
        band_names: the stack's band names (for ``"band: <name>"`` views).

    """
    if view == NDVI:
        return ndvi_from(data, roles)[None]
    if view in (TRUE_COLOUR, FALSE_COLOUR):
        order = ("red", "green", "blue") if view == TRUE_COLOUR else ("nir", "red", "green")
        missing = [r for r in order if r not in roles]
        if missing:
            raise ExploreError(f"{view} needs the {', '.join(missing)} band(s); name them with --band ROLE=BAND")
        return np.stack([data[roles[r]] for r in order]).astype(np.float32)
    if view.startswith("band: ") and view[6:] in band_names:
        return data[list(band_names).index(view[6:])][None].astype(np.float32)
    raise ExploreError(f"unknown view {view!r}; the stack offers {', '.join(available_views(band_names, roles))}")


def channel_ranges(values: npt.NDArray[np.float32], lo_pct: float = 2.0, hi_pct: float = 98.0
                   ) -> list[tuple[float, float]]:
    """Per-channel ``(lo, hi)`` percentiles of ``(K, H, W)`` over finite values (``(0, 1)`` for an empty channel)."""
    out = []
    for channel in values:
        finite = channel[np.isfinite(channel)]
        if finite.size == 0:
            out.append((0.0, 1.0))
        else:
            lo, hi = np.percentile(finite, [lo_pct, hi_pct])
            out.append((float(lo), float(hi)))
    return out


def apply_ranges(values: npt.NDArray[np.float32], ranges: Sequence[tuple[float, float]]) -> npt.NDArray[np.float32]:
    """Scale each channel of ``(K, H, W)`` from its ``(lo, hi)`` to [0, 1], clipped (a flat range → 0.5; NaN kept)."""
    out = np.empty(values.shape, dtype=np.float32)
    for k, (channel, (lo, hi)) in enumerate(zip(values, ranges, strict=True)):
        out[k] = 0.5 if hi <= lo else np.clip((channel - lo) / (hi - lo), 0.0, 1.0)
        out[k][~np.isfinite(channel)] = np.nan
    return out


def colorize(values: npt.NDArray[np.float32], view: str, clouds: npt.NDArray[np.bool_] | None = None,
             ranges: Sequence[tuple[float, float]] | None = None) -> npt.NDArray[np.uint8]:
    """RGBA ``(H, W, 4)`` uint8 of view values ``(K, H, W)``; no data → transparent, clouds → :data:`CLOUD_RGBA`.

    NDVI uses the fixed :data:`NDVI_RANGE`; composites and bands are stretched to ``ranges`` (default: the
    2–98 % percentiles of ``values`` per channel).
    """
    nodata = ~np.isfinite(values).all(axis=0)
    if view == NDVI:
        lo, hi = NDVI_RANGE
        scaled = np.clip((values[0] - lo) / (hi - lo), 0.0, 1.0)
        rgba = np.asarray(colormaps[NDVI_CMAP](np.nan_to_num(scaled, nan=0.0)))
    else:
        scaled = np.nan_to_num(apply_ranges(values, ranges or channel_ranges(values)), nan=0.0)
        if values.shape[0] == 3:
            rgba = np.concatenate([np.moveaxis(scaled, 0, -1), np.ones(scaled.shape[1:] + (1,), np.float32)], axis=-1)
        else:
            rgba = np.asarray(colormaps[BAND_CMAP](scaled[0]))
    out = (rgba * 255.0 + 0.5).astype(np.uint8)
    if clouds is not None:
        out[clouds & ~nodata] = CLOUD_RGBA
    out[nodata] = 0
    return out


def read_date(stack: Stack, step: int, max_px: int = MAX_OVERLAY_PX
              ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_], GeoGrid]:
    """One date of the stack, block-averaged by an integer factor so that no side exceeds ``max_px``.

    Returns:
        ``data`` ``(C, h, w)`` float32 (NaN = no data; a block's mean over its valid pixels),
        ``clouds`` ``(h, w)`` bool (True where at least half of a block's pixels are masked),
        and the grid of the result (the stack's transform scaled by the factor; edge blocks are padded with
        no data, so the grid covers whole blocks).

    """
    height, width = stack.grid.height, stack.grid.width
    factor = max(1, math.ceil(max(height, width) / max_px))
    if factor == 1:
        data, _, mask = stack.read_window(Window(0, 0, width, height), steps=[step])
        return data[0], mask[0], stack.grid
    out_h, out_w = math.ceil(height / factor), math.ceil(width / factor)
    c = len(stack.band_names)
    data_out = np.full((c, out_h, out_w), np.nan, dtype=np.float32)
    cloud_out = np.zeros((out_h, out_w), dtype=bool)
    with stack:
        for r0 in range(0, out_h):
            rows = min(factor, height - r0 * factor)
            data, _, mask = stack.read_window(Window(0, r0 * factor, width, rows), steps=[step])
            padded = np.full((c, factor, out_w * factor), np.nan, dtype=np.float32)
            padded[:, :rows, :width] = data[0]
            cloud = np.zeros((factor, out_w * factor), dtype=np.float32)
            cloud[:rows, :width] = mask[0]
            blocks = padded.reshape(c, factor, out_w, factor)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks stay NaN, as meant
                data_out[:, r0] = np.nanmean(blocks, axis=(1, 3))
            cloud_out[r0] = cloud.reshape(factor, out_w, factor).mean(axis=(0, 2)) >= 0.5
    grid = GeoGrid(stack.grid.transform * Affine.scale(factor), stack.grid.crs, out_w, out_h)
    return data_out, cloud_out, grid


def lonlat_grid(grid: GeoGrid, oversample: float = 2.0, max_px: int = MAX_OVERLAY_PX) -> GeoGrid:
    """A north-up EPSG:4326 grid that covers ``grid``'s footprint.

    The footprint's edges are densified, so rotation and meridian convergence are covered. The grid has about
    ``oversample``² target pixels per source pixel (nearest-neighbour warping then keeps the source pixels'
    shapes) and no side above ``max_px``.
    """
    n = 32
    steps = np.linspace(0.0, 1.0, n + 1)
    cols = np.concatenate([steps * grid.width, np.full(n + 1, grid.width), steps[::-1] * grid.width, np.zeros(n + 1)])
    rows = np.concatenate(
        [np.zeros(n + 1), steps * grid.height, np.full(n + 1, grid.height), steps[::-1] * grid.height]
    )
    lon, lat = grid.crs_to_lonlat(*grid.pixel_to_crs(cols, rows))
    west, east, south, north = float(lon.min()), float(lon.max()), float(lat.min()), float(lat.max())
    # Square-ish target pixels on the ground: a degree of longitude is cos(lat) of a degree of latitude.
    ground_aspect = (east - west) * math.cos(math.radians((south + north) / 2)) / max(north - south, 1e-12)
    footprint_area = 0.5 * abs(np.dot(lon, np.roll(lat, -1)) - np.dot(lat, np.roll(lon, -1)))
    bbox_area = (east - west) * (north - south)
    target_px = grid.width * grid.height * oversample**2 * bbox_area / max(footprint_area, 1e-300)
    out_w = max(1, round(math.sqrt(target_px * ground_aspect)))
    out_h = max(1, round(math.sqrt(target_px / ground_aspect)))
    scale = min(1.0, max_px / max(out_w, out_h))
    out_w, out_h = max(1, round(out_w * scale)), max(1, round(out_h * scale))
    transform = Affine((east - west) / out_w, 0.0, west, 0.0, -(north - south) / out_h, north)
    return GeoGrid(transform, WGS84, out_w, out_h)


def to_lonlat(values: npt.NDArray[np.float32], clouds: npt.NDArray[np.bool_], grid: GeoGrid, target: GeoGrid
              ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """Warp view values ``(K, H, W)`` and clouds ``(H, W)`` from ``grid`` to the lon/lat ``target`` (nearest)."""
    out = np.full((values.shape[0], target.height, target.width), np.nan, dtype=np.float32)
    for k in range(values.shape[0]):
        reproject(
            source=np.ascontiguousarray(values[k]), destination=out[k],
            src_transform=grid.transform, src_crs=grid.crs, src_nodata=np.nan,
            dst_transform=target.transform, dst_crs=target.crs, dst_nodata=np.nan,
            resampling=Resampling.nearest,
        )
    cloud_out = np.zeros((target.height, target.width), dtype=np.uint8)
    reproject(
        source=clouds.astype(np.uint8), destination=cloud_out,
        src_transform=grid.transform, src_crs=grid.crs, dst_transform=target.transform, dst_crs=target.crs,
        resampling=Resampling.nearest,
    )
    return out, cloud_out.astype(bool)


@dataclass(frozen=True)
class Overlay:
    """A date of the stack ready for a web map."""

    #: PNG bytes, RGBA, rows north → south.
    png: bytes
    #: ``(west, south, east, north)`` of the PNG's outer edges, degrees on WGS 84.
    bounds: tuple[float, float, float, float]
    #: Fraction of the stack's footprint with data on this date (0 = an empty date).
    valid_fraction: float
    #: Fraction of the valid pixels that are cloud-masked.
    cloud_fraction: float

    def data_url(self) -> str:
        """The PNG as a ``data:`` URL (the page embeds it, nothing is served from disk)."""
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


def render_overlay(stack: Stack, step: int, view: str, roles: Mapping[str, int], show_clouds: bool = True,
                   max_px: int = MAX_OVERLAY_PX) -> Overlay:
    """Render date ``step`` of ``stack`` in ``view`` as a lon/lat PNG overlay (see the module docstring)."""
    data, clouds, grid = read_date(stack, step, max_px=max_px // 2)
    values = view_values(data, roles, view, stack.band_names)
    valid = np.isfinite(values).all(axis=0)
    valid_fraction = float(valid.mean())
    cloud_fraction = float((clouds & valid).sum() / max(valid.sum(), 1))
    target = lonlat_grid(grid, max_px=max_px)
    warped, warped_clouds = to_lonlat(values, clouds, grid, target)
    # Stretch ranges from the source pixels, so the warp's duplicated pixels do not weigh in.
    ranges = None if view == NDVI else channel_ranges(values)
    rgba = colorize(warped, view, warped_clouds if show_clouds else None, ranges)
    buffer = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buffer, format="PNG", optimize=False)
    west, north = target.transform.c, target.transform.f
    east = west + target.transform.a * target.width
    south = north + target.transform.e * target.height
    return Overlay(buffer.getvalue(), (west, south, east, north), valid_fraction, cloud_fraction)


def legend_png(view: str, width: int = 320, height: int = 64) -> bytes | None:
    """A small colour bar for NDVI or a band view (PNG), ``None`` for colour composites."""
    if view in (TRUE_COLOUR, FALSE_COLOUR):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colorbar import ColorbarBase
    from matplotlib.colors import Normalize

    fig = plt.figure(figsize=(width / 100, height / 100), dpi=100)
    ax = fig.add_axes((0.04, 0.42, 0.92, 0.28))
    if view == NDVI:
        norm, cmap, label = Normalize(*NDVI_RANGE), colormaps[NDVI_CMAP], "NDVI"
    else:
        norm, cmap, label = Normalize(0, 1), colormaps[BAND_CMAP], f"{view[6:]} (2–98 % stretch of the date)"
    ColorbarBase(ax, cmap=cmap, norm=norm, orientation="horizontal")
    ax.tick_params(labelsize=7)
    ax.set_title(label, fontsize=8, pad=2)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", transparent=True)
    plt.close(fig)
    return buffer.getvalue()
