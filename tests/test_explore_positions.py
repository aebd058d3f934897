"""Decoded positions → lon/lat and dates through the chip's own grid and time axis (no codec needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rasters import ROTATED_TRANSFORM, UTM33

from agrivlm.explore.inputs import ExploreError
from agrivlm.explore.positions import (
    ChipPositions,
    ModelUnavailable,
    ask_model,
    check_model,
    chip_grid,
    decode_answer_text,
    positions_table,
    shapes_frame,
)
from agrivlm.geo import ChipStream, open_stack
from agrivlm.geo.coords import GeoGrid, TimeAxis


@pytest.fixture(scope="module")
def stack(sample_root: Path):
    return open_stack(sample_root / "ndvi")


def test_chip_grid_from_id_is_the_chip_streams_grid(stack) -> None:
    stream = ChipStream(stack, chip_size=64, stride=32)
    for index in (0, 4, 8):
        chip = stream.read(index, stream.windows[index])
        assert chip_grid(stack.grid, chip.chip_id, 64) == chip.grid
    with pytest.raises(ExploreError, match="not of the form"):
        chip_grid(stack.grid, "chip-7", 64)
    with pytest.raises(ExploreError, match="does not fit.*--chip-size"):
        chip_grid(stack.grid, "r000064_c000000", 64)


def test_table_corners_and_dates(stack) -> None:
    grid = chip_grid(stack.grid, "r000032_c000036", 64)
    axis = TimeAxis.from_dates(stack.times)
    table = positions_table(grid, axis, ChipPositions(
        "r000032_c000036", u=np.array([0.0, 1.0, 0.5]), v=np.array([0.0, 1.0, 0.25]), t=np.array([0.0, 1.0]),
        tokens=("<WIDTH-000><HEIGHT-000>", "<WIDTH-149><HEIGHT-149>", "<WIDTH-075><HEIGHT-037>")))
    points, times = table[table["kind"] == "point"], table[table["kind"] == "time"]
    corners = grid.corners()  # TL, TR, BR, BL in the CRS
    assert points[["x", "y"]].to_numpy()[0] == pytest.approx(corners[0])
    assert points[["x", "y"]].to_numpy()[1] == pytest.approx(corners[2])
    assert points[["col", "row"]].to_numpy()[2] == pytest.approx([32.0, 16.0])
    lon, lat = grid.crs_to_lonlat(corners[0, 0], corners[0, 1])
    assert points["lon"].iloc[0] == pytest.approx(float(lon), abs=1e-12)
    assert points["lat"].iloc[0] == pytest.approx(float(lat), abs=1e-12)
    assert list(points["label"]) == ["P1", "P2", "P3"] and points["tokens"].iloc[1] == "<WIDTH-149><HEIGHT-149>"
    assert list(times["date"]) == ["2015-07-11", "2017-12-22"]


@settings(max_examples=40, deadline=None)
@given(u=st.floats(0, 1), v=st.floats(0, 1), t=st.floats(0, 1))
def test_positions_map_back_to_the_same_normalized_values(u: float, v: float, t: float) -> None:
    grid = GeoGrid(ROTATED_TRANSFORM, UTM33, 64, 48)
    axis = TimeAxis.from_dates(np.array(["2021-03-01", "2021-09-30"], dtype="datetime64[s]"))
    table = positions_table(grid, axis, ChipPositions("r000000_c000000", np.array([u]), np.array([v]), np.array([t])))
    u2, v2 = grid.lonlat_to_norm(table["lon"].iloc[0], table["lat"].iloc[0])
    assert abs(u2 - u) < 1e-9 and abs(v2 - v) < 1e-9
    date = np.datetime64(table.loc[table["kind"] == "time", "date"].iloc[0])
    # the date is the day of t (rounded down to the day)
    assert abs(float(axis.to_norm(date)) - t) <= 1.0 / 213 + 1e-12


def test_bad_positions_are_errors(stack) -> None:
    grid = chip_grid(stack.grid, "r000000_c000000", 64)
    axis = TimeAxis.from_dates(stack.times)
    with pytest.raises(ExploreError, match="come in \\(u, v\\) pairs"):
        positions_table(grid, axis, ChipPositions("r000000_c000000", np.array([0.1, 0.2]), np.array([0.1])))
    with pytest.raises(ExploreError, match="outside \\[0, 1\\]"):
        positions_table(grid, axis, ChipPositions("r000000_c000000", np.array([1.2]), np.array([0.1])))


def test_answers_decode_with_the_lape_codec(stack) -> None:
    text = ("1 field: grassland <WIDTH-012><HEIGHT-087><WIDTH-040><HEIGHT-120>; at <WIDTH-003><HEIGHT-004> "
            "in <TEMP-030>.")
    pos = decode_answer_text(text, "r000000_c000000")
    assert pos.u == pytest.approx([12.5 / 150, 40.5 / 150, 3.5 / 150])
    assert pos.v == pytest.approx([87.5 / 150, 120.5 / 150, 4.5 / 150])
    assert pos.t == pytest.approx([30.5 / 50])
    assert pos.tokens == ("<WIDTH-012><HEIGHT-087>", "<WIDTH-040><HEIGHT-120>", "<WIDTH-003><HEIGHT-004>")
    assert len(pos.boxes) == 1 and pos.boxes[0] == pytest.approx((12.5 / 150, 87.5 / 150, 40.5 / 150, 120.5 / 150))
    grid = chip_grid(stack.grid, "r000000_c000000", 64)
    frame = shapes_frame(grid, pos)
    assert frame.crs == stack.crs and list(frame["label"]) == ["B1"]
    assert frame.geometry.iloc[0].equals(grid.norm_box_to_polygon(pos.boxes[0]))
    # a polygon answer (as the fields layer's ``tokens`` column holds it): its vertices, and its outline
    ring = "<WIDTH-010><HEIGHT-010>,<WIDTH-100><HEIGHT-020>,<WIDTH-060><HEIGHT-120>"
    poly = decode_answer_text(f"1 field: grassland {ring}; forest <WIDTH-001><HEIGHT-002><WIDTH-003><HEIGHT-004>.",
                         "r000000_c000000")
    assert len(poly.polygons) == 1 and len(poly.boxes) == 1 and poly.u.size == 2 + 3
    assert poly.tokens[2:] == ("<WIDTH-010><HEIGHT-010>", "<WIDTH-100><HEIGHT-020>", "<WIDTH-060><HEIGHT-120>")
    shapes = shapes_frame(grid, poly)
    assert list(shapes["label"]) == ["B1", "G1"]
    assert shapes.geometry.iloc[1].equals(grid.norm_polygon_to_crs(poly.polygons[0]))
    empty = decode_answer_text("There are no fields in this image.", "r000000_c000000")
    assert empty.u.size == 0 and empty.boxes == ()
    with pytest.raises(ExploreError, match="do not decode.*WIDTH-151"):
        decode_answer_text("<WIDTH-151><HEIGHT-000>", "r000000_c000000")


def test_model_says_what_is_missing(tmp_path: Path, stack) -> None:
    with pytest.raises(ModelUnavailable, match="no such checkpoint"):
        check_model(tmp_path / "missing")
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(ModelUnavailable, match="no config.json"):
        ask_model(tmp_path / "ckpt", stack, "r000000_c000000", "Where are the fields?", 32)
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    with pytest.raises(ModelUnavailable, match="does not load"):
        check_model(tmp_path / "ckpt")
