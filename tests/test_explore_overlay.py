"""The overlay: band roles, NDVI, colours, and a date warped to lon/lat where the pixels really are."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from affine import Affine
from matplotlib import colormaps
from PIL import Image
from rasters import ROTATED_TRANSFORM, UTM33, UTM_TRANSFORM, write_raster

from agrivlm.explore.inputs import ExploreError
from agrivlm.explore.overlay import (
    CLOUD_RGBA,
    FALSE_COLOUR,
    NDVI,
    NDVI_CMAP,
    NDVI_RANGE,
    TRUE_COLOUR,
    available_views,
    band_roles,
    colorize,
    lonlat_grid,
    ndvi_from,
    read_date,
    render_overlay,
    view_values,
)
from agrivlm.geo import open_stack
from agrivlm.geo.coords import WGS84, GeoGrid


def test_band_roles_from_names_and_explicit() -> None:
    names = ["B02", "B03", "B04", "B08", "SCL"]
    roles = band_roles(names)
    assert roles == {"blue": 0, "green": 1, "red": 2, "nir": 3}
    assert available_views(names, roles) == [NDVI, TRUE_COLOUR, FALSE_COLOUR] + [f"band: {n}" for n in names]
    assert band_roles(["SR_B4", "SR_B5"], {"red": "SR_B4", "nir": "2"}) == {"red": 0, "nir": 1}
    with pytest.raises(ExploreError, match="no such band.*SR_B4, SR_B5"):
        band_roles(["SR_B4", "SR_B5"], {"red": "B4x"})
    # an NDVI band is the NDVI view, not a second "band:" view
    assert available_views(["NDVI"], band_roles(["NDVI"])) == [NDVI]


def test_ndvi_from_red_and_nir() -> None:
    data = np.array([[[0.1, 0.0]], [[0.5, 0.0]]], dtype=np.float32)  # (C=2, 1, 2): red, nir
    ndvi = ndvi_from(data, {"red": 0, "nir": 1})
    assert ndvi[0, 0] == pytest.approx((0.5 - 0.1) / 0.6, abs=1e-6)
    assert np.isnan(ndvi[0, 1])  # nir + red == 0
    with pytest.raises(ExploreError, match="NDVI needs"):
        ndvi_from(data, {"red": 0})


def test_colorize_ndvi_nodata_and_clouds() -> None:
    values = np.array([[[NDVI_RANGE[0], NDVI_RANGE[1], np.nan, 0.4]]], dtype=np.float32)
    clouds = np.array([[False, False, False, True]])
    rgba = colorize(values, NDVI, clouds)
    cmap = colormaps[NDVI_CMAP]
    assert tuple(rgba[0, 0]) == tuple(int(c * 255 + 0.5) for c in cmap(0.0))
    assert tuple(rgba[0, 1]) == tuple(int(c * 255 + 0.5) for c in cmap(1.0))
    assert rgba[0, 2, 3] == 0  # no data: transparent
    assert tuple(rgba[0, 3]) == CLOUD_RGBA


def write_ndvi_stack(folder: Path, transform=UTM_TRANSFORM, h: int = 30, w: int = 40) -> np.ndarray:
    """Two dates of an NDVI ramp across columns (value = col / w), one nodata pixel, cloud in the top-left block."""
    ramp = np.tile(np.arange(w, dtype=np.float32) / w, (h, 1))
    for k, day in enumerate((1, 11)):
        data = ramp + 0.01 * k
        data[h - 1, w - 1] = -9999.0
        write_raster(folder / "ndvi" / f"S2_202105{day:02d}.tif", data[None], transform=transform,
                     descriptions=["NDVI"])
        mask = np.zeros((1, h, w), dtype=np.uint8)
        mask[0, :10, :10] = 1
        write_raster(folder / "clm" / f"CLM_202105{day:02d}.tif", mask, transform=transform, nodata=None)
    return ramp


@pytest.mark.parametrize("transform", [UTM_TRANSFORM, ROTATED_TRANSFORM], ids=["north-up", "rotated"])
def test_overlay_pixels_land_where_the_stack_pixels_are(tmp_path: Path, transform) -> None:
    ramp = write_ndvi_stack(tmp_path, transform)
    stack = open_stack(tmp_path / "ndvi", masks=tmp_path / "clm")
    overlay = render_overlay(stack, 1, NDVI, band_roles(stack.band_names), show_clouds=True)
    assert overlay.valid_fraction == pytest.approx(1 - 1 / ramp.size)
    assert overlay.cloud_fraction == pytest.approx(100 / (ramp.size - 1))
    img = np.asarray(Image.open(io.BytesIO(overlay.png)))
    west, south, east, north = overlay.bounds
    # the PNG's grid, rebuilt from the bounds the map is given
    target = GeoGrid(Affine((east - west) / img.shape[1], 0, west, 0, -(north - south) / img.shape[0], north),
                     WGS84, img.shape[1], img.shape[0])
    cmap = colormaps[NDVI_CMAP]
    lo, hi = NDVI_RANGE
    checked = 0
    for row in (12.5, 20.5, 25.5):
        for col in (5.5, 17.5, 33.5):
            lon, lat = stack.grid.crs_to_lonlat(*stack.grid.pixel_to_crs(col, row))
            pc, pr = target.crs_to_pixel(lon, lat)
            value = ramp[int(row), int(col)] + 0.01
            want = np.array([int(c * 255 + 0.5) for c in cmap(np.clip((value - lo) / (hi - lo), 0, 1))])
            assert np.abs(img[int(pr), int(pc)].astype(int) - want).max() <= 1, (row, col)
            checked += 1
    assert checked == 9
    # a cloud pixel is white, the nodata pixel transparent, outside the footprint transparent
    lon, lat = stack.grid.crs_to_lonlat(*stack.grid.pixel_to_crs(4.5, 4.5))
    pc, pr = target.crs_to_pixel(lon, lat)
    assert tuple(img[int(pr), int(pc)]) == CLOUD_RGBA
    lon, lat = stack.grid.crs_to_lonlat(*stack.grid.pixel_to_crs(39.5, 29.5))
    pc, pr = target.crs_to_pixel(lon, lat)
    assert img[int(pr), int(pc), 3] == 0
    if transform is ROTATED_TRANSFORM:
        assert img[0, 0, 3] == 0  # the rotated footprint leaves the bounding box's corner empty


def test_lonlat_grid_covers_the_footprint() -> None:
    grid = GeoGrid(ROTATED_TRANSFORM, UTM33, 100, 80)
    target = lonlat_grid(grid)
    corners = grid.corners()
    lon, lat = grid.crs_to_lonlat(corners[:, 0], corners[:, 1])
    west, south, east, north = target.bounds
    assert (lon >= west - 1e-12).all() and (lon <= east + 1e-12).all()
    assert (lat >= south - 1e-12).all() and (lat <= north + 1e-12).all()
    # about oversample² = 4 target pixels per source pixel over the footprint's bounding box
    assert 4 * 100 * 80 <= target.width * target.height <= 4 * 100 * 80 * 2.5


def test_large_stack_is_block_averaged(tmp_path: Path) -> None:
    h, w = 37, 50
    data = np.arange(h * w, dtype=np.float32).reshape(1, h, w)
    write_raster(tmp_path / "S2_20210501.tif", data)
    stack = open_stack(tmp_path)
    out, clouds, grid = read_date(stack, 0, max_px=10)  # factor 5
    assert out.shape == (1, 8, 10) and grid.width == 10 and grid.height == 8
    assert out[0, 0, 0] == pytest.approx(data[0, :5, :5].mean())
    assert out[0, 7, 9] == pytest.approx(data[0, 35:37, 45:50].mean())  # the padded edge block: real pixels only
    assert grid.transform.a == pytest.approx(5 * stack.grid.transform.a)
    assert not clouds.any()


def test_composites_need_their_bands(tmp_path: Path) -> None:
    data = np.stack([np.full((4, 4), v, np.float32) for v in (0.1, 0.2, 0.3, 0.6)])
    with pytest.raises(ExploreError, match="true colour needs the blue band"):
        view_values(data, {"red": 0, "green": 1, "nir": 3}, TRUE_COLOUR, ["r", "g", "x", "n"])
    fc = view_values(data, {"red": 0, "green": 1, "nir": 3}, FALSE_COLOUR, ["r", "g", "x", "n"])
    assert fc[:, 0, 0].tolist() == pytest.approx([0.6, 0.1, 0.2])
