from __future__ import annotations

from datetime import datetime

import numpy as np
import pytest
from affine import Affine
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.crs import CRS
from rasterio.windows import Window
from rasters import ROTATED_TRANSFORM, SOUTH_UP_TRANSFORM, UTM33, UTM_TRANSFORM

from agrivlm.geo.coords import GeoGrid, TimeAxis

GRIDS = {
    "north-up UTM": GeoGrid(UTM_TRANSFORM, UTM33, 100, 80),
    "rotated UTM": GeoGrid(ROTATED_TRANSFORM, UTM33, 100, 80),
    "south-up UTM": GeoGrid(SOUTH_UP_TRANSFORM, UTM33, 100, 80),
    "geographic": GeoGrid(Affine(0.0001, 0.0, 14.55, 0.0, -0.0001, 45.88), CRS.from_epsg(4326), 100, 80),
    "rotated geographic": GeoGrid(
        Affine.translation(14.55, 45.88) @ Affine.rotation(-12) @ Affine.scale(1e-4, -1e-4),
        CRS.from_epsg(4326), 100, 80),
}
unit = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@pytest.mark.parametrize("name", GRIDS)
@settings(max_examples=60, deadline=None)
@given(u=unit, v=unit)
def test_norm_crs_lonlat_round_trips(name: str, u: float, v: float) -> None:
    grid = GRIDS[name]
    x, y = grid.norm_to_crs(u, v)
    u2, v2 = grid.crs_to_norm(x, y)
    # float precision: a few ulps of coordinates ~5e6 m, i.e. ~1e-9 m, are ~1e-12 of a 1 km grid
    assert abs(u2 - u) < 1e-11 and abs(v2 - v) < 1e-11
    lon, lat = grid.norm_to_lonlat(u, v)
    u3, v3 = grid.lonlat_to_norm(lon, lat)
    # through pyproj and back: nanometres on a 1 km grid
    assert abs(u3 - u) < 1e-9 and abs(v3 - v) < 1e-9
    x4, y4 = grid.lonlat_to_crs(*grid.crs_to_lonlat(x, y))
    assert abs(x4 - x) < 1e-6 and abs(y4 - y) < 1e-6


def test_pixel_convention_matches_rasterio() -> None:
    grid = GRIDS["rotated UTM"]
    for col, row in [(0, 0), (100, 80), (3.5, 7.25)]:
        assert np.allclose(grid.pixel_to_crs(col, row), ROTATED_TRANSFORM * (col, row), rtol=0, atol=1e-9)
    # the normalized corner (1, 1) is the outer bottom-right corner of the grid
    assert np.allclose(grid.norm_to_crs(1, 1), ROTATED_TRANSFORM * (100, 80), rtol=0, atol=1e-9)
    # UTM 33N near the sample area lies in Slovenia
    lon, lat = GRIDS["north-up UTM"].crs_to_lonlat(465000.0, 5080000.0)
    assert 14.5 < lon < 14.6 and 45.8 < lat < 45.9


def test_subgrid_is_the_window_shifted_transform_and_footprints() -> None:
    grid = GRIDS["rotated UTM"]
    sub = grid.subgrid(Window(10, 20, 30, 40))
    assert sub.transform == ROTATED_TRANSFORM @ Affine.translation(10, 20)
    # the chip's normalized (0, 0) and (1, 1) are the parent's pixels (10, 20) and (40, 60)
    assert np.allclose(sub.norm_to_crs(0, 0), grid.pixel_to_crs(10, 20), atol=1e-9)
    assert np.allclose(sub.norm_to_crs(1, 1), grid.pixel_to_crs(40, 60), atol=1e-9)
    north = GRIDS["north-up UTM"]
    assert north.bounds == (465000.0, 5079200.0, 466000.0, 5080000.0)
    assert north.footprint().area == pytest.approx(1000 * 800)
    assert grid.footprint().area == pytest.approx(1000 * 800)  # rotation keeps the area
    box = north.norm_box_to_polygon((0.25, 0.5, 0.75, 1.0))
    assert box.bounds == pytest.approx((465250.0, 5079200.0, 465750.0, 5079600.0))


def test_time_axis_round_trip_and_days() -> None:
    dates = [datetime(2015, 7, 11, 10, 0, 8), datetime(2016, 1, 1), datetime(2017, 12, 22, 10, 4, 15)]
    axis = TimeAxis.from_dates(dates)
    t = axis.to_norm(dates)
    assert t[0] == 0.0 and t[-1] == 1.0 and 0 < t[1] < 1
    back = axis.from_norm(t)
    assert (back == np.array(dates, dtype="datetime64[us]")).all()
    assert axis.days_between(0.0, 1.0) == pytest.approx((dates[-1] - dates[0]).total_seconds() / 86400)
    single = TimeAxis.from_dates([dates[0]])
    assert single.to_norm(dates[0]) == 0.0
    assert single.from_norm(0.7) == np.datetime64(dates[0], "us")
