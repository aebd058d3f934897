from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.windows import Window
from rasters import ROTATED_TRANSFORM, smooth_field, write_dated_stack, write_raster

from agrivlm.errors import IngestError
from agrivlm.geo import ChipStream, chip_windows, open_stack


def test_chip_windows_snap_and_drop() -> None:
    snap = chip_windows(101, 100, 64, 32)
    assert [(w.row_off, w.col_off) for w in snap] == [
        (r, c) for r in (0, 32, 37) for c in (0, 32, 36)]
    assert all(w.width == 64 and w.height == 64 for w in snap)
    drop = chip_windows(101, 100, 64, 32, edge="drop")
    assert [(w.row_off, w.col_off) for w in drop] == [(0, 0), (0, 32), (32, 0), (32, 32)]
    assert len(chip_windows(100, 100, 50)) == 4  # stride defaults to the chip size
    assert chip_windows(40, 60, (20, 30), (20, 15))[1] == Window(15, 0, 30, 20)
    with pytest.raises(IngestError, match=r"chip size 128x128 px is larger than the raster \(101x100 px\)"):
        chip_windows(101, 100, 128)


def test_sample_chips_carry_their_own_transform_and_exact_pixels(sample_root: Path) -> None:
    stack = open_stack(sample_root / "ndvi", masks=sample_root / "cloud_mask")
    stream = ChipStream(stack, chip_size=48, stride=26)
    chips = list(stream)
    assert stream.kept == len(chips) == 12 and stream.skipped == 0  # rows 0, 26, 52, 53 (snapped); cols 0, 26, 52
    src = sorted((sample_root / "ndvi").glob("*.tif"))
    for chip in chips:
        w = chip.window
        assert chip.data.shape == (68, 1, 48, 48) and chip.mask.shape == (68, 48, 48)
        # each chip's transform is the source geotransform shifted by its window
        assert chip.grid.transform == stack.transform @ Affine.translation(w.col_off, w.row_off)
        assert chip.grid.crs == stack.crs
        assert len(chip.times) == 68 and chip.times[0] == stack.times[0]
    chip = chips[4]
    with rasterio.open(src[10]) as ds:
        np.testing.assert_array_equal(chip.data[10, 0], ds.read(1, window=chip.window))
        # the chip's pixel (0, 0) centre lies at the source's pixel (row_off, col_off) centre
        x, y = chip.grid.pixel_to_crs(0.5, 0.5)
        assert ds.index(x, y) == (int(chip.window.row_off), int(chip.window.col_off))


def test_all_nodata_chips_are_skipped_and_counted(tmp_path: Path) -> None:
    for k, day in enumerate(["20200101", "20200111"]):
        data = smooth_field(40, 40, seed=k)
        data[:, 20:, 20:] = -9999.0  # the bottom-right quarter never has data
        write_raster(tmp_path / f"s_{day}.tif", data)
    stream = ChipStream(open_stack(tmp_path), chip_size=20)
    ids = [c.chip_id for c in stream]
    assert ids == ["r000000_c000000", "r000000_c000020", "r000020_c000000"]
    assert stream.kept == 3 and stream.skipped == 1 and stream.skipped_ids == ["r000020_c000020"]


def test_rotated_stack_chips(tmp_path: Path) -> None:
    write_dated_stack(tmp_path, n_dates=3, height=32, width=32, bands=1, transform=ROTATED_TRANSFORM)
    stack = open_stack(tmp_path)
    assert stack.warped_files == []
    chips = list(ChipStream(stack, chip_size=16))
    assert len(chips) == 4
    corner = chips[3].grid.norm_to_crs(0, 0)
    assert np.allclose(corner, ROTATED_TRANSFORM * (16, 16), atol=1e-9)
    assert chips[3].grid.footprint().area == pytest.approx(160 * 160)


def test_native_chips_keep_the_files_values_and_convert_to_the_float_chips(tmp_path: Path) -> None:
    """``ChipStream(native=True)``: uint16 chips equal to the files, the same masks, ``as_float`` = the float stream."""
    rng = np.random.default_rng(3)
    for k, day in enumerate(["20200101", "20200111", "20200121"]):
        data = rng.integers(1, 10_000, size=(2, 40, 36), dtype=np.uint16)
        data[:, 5 + k:9 + k, 3:7] = 0  # nodata 0: a few holes, a different place each date
        write_raster(tmp_path / "s2" / f"s_{day}.tif", data, nodata=0, tiled=True, compress=None)
    stack = open_stack(tmp_path / "s2")
    native = list(ChipStream(stack, chip_size=16, stride=10, native=True, workers=2))
    floats = list(ChipStream(stack, chip_size=16, stride=10, workers=2))
    assert len(native) == len(floats) == 12
    files = sorted((tmp_path / "s2").glob("*.tif"))
    for n, f in zip(native, floats, strict=True):
        assert n.chip_id == f.chip_id and n.data.dtype == np.uint16 and f.data.dtype == np.float32
        with rasterio.open(files[1]) as ds:
            np.testing.assert_array_equal(n.data[1], ds.read(window=n.window))  # nodata pixels keep their 0
        np.testing.assert_array_equal(n.nodata, f.nodata)
        np.testing.assert_array_equal(n.mask, f.mask)
        np.testing.assert_array_equal(n.as_float().data, f.data)  # NaN in the same places
    assert native[0].nodata.any() and native[0].as_float() is not native[0] and floats[0].as_float() is floats[0]
    # a date in another data type: no one array for the window, so the chips stay float32
    write_raster(tmp_path / "s2" / "s_20200131.tif", rng.random((2, 40, 36)).astype(np.float32), nodata=None)
    mixed = next(iter(ChipStream(open_stack(tmp_path / "s2"), chip_size=16, native=True)))
    assert mixed.data.dtype == np.float32
