"""`agrivlm infer --out` in every format: GeoPackage, GeoParquet 1.1, FlatGeobuf and RFC 7946 GeoJSON.

The tiny checkpoint trained on the sample (``infer_model.trained_checkpoint``) runs over a real GeoTIFF stack
written by ``rasters.write_dated_stack``, once per format; each file is opened again with geopandas/pyogrio and
must hold the same features with typed columns, in the stack's CRS (EPSG:4326 lon/lat for GeoJSON).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pyogrio
import pytest
import shapely
from rasters import UTM33, UTM_TRANSFORM, write_dated_stack
from typer.testing import CliRunner

from agrivlm.cli import app
from agrivlm.infer.batch import run_inference
from agrivlm.infer.errors import InferError
from agrivlm.infer.outputs import BOX_COLUMNS, GROWTH_COLUMNS, write_layer
from agrivlm.schema import GROWTH_STAGES, PREDICTION_FORMATS

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: The stack: 4 dates of one band, 64 × 64 px (10 m) in UTM 33N: 4 chips of the checkpoint's 32-px grid.
SIZE = 64
FORMATS = (".gpkg", ".parquet", ".fgb", ".geojson")


class Records(logging.Handler):
    """A log handler that keeps the records it is given."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def footprint_lonlat() -> shapely.Geometry:
    """The stack's footprint in EPSG:4326 (lon/lat), a little grown."""
    x0, y0 = UTM_TRANSFORM.c, UTM_TRANSFORM.f
    box = shapely.box(x0, y0 - 10 * SIZE, x0 + 10 * SIZE, y0)
    return gpd.GeoSeries([box], crs=UTM33.to_wkt()).to_crs(4326).iloc[0].buffer(1e-6)


def read(path: Path, layer: str | None = None) -> gpd.GeoDataFrame:
    """A prediction layer, as a GIS user would open it (GDAL here has no Parquet driver: geopandas reads it)."""
    if path.suffix == ".parquet":
        return gpd.read_parquet(path)
    return gpd.read_file(path, layer=layer) if layer else gpd.read_file(path)


def infer(*args: str | Path) -> object:
    result = runner.invoke(app, ["infer", *map(str, args), "--device", "cpu", "--no-progress", "--threads", "1"])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("stack") / "ndvi"
    write_dated_stack(folder, n_dates=4, height=SIZE, width=SIZE, bands=1)
    return folder


