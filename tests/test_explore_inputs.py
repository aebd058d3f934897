"""Loading the explorer's inputs: field layers in any CRS, ids, stage tables, and the errors for bad files."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import pandas as pd
import pytest
from shapely.geometry import box

from agrivlm.explore.inputs import ExploreError, read_map_layer, read_map_stages, split_inputs
from agrivlm.geo import open_stack


@pytest.fixture(scope="module")
def sample_stack(sample_root: Path):
    return open_stack(sample_root / "ndvi", masks=sample_root / "cloud_mask")


@pytest.fixture(scope="module")
def parcels(sample_root: Path) -> gpd.GeoDataFrame:
    return gpd.read_file(sample_root / "parcels.gpkg")


def prediction_layer(parcels: gpd.GeoDataFrame, n: int = 3) -> gpd.GeoDataFrame:
    """Three real parcels written as a prediction layer (the columns `agrivlm infer` writes)."""
    rows = parcels.iloc[:n]
    return gpd.GeoDataFrame(
        {"chip_id": ["r000000_c000000"] * n, "task": ["boundary"] * n, "score": [0.9, 0.8, 0.7][:n],
         "tokens": ["<WIDTH-010><HEIGHT-020>"] * n},
        geometry=rows.geometry.to_numpy(), crs=parcels.crs,
    )


def test_sample_parcels_take_ids_from_the_first_unique_candidate(sample_stack, sample_root: Path) -> None:
    layer = read_map_layer(sample_root / "parcels.gpkg", sample_stack.grid, "true")
    # the sample has no field_id or id column: its unique `index` column (agrivlm.io.FIELD_ID_COLUMNS, the rule
    # infer and eval follow too; RABA_ID is a land-use code shared by many parcels, never an id)
    assert layer.id_source == "index"
    assert len(layer.frame) == 88 and layer.frame["field_id"].is_unique
    assert layer.frame["field_id"].iloc[0] == "37649"
    assert (layer.frame["kind"] == "true").all()


def test_a_layer_whose_id_candidates_all_repeat_takes_row_numbers(sample_stack, parcels, tmp_path: Path) -> None:
    """An ``index`` column with repeats (and no other unique candidate) falls back to row numbers, with notes."""
    layer = parcels.iloc[:5].copy()
    layer["index"] = [1, 1, 2, 2, 3]
    path = tmp_path / "repeats.gpkg"
    layer.drop(columns=[c for c in ("field_id",) if c in layer.columns]).to_file(path, driver="GPKG")
    read = read_map_layer(path, sample_stack.grid, "true")
    assert read.id_source == "row number"
    assert list(read.frame["field_id"]) == ["0", "1", "2", "3", "4"]
    assert any("'index'" in note and "not unique" in note for note in read.notes)


def test_explicit_id_column_must_exist_and_be_unique(sample_stack, sample_root: Path) -> None:
    with pytest.raises(ExploreError, match="RABA_ID.*not a unique id"):
        read_map_layer(sample_root / "parcels.gpkg", sample_stack.grid, "true", id_column="RABA_ID")
    with pytest.raises(ExploreError, match="no column 'crop'.*RABA_ID"):
        read_map_layer(sample_root / "parcels.gpkg", sample_stack.grid, "true", id_column="crop")


def test_prediction_in_another_crs_is_reprojected_to_the_stack(sample_stack, parcels, tmp_path: Path) -> None:
    pred = prediction_layer(parcels)
    path = tmp_path / "pred_wgs84.geojson"
    pred.to_crs(4326).to_file(path, driver="GeoJSON")
    layer = read_map_layer(path, sample_stack.grid, "predicted")
    assert any("reprojected from EPSG:4326" in note for note in layer.notes)
    assert layer.frame.crs.to_epsg() == 32633
    # back on the stack's CRS within centimetres (GeoJSON keeps ~1e-7 degree)
    for got, want in zip(layer.frame.geometry, pred.geometry, strict=True):
        assert got.hausdorff_distance(want) < 0.05
    assert list(layer.frame["field_id"]) == ["r000000_c000000#0", "r000000_c000000#1", "r000000_c000000#2"]


@pytest.mark.filterwarnings("ignore:'crs' was not provided")
def test_layer_without_crs_is_a_clear_error(sample_stack, parcels, tmp_path: Path) -> None:
    path = tmp_path / "nocrs.gpkg"
    prediction_layer(parcels).set_crs(None, allow_override=True).to_file(path)
    with pytest.raises(ExploreError, match=r"nocrs.gpkg: the layer has no CRS.*never guesses"):
        read_map_layer(path, sample_stack.grid, "predicted")


def test_layer_whose_declared_crs_is_wrong_is_caught_by_the_overlap_check(sample_stack, parcels, tmp_path) -> None:
    # UTM coordinates labelled as lon/lat: nothing lands on the stack
    path = tmp_path / "mislabelled.gpkg"
    prediction_layer(parcels).set_crs(4326, allow_override=True).to_file(path)
    with pytest.raises(ExploreError, match="are not degrees.*EPSG:4326.*declared CRS"):
        read_map_layer(path, sample_stack.grid, "predicted")
    # lon/lat labelled as UTM: valid numbers, far from the stack
    path = tmp_path / "mislabelled_utm.gpkg"
    prediction_layer(parcels).to_crs(4326).set_crs(32633, allow_override=True).to_file(path)
    with pytest.raises(ExploreError, match="none of its 3 polygons overlaps the stack.*declared CRS"):
        read_map_layer(path, sample_stack.grid, "predicted")


def test_prediction_layer_needs_its_columns(sample_stack, parcels, tmp_path: Path) -> None:
    path = tmp_path / "parcels_as_pred.gpkg"
    parcels.to_file(path)
    with pytest.raises(ExploreError, match="missing chip_id, task, score, tokens.*--truth"):
        read_map_layer(path, sample_stack.grid, "predicted")


def test_missing_and_unknown_files(sample_stack, tmp_path: Path) -> None:
    with pytest.raises(ExploreError, match="nope.gpkg: no such file"):
        read_map_layer(tmp_path / "nope.gpkg", sample_stack.grid, "true")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ExploreError, match="notes.txt: unknown kind of file for --truth"):
        split_inputs([tmp_path / "notes.txt"], "--truth")
    (tmp_path / "broken.gpkg").write_bytes(b"not a geopackage")
    with pytest.raises(ExploreError, match="broken.gpkg: cannot be read as a field layer"):
        read_map_layer(tmp_path / "broken.gpkg", sample_stack.grid, "true")


def test_outside_polygons_and_non_polygons_are_noted(sample_stack, parcels, tmp_path: Path) -> None:
    x0, y0, x1, y1 = sample_stack.grid.bounds
    frame = gpd.GeoDataFrame(
        {"field_id": ["in", "out", "pt"]},
        geometry=[box(x0 + 50, y0 + 50, x0 + 150, y0 + 150), box(x1 + 500, y1 + 500, x1 + 600, y1 + 600),
                  box(x0, y0, x0 + 10, y0 + 10).centroid],
        crs=32633,
    )
    path = tmp_path / "truth.gpkg"
    frame.to_file(path)
    layer = read_map_layer(path, sample_stack.grid, "true")
    assert list(layer.frame["field_id"]) == ["in", "out"]
    assert "1 row(s) that are not polygons left out" in layer.notes
    assert "1 of 2 polygon(s) lie outside the stack" in layer.notes


def test_stage_table_is_parsed_and_checked(tmp_path: Path) -> None:
    good = tmp_path / "stages.csv"
    good.write_text("field_id,date,stage,score\n37649,2016-05-16,Green-up,0.8\n37649,2016-07-25T00:00:00,peak,0.9\n")
    table = read_map_stages(good)
    assert list(table["stage"]) == ["green-up", "peak"]
    assert list(table["date"]) == [pd.Timestamp("2016-05-16"), pd.Timestamp("2016-07-25")]
    assert table["field_id"].tolist() == ["37649", "37649"] and "score" in table.columns

    bad_stage = tmp_path / "bad_stage.csv"
    bad_stage.write_text("field_id,date,stage\n1,2016-05-16,peak\n1,2016-06-01,flowering\n")
    with pytest.raises(ExploreError, match=r"bad_stage.csv: line 3: stage 'flowering' is not one of dormant"):
        read_map_stages(bad_stage)
    bad_date = tmp_path / "bad_date.csv"
    bad_date.write_text("field_id,date,stage\n1,16/05/2016,peak\n")
    with pytest.raises(ExploreError, match=r"line 2: date '16/05/2016' is not an ISO date"):
        read_map_stages(bad_date)
    no_cols = tmp_path / "no_cols.csv"
    no_cols.write_text("id,when\n1,2016-05-16\n")
    with pytest.raises(ExploreError, match="missing field_id, date, stage"):
        read_map_stages(no_cols)
