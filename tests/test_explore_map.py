"""Map pieces: GeoJSON in lon/lat, the chip grid, the fitted view, the basemap option, the deck spec."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rasters import UTM33, UTM_TRANSFORM
from shapely.geometry import box

from agrivlm.explore.inputs import ExploreError
from agrivlm.explore.mapview import (
    PICK_LAYERS,
    basemap_style,
    build_deck,
    chip_grid_frame,
    fit_view,
    lonlat_to_mercator,
    lonlat_to_screen,
    mercator_to_lonlat,
    to_geojson,
)
from agrivlm.explore.overlay import NDVI, band_roles, render_overlay
from agrivlm.geo import ChipStream, open_stack
from agrivlm.geo.coords import GeoGrid


def test_geojson_is_lon_lat_of_the_stack_coordinates() -> None:
    grid = GeoGrid(UTM_TRANSFORM, UTM33, 100, 80)
    x0, y0 = grid.pixel_to_crs(10, 20)
    frame = gpd.GeoDataFrame({"field_id": ["a"], "score": [np.float32(0.5)], "n": [np.int64(3)]},
                             geometry=[box(float(x0), float(y0) - 100, float(x0) + 100, float(y0))], crs=32633)
    gj = to_geojson(frame, ["field_id", "score", "n", "absent"])
    feature = gj["features"][0]
    assert feature["properties"] == {"field_id": "a", "score": 0.5, "n": 3}
    json.dumps(gj)  # JSON-safe
    ring = np.array(feature["geometry"]["coordinates"][0])
    lon, lat = grid.crs_to_lonlat(*box(float(x0), float(y0) - 100, float(x0) + 100, float(y0)).exterior.xy)
    assert np.abs(ring[:, 0] - lon).max() < 1e-7 and np.abs(ring[:, 1] - lat).max() < 1e-7
    with pytest.raises(ExploreError, match="without a CRS"):
        to_geojson(frame.set_crs(None, allow_override=True), ["field_id"])


def test_chip_grid_matches_the_chip_stream(sample_root: Path) -> None:
    stack = open_stack(sample_root / "ndvi")
    frame = chip_grid_frame(stack.grid, 64, 32)
    stream = ChipStream(stack, chip_size=64, stride=32)
    assert len(frame) == len(stream.windows) == 9
    # same ids and footprints as the chips `agrivlm ingest` writes (no pixel is read here)
    chip = stream.read(4, stream.windows[4])
    row = frame.iloc[4]
    assert row["chip_id"] == chip.chip_id
    assert row.geometry.equals_exact(chip.grid.footprint(), 1e-6)


@settings(max_examples=60, deadline=None)
@given(lon=st.floats(-170, 170), lat=st.floats(-80, 80), span=st.floats(1e-4, 5.0),
       aspect=st.floats(0.2, 5.0), width=st.integers(300, 1600), height=st.integers(200, 900))
def test_fit_view_shows_the_whole_box(lon: float, lat: float, span: float, aspect: float, width: int,
                                      height: int) -> None:
    south, north = max(lat - span / 2, -84.0), min(lat + span / 2, 84.0)
    west, east = lon - span * aspect / 2, lon + span * aspect / 2
    view = fit_view((west, south, east, north), width, height, padding=0.05)
    xs, ys = zip(*(lonlat_to_screen(a, b, view, width, height)
                   for a in (west, east) for b in (south, north)), strict=True)
    assert min(xs) >= -1e-6 and max(xs) <= width + 1e-6
    assert min(ys) >= -1e-6 and max(ys) <= height + 1e-6
    # and it is tight on one axis (the box spans 90 % of the width or of the height) unless the zoom hit
    # its ceiling of 22, where a box of a few metres stays smaller than the map
    if view["zoom"] >= 22.0:
        return
    assert max(max(xs) - min(xs) - 0.9 * width, max(ys) - min(ys) - 0.9 * height) == pytest.approx(0, abs=1e-3)


@given(lon=st.floats(-180, 180), lat=st.floats(-85, 85))
def test_mercator_round_trip(lon: float, lat: float) -> None:
    lon2, lat2 = mercator_to_lonlat(*lonlat_to_mercator(lon, lat))
    assert lon2 == pytest.approx(lon, abs=1e-9) and lat2 == pytest.approx(lat, abs=1e-9)


def test_basemap_option() -> None:
    assert basemap_style(None) is None
    assert basemap_style("https://example.org/style.json") == "https://example.org/style.json"
    url = basemap_style("https://tile.example.org/{z}/{x}/{y}.png")
    assert url is not None and url.startswith("data:application/json;base64,")
    style = json.loads(base64.b64decode(url.split(",", 1)[1]))
    assert style["sources"]["basemap"]["tiles"] == ["https://tile.example.org/{z}/{x}/{y}.png"]
    with pytest.raises(ExploreError, match="http"):
        basemap_style("file:///etc/passwd")


def test_deck_spec_has_no_basemap_and_literal_strings(sample_root: Path) -> None:
    stack = open_stack(sample_root / "ndvi")
    overlay = render_overlay(stack, 10, NDVI, band_roles(stack.band_names))
    parcels = gpd.read_file(sample_root / "parcels.gpkg").iloc[:5].assign(field_id=list("abcde"), kind="true")
    gj = to_geojson(parcels, ["field_id", "kind"])
    view = fit_view(overlay.bounds)
    spec = json.loads(build_deck(view, overlay, true_fields=gj, selected=to_geojson(parcels.iloc[:1], ["field_id"]))
                      .to_json())
    # no basemap: the sentinel Streamlit treats as "draw none" (no tile request is ever made)
    assert spec["mapStyle"] == "__MAP_STYLE__"
    layers = {layer["id"]: layer for layer in spec["layers"]}
    assert list(layers) == ["stack-overlay", "true-outline", PICK_LAYERS["true"], "selected-field"]
    bitmap = layers["stack-overlay"]
    assert bitmap["image"].startswith("data:image/png;base64,") and bitmap["bounds"] == list(overlay.bounds)
    assert bitmap["_imageCoordinateSystem"] == "lnglat"
    assert layers["true-outline"]["lineWidthUnits"] == "pixels"  # a literal, not an "@@=" expression
    assert layers[PICK_LAYERS["true"]]["pickable"] and layers[PICK_LAYERS["true"]]["opacity"] == 0.0
    assert not any(str(v).startswith("@@=") for layer in spec["layers"] for k, v in layer.items() if k != "getPath")
    with_tiles = json.loads(build_deck(view, tiles="https://tile.example.org/{z}/{x}/{y}.png").to_json())
    assert with_tiles["mapStyle"].startswith("data:application/json;base64,")
