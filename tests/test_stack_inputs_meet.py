"""Inputs that do not meet are said, never a quiet zero: dates without their mask, a date off the grid."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from affine import Affine
from rasters import UTM33, write_dated_stack, write_raster
from typer.testing import CliRunner

from agrivlm.cli import app
from agrivlm.errors import IngestError
from agrivlm.geo import open_stack


def test_masks_for_some_dates_are_named_in_a_warning_and_the_summary(tmp_path: Path, caplog) -> None:
    data = write_dated_stack(tmp_path / "data", n_dates=6, bands=1)
    for path in data[:2]:  # masks for 2 of the 6 dates
        write_raster(tmp_path / "masks" / path.name, np.zeros((1, 40, 48), np.uint8), nodata=255)
    with caplog.at_level(logging.WARNING, logger="agrivlm"):
        stack = open_stack(tmp_path / "data", masks=tmp_path / "masks")
    assert "masks cover 2 of 6 dates; 4 date(s) are used without a mask (first: 2021-03-21" in caplog.text
    assert stack.summary()["unmasked_dates"] == ["2021-03-21", "2021-03-31", "2021-04-10", "2021-04-20"]
    res = CliRunner().invoke(app, ["ingest", str(tmp_path / "data"), "--masks", str(tmp_path / "masks"),
                                   "--out", str(tmp_path / "ing"), "--chip-size", "16"])
    assert res.exit_code == 0, res.output
    assert len(json.loads((tmp_path / "ing" / "summary.json").read_text())["unmasked_dates"]) == 4
    # every date masked: no warning, an empty list
    caplog.clear()
    for path in data[2:]:
        write_raster(tmp_path / "masks" / path.name, np.zeros((1, 40, 48), np.uint8), nodata=255)
    with caplog.at_level(logging.WARNING, logger="agrivlm"):
        full = open_stack(tmp_path / "data", masks=tmp_path / "masks")
    assert "masks cover" not in caplog.text and full.summary()["unmasked_dates"] == []
    assert open_stack(tmp_path / "data").summary()["unmasked_dates"] == []


def test_a_date_off_the_grid_is_refused_naming_the_file(tmp_path: Path) -> None:
    write_dated_stack(tmp_path / "data", n_dates=3, bands=1)
    far = Affine(10.0, 0.0, 465000.0 + 1_000_000.0, 0.0, -10.0, 5080000.0)  # 1000 km east, same CRS
    bad = write_raster(tmp_path / "data" / f"S2_{datetime(2021, 5, 1):%Y%m%d}.tif",
                       np.ones((1, 40, 48), np.float32), transform=far, crs=UTM33)
    with pytest.raises(IngestError, match="does not meet the stack's grid") as err:
        open_stack(tmp_path / "data")
    assert str(bad) in str(err.value)
    res = subprocess.run([sys.executable, "-m", "agrivlm.cli", "ingest", str(tmp_path / "data"), "--out",
                          str(tmp_path / "ing")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and str(bad) in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "ing" / "summary.json").exists()
    # a file that overlaps the grid partly is warped, not refused
    near = Affine(10.0, 0.0, 465000.0 + 200.0, 0.0, -10.0, 5080000.0)
    write_raster(bad, np.ones((1, 40, 48), np.float32), transform=near, crs=UTM33)
    assert open_stack(tmp_path / "data").warped_files == [bad]
