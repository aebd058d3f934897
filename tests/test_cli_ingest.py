from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import pytest
from rasters import smooth_field, truncate, write_dated_stack, write_raster

from agrivlm.geo.index import read_chip_index, row_dates, row_grid, row_window


def agrivlm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agrivlm.cli", *args], capture_output=True, text=True, timeout=300)


def test_ingest_sample_writes_index_and_summary(tmp_path: Path, sample_root: Path) -> None:
    out = tmp_path / "out"
    res = agrivlm("ingest", str(sample_root / "ndvi"), "--masks", str(sample_root / "cloud_mask"),
                  "--out", str(out), "--chip-size", "48", "--stride", "26", "--no-progress")
    assert res.returncode == 0, res.stderr
    assert "68: 2015-07-11 → 2017-12-22" in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_dates"] == 68 and summary["chips_kept"] == 12 and summary["chips_skipped_nodata"] == 0
    index = read_chip_index(out / "chips.gpkg")
    assert len(index) == 12 and index.crs.to_epsg() == 32633
    row = index.iloc[4]
    grid = row_grid(row, index.crs)
    assert row_window(row).col_off == 26
    assert index.geometry.iloc[4].equals_exact(grid.footprint(), 1e-6)
    assert len(row_dates(row)) == 68 and json.loads(row["files"])[0] == "S2_NDVI_20150711T100008.tif"
    assert 0.0 < row["clear_fraction"] < 1.0 and row["valid_fraction"] == 1.0
    # refuses to overwrite without --overwrite
    again = agrivlm("ingest", str(sample_root / "ndvi"), "--out", str(out), "--no-progress")
    assert again.returncode != 0 and "already exists; pass --overwrite" in again.stderr


def test_ingest_geoparquet(tmp_path: Path) -> None:
    write_dated_stack(tmp_path / "s", n_dates=3, height=32, width=32)
    res = agrivlm("ingest", str(tmp_path / "s" / "*.tif"), "--out", str(tmp_path / "o"), "--chip-size", "16",
                  "--format", "parquet", "--no-progress")
    assert res.returncode == 0, res.stderr
    frame = gpd.read_parquet(tmp_path / "o" / "chips.parquet")
    assert len(frame) == 4 and list(frame.n_dates) == [3] * 4


def test_damaged_file_fails_before_anything_is_written(tmp_path: Path) -> None:
    stack_dir = tmp_path / "s"
    write_dated_stack(stack_dir, n_dates=3, height=64, width=64, bands=1)
    out = tmp_path / "o"
    assert agrivlm("ingest", str(stack_dir), "--out", str(out), "--chip-size", "32", "--no-progress").returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    bad = write_raster(stack_dir / "S2_20210501.tif", smooth_field(64, 64, seed=9) * 0
                       + __import__("numpy").random.default_rng(0).random((1, 64, 64), dtype="float32"),
                       tiled=True, blocksize=16)
    truncate(bad, 0.5)
    res = agrivlm("ingest", str(stack_dir), "--out", str(out), "--chip-size", "32", "--overwrite", "--no-progress")
    assert res.returncode != 0
    assert "S2_20210501.tif: damaged block" in res.stderr and "Traceback" not in res.stderr
    # the earlier outputs are untouched, and no temporary file is left behind
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("empty", "holds no GeoTIFF"),
        ("nodate", "tile.tif: no acquisition date"),
        ("bigchip", "chip size 256x256 px is larger than the raster"),
    ],
)
def test_bad_input_messages(tmp_path: Path, setup: str, message: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    if setup == "nodate":
        write_raster(src / "tile.tif", smooth_field(8, 8))
    if setup == "bigchip":
        write_dated_stack(src, n_dates=2)
    res = agrivlm("ingest", str(src), "--out", str(tmp_path / "o"), "--chip-size", "256", "--no-progress")
    assert res.returncode == 1
    assert message in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_version_and_short_help_on_every_level() -> None:
    from agrivlm import __version__

    res = agrivlm("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"agrivlm {__version__}"
    for args in (["-h"], ["infer", "-h"], ["train", "default", "-h"], ["eval", "-h"]):
        res = agrivlm(*args)
        assert res.returncode == 0 and "Usage: " in res.stdout, (args, res.stderr[-500:])
