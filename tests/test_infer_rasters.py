"""``agrivlm infer --raster``: COGs on the stack's grid that hold what the vector outputs say, pixel for pixel."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import pandas as pd
import rasterio
from rasterio.features import geometry_mask
from typer.testing import CliRunner

from agrivlm.cli import app
from agrivlm.default_checkpoint import default_model_path
from agrivlm.geo import open_stack
from agrivlm.infer.batch import run_inference
from agrivlm.infer.rasters import STAGE_CODES
from agrivlm.sample import SAMPLE_ROOT
from agrivlm.synth import SceneSpec, write_scene


def _is_cog(path: Path) -> None:
    with rasterio.open(path) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG", ds.tags(ns="IMAGE_STRUCTURE")
        assert ds.profile["tiled"] and ds.profile["compress"].lower() == "deflate"


def _pixel(ds: rasterio.io.DatasetReader, geom) -> tuple[int, int]:
    p = geom.representative_point()
    return ds.index(p.x, p.y)


def test_field_extent_and_stage_maps(tmp_path: Path) -> None:
    # the fields on a held-out synthetic scene (a seed no training used): on the embedded sample the shipped model
    # answers "no field" at every point, as the sample's labels teach it (README, "Where it stands")
    scene = tmp_path / "scene"
    write_scene(scene, SceneSpec(region="pannonian", area_km2=0.25, seed=9100, start="2021-01-01", end="2021-12-31"))
    stack = open_stack(scene / "stack")
    runner = CliRunner()
    out = tmp_path / "fields.gpkg"
    # 2 × 2 chips of 32 px, 2 × 2 point prompts each: small, and still fields found
    run_inference([str(scene / "stack")], default_model_path(), out, task="fields", progress=False,
                  masks=[str(scene / "cloud_mask")], overrides={"stride": 32, "point_grid": 2}, raster=True)
    path = tmp_path / "fields_extent.tif"
    _is_cog(path)
    found = gpd.read_file(out)
    with rasterio.open(path) as ds:
        assert ds.crs == stack.crs and ds.transform == stack.transform
        assert ds.shape == (stack.grid.height, stack.grid.width)
        assert ds.descriptions == ("field_score",)
        band = ds.read(1)
        for geom, score in zip(found.geometry, found["score"], strict=True):
            r, c = _pixel(ds, geom)
            assert band[r, c] >= score - 1e-6  # the best score of a field covering the pixel
    assert (band > 0).any() and (band == 0).any() and band.max() <= 1.0
    assert json.loads((tmp_path / "fields_report.json").read_text())["outputs"]["raster"] == str(path)

    parcels = gpd.read_file(SAMPLE_ROOT / "parcels.gpkg")
    parcels.iloc[:6].to_file(tmp_path / "asked.gpkg")
    gout = tmp_path / "growth.gpkg"
    res = runner.invoke(app, ["infer", str(SAMPLE_ROOT / "ndvi"), "--masks", str(SAMPLE_ROOT / "cloud_mask"),
                              "--model", str(default_model_path()), "--out", str(gout), "--task", "growth",
                              "--fields", str(tmp_path / "asked.gpkg"), "--field-id", "index", "--field-class",
                              "LULC_NAME", "--stride", "64", "--raster", "--no-progress"])
    assert res.exit_code == 0, res.output
    path = tmp_path / "growth_stages.tif"
    _is_cog(path)
    table = pd.read_csv(tmp_path / "growth_stages.csv", dtype=str)
    geoms = gpd.read_file(gout).set_index("field_id").geometry
    with rasterio.open(path) as ds:
        dates = sorted(table["date"].unique())
        assert list(ds.descriptions) == dates and ds.count == len(dates) and ds.dtypes[0] == "uint8"
        assert json.loads(ds.tags()["stage_codes"]) == {str(v): k for k, v in STAGE_CODES.items()}
        inside = {fid: geometry_mask([g], out_shape=ds.shape, transform=ds.transform, invert=True)
                  for fid, g in geoms.items()}  # pixel centres in the field (the parcels do not overlap)
        checked = 0
        for row in table.itertuples():
            if not inside[row.field_id].any():
                continue  # a sliver that holds no pixel centre
            values = ds.read(dates.index(row.date) + 1)[inside[row.field_id]]
            assert (values == STAGE_CODES[row.stage]).all(), (row.field_id, row.date, row.stage, set(values))
            checked += 1
        assert checked >= len(table) // 2 > 0
        assert (ds.read(1) == 0).any()  # outside the asked fields


def test_raster_is_refused_for_free_questions(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["infer", str(SAMPLE_ROOT / "ndvi"), "--model", str(default_model_path()),
                                   "--out", str(tmp_path / "a.gpkg"), "--task", "ask", "--question", "What?",
                                   "--raster"])
    assert res.exit_code != 0 and "--raster" in str(res.exception or res.output)