@pytest.fixture(scope="module")
def fields_runs(infer_ckpt: Path, stack: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``agrivlm infer --task fields`` over the stack, once per format (independent runs, each with its journal)."""
    folder = tmp_path_factory.mktemp("fields")
    outs = {}
    for suffix in FORMATS:
        out = folder / f"pred{suffix}"
        handler = Records()
        logger = logging.getLogger("agrivlm.infer.outputs")
        logger.addHandler(handler)
        try:
            res = infer(stack, "--model", infer_ckpt, "--out", out, "--stride", "32")
        finally:
            logger.removeHandler(handler)
        assert res.exit_code == 0, res.output
        report = json.loads((folder / "pred_report.json").read_text())
        assert report["chips_processed"] == 4 and report["outputs"]["layer"] == str(out)
        warnings = [r.getMessage() for r in handler.records if r.levelno == logging.WARNING]
        if suffix == ".geojson":
            assert len(warnings) == 1 and "reprojected from the stack's CRS EPSG:32633" in warnings[0], warnings
        else:
            assert not warnings, warnings
        outs[suffix] = out
    return outs


def test_every_format_holds_the_same_features_in_the_right_crs(fields_runs: dict[str, Path]) -> None:
    frames = {suffix: read(path).sort_values("field_id").reset_index(drop=True) for suffix, path in fields_runs.items()}
    reference = frames[".gpkg"]
    assert len(reference) >= 2 and reference["field_id"].is_unique
    for suffix, frame in frames.items():
        assert len(frame) == len(reference), suffix
        assert list(frame["field_id"]) == list(reference["field_id"]), suffix
        if suffix == ".geojson":
            assert frame.crs.to_epsg() == 4326
            assert frame.geometry.within(footprint_lonlat()).all()  # lon/lat, not metres
            back = frame.to_crs(UTM33.to_wkt())
            distance = shapely.hausdorff_distance(back.geometry.to_numpy(), reference.geometry.to_numpy())
            assert distance.max() < 0.05, distance  # RFC 7946's 7 decimals of a degree: about 1 cm
        else:
            assert frame.crs.to_epsg() == 32633, suffix
            assert frame.geometry.geom_equals_exact(reference.geometry, tolerance=1e-6).all(), suffix
        for column in ("score", *BOX_COLUMNS):
            assert frame[column].dtype == np.float64, (suffix, column)
            np.testing.assert_allclose(frame[column], reference[column], rtol=1e-12)
        assert frame["cut"].dtype == bool, suffix
        assert list(frame["label"].astype(str)) == list(reference["label"].astype(str))
        assert (frame[list(BOX_COLUMNS)].to_numpy() >= 0).all() and (frame[list(BOX_COLUMNS)].to_numpy() <= 1).all()
    assert (reference["box_u1"] < reference["box_u2"]).all() and (reference["box_v1"] < reference["box_v2"]).all()
    assert "box" not in reference.columns  # the box is four float columns, not a JSON text


def test_geoparquet_is_version_1_1_with_crs_and_a_bbox_covering(fields_runs: dict[str, Path]) -> None:
    path = fields_runs[".parquet"]
    schema = pq.read_schema(path)
    geo = json.loads(schema.metadata[b"geo"])
    column = geo["columns"][geo["primary_column"]]
    assert geo["version"].startswith("1.1.") and column["encoding"] == "WKB"
    assert column["crs"]["id"] == {"authority": "EPSG", "code": 32633}
    assert column["covering"]["bbox"]["xmin"] == ["bbox", "xmin"] and "bbox" in schema.names
    frame = gpd.read_parquet(path)
    # the bbox covering column holds each feature's bounds
    bbox = pq.read_table(path, columns=["bbox"]).column("bbox").to_pylist()
    np.testing.assert_allclose([[b["xmin"], b["ymin"], b["xmax"], b["ymax"]] for b in bbox],
                               frame.geometry.bounds.to_numpy(), atol=1.0)  # float32 bounds, rounded outwards
    for column_name in ("task", "label", "shape"):  # categories stay categories in Parquet
        assert isinstance(frame[column_name].dtype, pd.CategoricalDtype), column_name
    assert set(frame["task"]) == {"fields"} and set(frame["shape"]) <= {"box", "polygon"}


def test_flatgeobuf_and_geojson_open_with_pyogrio(fields_runs: dict[str, Path]) -> None:
    info = pyogrio.read_info(fields_runs[".fgb"])
    assert info["crs"] == "EPSG:32633" and info["features"] == len(read(fields_runs[".gpkg"]))
    types = dict(zip(info["fields"], info["dtypes"], strict=True))
    assert types["score"] == "float64" and types["cut"] == "bool" and types["box_u1"] == "float64"
    doc = json.loads(fields_runs[".geojson"].read_text())
    assert "crs" not in doc and doc["type"] == "FeatureCollection"  # RFC 7946: no legacy crs member
    geoms = [shapely.geometry.shape(f["geometry"]) for f in doc["features"]]
    assert geoms and all(g.within(footprint_lonlat()) for g in geoms)
    assert all(isinstance(f["properties"]["score"], float) and isinstance(f["properties"]["cut"], bool)
               for f in doc["features"])


def test_eval_and_the_explorer_read_every_format_alike(fields_runs: dict[str, Path], stack: Path,
                                                       tmp_path: Path) -> None:
    from agrivlm.eval.boundaries import evaluate_fields
    from agrivlm.explore.inputs import read_map_layer
    from agrivlm.explore.page import field_labels
    from agrivlm.geo import open_stack

    # a truth of two fields in the stack's CRS: the halves of the west column of chips
    x0, y0 = UTM_TRANSFORM.c, UTM_TRANSFORM.f
    halves = [shapely.box(x0, y0 - 320, x0 + 320, y0), shapely.box(x0, y0 - 640, x0 + 320, y0 - 320)]
    truth = gpd.GeoDataFrame({"field_id": ["a", "b"]}, geometry=halves, crs=UTM33.to_wkt())
    grid = open_stack(stack).grid
    scores = {}
    for suffix, path in fields_runs.items():
        result = evaluate_fields(path, truth, iou_threshold=0.1).to_dict()
        scores[suffix] = {k: result[k] for k in ("n_pred", "n_truth", "precision", "recall", "mean_iou")}
        layer = read_map_layer(path, grid, "predicted")
        assert len(layer.frame) == scores[suffix]["n_pred"], suffix
        labels = field_labels(layer.frame)  # a category column (GeoParquet) reads like a text one
        assert set(labels) <= {"grassland", "cultivated land", ""}, (suffix, set(labels))
    assert scores[".gpkg"]["n_pred"] >= 2 and scores[".gpkg"]["recall"] > 0 and scores[".gpkg"]["mean_iou"] > 0.1
    for suffix, got in scores.items():
        for key, value in scores[".gpkg"].items():
            assert got[key] == pytest.approx(value, rel=1e-4, nan_ok=True), (suffix, key)


def test_growth_layer_has_dates_and_stages_as_typed_columns(infer_ckpt: Path, sample_root: Path,
                                                            tmp_path: Path) -> None:
    from infer_model import training_set

    questions, _, _, _ = training_set()
    asked = {q.meta["field_id"] for q in questions if q.meta}
    layer = gpd.read_file(sample_root / "parcels.gpkg")
    fields = tmp_path / "fields.gpkg"
    layer[layer["index"].astype(str).isin(asked)].to_file(fields)
    frames = {}
    for suffix in (".parquet", ".fgb"):
        out = tmp_path / f"growth{suffix}"
        res = infer(sample_root / "ndvi", "--masks", sample_root / "cloud_mask", "--model", infer_ckpt, "--out", out,
                    "--task", "growth", "--fields", fields, "--field-id", "index", "--field-class", "LULC_NAME",
                    "--batch-size", "16")
        assert res.exit_code == 0, res.output
        frames[suffix] = read(out).sort_values("field_id").reset_index(drop=True)
    table = pd.read_csv(tmp_path / "growth_stages.csv", dtype=str)
    parquet, fgb = frames[".parquet"], frames[".fgb"]
    assert len(parquet) == len(fgb) == table["field_id"].nunique() >= 1
    assert list(parquet.columns) == [*GROWTH_COLUMNS, "geometry"]
    for frame in (parquet, fgb):
        assert frame["first_date"].dtype.kind == "M" and frame["last_date"].dtype.kind == "M"
        assert frame["score"].dtype == np.float64 and frame["n_dates"].dtype == np.int64
        assert frame.crs.to_epsg() == 32633 and (frame["first_date"] <= frame["last_date"]).all()
    assert parquet["last_stage"].dtype == pd.CategoricalDtype(list(GROWTH_STAGES), ordered=True)
    assert list(fgb["last_stage"]) == list(parquet["last_stage"].astype(str))
    # the typed columns agree with the stage table and with the JSON column that keeps every date
    for _, row in parquet.iterrows():
        rows = table[table["field_id"] == row["field_id"]].sort_values("date")
        stages = json.loads(row["stages"])
        assert list(stages) == list(rows["date"]) and row["n_dates"] == len(rows)
        assert row["first_date"] == pd.Timestamp(rows["date"].iloc[0])
        assert row["last_date"] == pd.Timestamp(rows["date"].iloc[-1])
        assert row["last_stage"] == rows["stage"].iloc[-1] == stages[rows["date"].iloc[-1]]


def test_an_unknown_suffix_is_a_usage_error_naming_the_formats(tmp_path: Path) -> None:
    res = runner.invoke(app, ["infer", str(tmp_path), "--model", str(tmp_path), "--out", str(tmp_path / "x.shp")])
    assert res.exit_code == 2
    text = " ".join(re.sub("[│╭╮╰╯─]", " ", res.output).split())  # the words of rich's error panel
    assert "unknown output format '.shp'" in text and all(s in text for s in PREDICTION_FORMATS)
    with pytest.raises(InferError, match=r"x\.csv: unknown output format '\.csv'; use one of \.gpkg .*\.fgb"):
        run_inference([str(tmp_path)], tmp_path, tmp_path / "x.csv")
    with pytest.raises(InferError, match="unknown output format"):
        write_layer(gpd.GeoDataFrame(geometry=[]), tmp_path / "x.kml", "fields")
    assert not list(tmp_path.iterdir())  # nothing written, not even a journal


def test_an_empty_layer_is_written_in_every_format_with_its_crs(tmp_path: Path) -> None:
    from agrivlm.infer.outputs import DETECTION_COLUMNS, _empty

    for suffix in FORMATS:
        out = tmp_path / f"empty{suffix}"
        write_layer(_empty(DETECTION_COLUMNS, UTM33), out, "fields")
        frame = read(out)
        assert len(frame) == 0 and frame.crs.to_epsg() == (4326 if suffix == ".geojson" else 32633), suffix
        if suffix != ".geojson":  # GeoJSON has no schema without features
            assert frame["score"].dtype == np.float64 and frame["cut"].dtype == bool, suffix
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"empty{s}" for s in FORMATS)  # no temporaries left
