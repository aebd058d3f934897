"""agrivlm.io: one rule for field ids, one reader for layers and tables (the errors name the file)."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import pandas as pd
import pytest
from shapely.geometry import box

from agrivlm.errors import EvalError
from agrivlm.io import FIELD_ID_COLUMNS, field_ids, read_table, read_vector, require_crs, write_json


def layer(**columns: list[object]) -> gpd.GeoDataFrame:
    n = len(next(iter(columns.values())))
    return gpd.GeoDataFrame(columns, geometry=[box(i, 0, i + 1, 1) for i in range(n)], crs=32633)


def test_field_ids_take_the_first_unique_candidate_else_row_numbers() -> None:
    assert FIELD_ID_COLUMNS == ("field_id", "id", "index")
    ids, col, notes = field_ids(layer(id=["a", "a", "b"], index=[7, 8, 9]), "f.gpkg", None, EvalError, "--truth-id")
    assert (list(ids), col) == (["7", "8", "9"], "index") and notes == [
        "column 'id' is not unique, so it is not used as the field id"]
    ids, col, _ = field_ids(layer(field_id=[3, 1, 2], id=["x", "y", "z"]), "f.gpkg", None, EvalError, "--x")
    assert (list(ids), col) == (["3", "1", "2"], "field_id")
    ids, col, notes = field_ids(layer(crop=["w", "w", "m"]), "f.gpkg", None, EvalError, "--x")
    assert (list(ids), col, notes) == (["0", "1", "2"], "row number", [])
    ids, col, notes = field_ids(layer(id=[None, "b", "c"]), "f.gpkg", None, EvalError, "--x")  # an empty id
    assert col == "row number" and len(notes) == 1


def test_a_named_id_column_must_exist_and_be_unique() -> None:
    frame = layer(code=["a", "a"], name=["x", "y"])
    assert list(field_ids(frame, "f.gpkg", "name", EvalError, "--truth-id")[0]) == ["x", "y"]
    with pytest.raises(EvalError, match=r"f\.gpkg: no column 'nope' for field ids \(--truth-id\); columns are code"):
        field_ids(frame, "f.gpkg", "nope", EvalError, "--truth-id")
    with pytest.raises(EvalError, match=r"f\.gpkg: column 'code' is not a unique id.*--truth-id"):
        field_ids(frame, "f.gpkg", "code", EvalError, "--truth-id")


def test_readers_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(EvalError, match=r"nope\.gpkg: no such truth layer file; hint"):
        read_vector(tmp_path / "nope.gpkg", "truth layer", EvalError, hint="; hint")
    (tmp_path / "broken.gpkg").write_text("not a GeoPackage")
    with pytest.raises(EvalError, match=r"broken\.gpkg: cannot be read as a truth layer \("):
        read_vector(tmp_path / "broken.gpkg", "truth layer", EvalError)
    frame = layer(field_id=[1, 2]).set_crs(None, allow_override=True)
    with pytest.raises(EvalError, match=r"x\.gpkg: the truth layer has no CRS.*never guesses"):
        require_crs(frame, "x.gpkg", "truth layer", EvalError)
    pd.DataFrame({"field_id": ["1"], "stage": [""]}).to_csv(tmp_path / "t.csv", index=False)
    table = read_table(tmp_path / "t.csv", "stage", EvalError)
    assert table.to_dict("records") == [{"field_id": "1", "stage": ""}]  # strings, empty cells kept as ""


def test_write_json_replaces_the_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "s.json"
    write_json(target, {"b": 1, "a": float("nan")}, sort_keys=True, trailing_newline=False)
    assert target.read_text() == '{\n  "a": NaN,\n  "b": 1\n}'
    with pytest.raises(ValueError):
        write_json(target, {"a": float("nan")}, strict=True)
    assert target.read_text() == '{\n  "a": NaN,\n  "b": 1\n}'  # a failed write leaves the old file
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]  # and no temporary
