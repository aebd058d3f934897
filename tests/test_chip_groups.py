"""The fast chip stream: block-aligned groups, native-dtype group reads, reader threads.

Every stream result is checked against an independent reading (rasterio, window by window).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import rasterio
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.crs import CRS
from rasterio.warp import calculate_default_transform
from rasterio.windows import Window
from rasters import UTM33, UTM_TRANSFORM, smooth_field, write_raster

from agrivlm.geo import ChipStream, chip_windows, open_stack
from agrivlm.geo.chips import block_runs, chip_groups
from agrivlm.geo.stack import WindowRead, may_be_missing, missing_values


def _uint16_stack(
    folder: Path, n_dates: int = 4, size: int = 70, tiled: bool = True, block: int = 16, masks: Path | None = None
) -> list[Path]:
    """uint16 S2-like dates with nodata 0 in a corner that grows with time; cloud masks for dates ≥ 1."""
    paths = []
    for k in range(n_dates):
        data = (smooth_field(size, size, bands=3, seed=5, t=0.4 * k) * 4000).astype(np.uint16)
        data[:, : 6 * k, : 9 * k] = 0
        data[1, 40:45, 40:45] = 0  # one band only: still data
        paths.append(write_raster(folder / f"S2_2021{k + 3:02d}01.tif", data, nodata=0, tiled=tiled, blocksize=block))
        if masks is not None and k >= 1:
            clouds = np.zeros((1, size, size), dtype=np.uint8)
            clouds[0, 3 * k : 30, 5:50] = 1 + k  # overlaps the nodata corner: masked only where there is data
            write_raster(masks / f"CLM_2021{k + 3:02d}01.tif", clouds, nodata=None, tiled=tiled, blocksize=block)
    return paths


def _by_id(stream: ChipStream) -> dict[str, object]:
    return {c.chip_id: c for c in stream}


@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(8, 300), width=st.integers(8, 300), chip=st.integers(4, 64), stride_frac=st.floats(0.3, 1.5),
    edge=st.sampled_from(["snap", "drop"]), bh=st.sampled_from([0, 1, 7, 16, 64, 300]),
    bw=st.sampled_from([0, 16, 64, 512]), max_bytes=st.sampled_from([1, 10_000, 10**9]),
)
def test_chip_groups_partition_the_grid(height, width, chip, stride_frac, edge, bh, bw, max_bytes) -> None:
    chip = min(chip, height, width)
    stride = max(1, int(chip * stride_frac))
    windows = chip_windows(height, width, chip, stride, edge)
    groups = chip_groups(height, width, chip, stride, edge, block_shape=(bh, bw), bytes_per_pixel=1.0,
                         max_group_bytes=max_bytes)
    members = [m for g in groups for m in g.members]
    # every chip exactly once, with its row-major index
    assert sorted(i for i, _ in members) == list(range(len(windows)))
    assert all(windows[i] == w for i, w in members)
    for g in groups:
        rows = [int(w.row_off) for _, w in g.members]
        cols = [int(w.col_off) for _, w in g.members]
        # the group's window is the members' union, and the members form a full rectangle of the grid
        assert g.window == Window(min(cols), min(rows), max(cols) + chip - min(cols), max(rows) + chip - min(rows))
        assert len(g.members) == len(set(rows)) * len(set(cols))
        # memory cap: kept unless the group is a single chip
        assert g.window.width * g.window.height <= max_bytes or len(g.members) == 1


def test_groups_follow_tiles_and_strips() -> None:
    tiled = chip_groups(1024, 1536, 256, block_shape=(512, 512), bytes_per_pixel=1, max_group_bytes=10**9)
    assert [g.window for g in tiled] == [Window(c, r, 512, 512) for r in (0, 512) for c in (0, 512, 1024)]
    assert all(len(g.members) == 4 for g in tiled)
    striped = chip_groups(1024, 1536, 256, block_shape=(1, 1536), bytes_per_pixel=1, max_group_bytes=10**9)
    assert [g.window for g in striped] == [Window(0, r, 1536, 256) for r in range(0, 1024, 256)]
    # a memory cap splits a strip into column runs
    capped = chip_groups(1024, 1536, 256, block_shape=(1, 1536), bytes_per_pixel=1, max_group_bytes=256 * 512)
    assert [g.window.width for g in capped[:3]] == [512, 512, 512]
    # reader threads take whole runs of groups that share blocks: each tile alone, each strip row together
    assert [len(run) for run in block_runs(tiled, (512, 512))] == [1] * 6
    assert [len(run) for run in block_runs(capped, (1, 1536))] == [3] * 4


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize(
    ("tiled", "block", "chip", "stride"), [(True, 16, 20, 12), (True, 32, 32, None), (False, 0, 24, 24)]
)
def test_stream_equals_rasterio_window_reads(tmp_path: Path, workers: int, tiled: bool, block: int, chip: int,
                                             stride: int | None) -> None:
    paths = _uint16_stack(tmp_path / "d", tiled=tiled, block=block or 16, masks=tmp_path / "m")
    stack = open_stack(tmp_path / "d", masks=tmp_path / "m")
    stream = ChipStream(stack, chip_size=chip, stride=stride, workers=workers, prefetch=1, max_group_bytes=60_000)
    assert len(stream.groups()) > 1  # several groups, so group boundaries are exercised
    chips = _by_id(stream)
    windows = stream.windows
    assert stream.kept + stream.skipped == len(windows) and stream.skipped == 0
    assert sorted(c.index for c in chips.values()) == list(range(len(windows)))
    for chip_ in chips.values():
        w = chip_.window
        assert windows[chip_.index] == w
        assert chip_.data.dtype == np.float32 and chip_.data.flags.c_contiguous
        for t, path in enumerate(paths):
            with rasterio.open(path) as ds:
                raw = ds.read(window=w)
            nod = raw == 0
            np.testing.assert_array_equal(chip_.nodata[t], nod)
            np.testing.assert_array_equal(chip_.data[t][~nod], raw[~nod].astype(np.float32))
            assert np.isnan(chip_.data[t][nod]).all()
            clouds = np.zeros(nod.shape[1:], dtype=bool)
            if t >= 1:
                with rasterio.open(tmp_path / "m" / path.name.replace("S2", "CLM")) as ds:
                    clouds = ds.read(1, window=w) != 0
            np.testing.assert_array_equal(chip_.mask[t], clouds & ~nod.all(axis=0))
    assert not stack.is_open  # every thread's handles were closed
    # the same order on every run, with or without threads
    order = [c.chip_id for c in ChipStream(stack, chip_size=chip, stride=stride, workers=3, max_group_bytes=60_000)]
    assert order == list(chips) == [c.chip_id for c in ChipStream(stack, chip_size=chip, stride=stride, workers=0,
                                                                   max_group_bytes=60_000)]


def test_masks_mosaic_and_float_nan_match_per_chip_reads(tmp_path: Path) -> None:
    # float32 files with NaN as nodata, two acquisitions on one day (mosaicked), cloud masks
    data_dir, mask_dir = tmp_path / "d", tmp_path / "m"
    for k, name in enumerate(["20210301T100000", "20210311T100000", "20210311T103000"]):
        data = smooth_field(48, 40, bands=2, seed=k, t=k)
        data[:, 10 * k : 10 * k + 15, :20] = np.nan
        write_raster(data_dir / f"S2_{name}.tif", data, nodata=float("nan"), tiled=True, blocksize=16)
        clouds = (smooth_field(48, 40, seed=10 + k)[0] > 0.6).astype(np.uint8)[None]
        write_raster(mask_dir / f"CLM_{name}.tif", clouds, nodata=255, tiled=True, blocksize=16)
    stack = open_stack(data_dir, masks=mask_dir, same_day="mosaic")
    assert [len(s.sources) for s in stack.steps] == [1, 2]
    stream = ChipStream(stack, chip_size=16, stride=12, workers=2, max_group_bytes=20_000)
    chips = _by_id(stream)
    assert len(chips) == len(stream.windows)
    with stack:
        for c in chips.values():
            d, nd, m = stack.read_window(c.window)
            np.testing.assert_array_equal(c.data, d)
            np.testing.assert_array_equal(c.nodata, nd)
            np.testing.assert_array_equal(c.mask, m)
    # and against the files themselves: the mosaic's second date takes the 10:30 file where 10:00 is NaN
    c = chips["r000012_c000000"]
    with rasterio.open(data_dir / "S2_20210311T100000.tif") as a:
        first = a.read(window=c.window)
    with rasterio.open(data_dir / "S2_20210311T103000.tif") as b:
        second = b.read(window=c.window)
    expected = np.where(np.isnan(first), second, first)
    np.testing.assert_array_equal(np.isnan(c.data[1]), np.isnan(expected))
    np.testing.assert_array_equal(c.data[1][~np.isnan(expected)], expected[~np.isnan(expected)])
    assert c.mask.any() and c.nodata[1].any() and not c.nodata[1].all()


def test_warped_file_in_a_group_read(tmp_path: Path) -> None:
    ref = smooth_field(64, 64, bands=1, seed=1)
    write_raster(tmp_path / "ref_20200101.tif", ref, tiled=True, blocksize=32)
    dst_crs = CRS.from_epsg(3857)
    bounds = rasterio.transform.array_bounds(64, 64, UTM_TRANSFORM)
    transform, w, h = calculate_default_transform(UTM33, dst_crs, 64, 64, *bounds, resolution=9.0)
    merc = np.full((1, h, w), -9999.0, dtype=np.float32)
    rasterio.warp.reproject(ref, merc, src_transform=UTM_TRANSFORM, src_crs=UTM33, dst_transform=transform,
                            dst_crs=dst_crs, dst_nodata=-9999.0)
    write_raster(tmp_path / "merc_20200111.tif", merc, transform=transform, crs=dst_crs)
    stack = open_stack(tmp_path)
    assert len(stack.warped_files) == 1
    chips = sorted(ChipStream(stack, chip_size=32, workers=2), key=lambda c: c.index)
    assert len(chips) == 4
    for c in chips:
        d, nd, _ = stack.read_window(c.window)
        # the warp of a chip read alone and of its group agree (GDAL warps each pixel on its own)
        np.testing.assert_allclose(c.data, d, atol=1e-4, equal_nan=True)
        interior = (slice(4, -4), slice(4, -4))
        assert np.nanmax(np.abs(c.data[1, 0][interior] - c.data[0, 0][interior])) < 0.05


def test_early_stop_closes_every_handle_and_pickled_stacks_reopen(tmp_path: Path) -> None:
    _uint16_stack(tmp_path, size=64)
    stack = open_stack(tmp_path)
    stream = ChipStream(stack, chip_size=16, workers=2, prefetch=2, max_group_bytes=10_000)
    it = iter(stream)
    first = next(it)
    assert stack.is_open
    it.close()  # like a consumer breaking out of the loop (or Ctrl-C)
    assert not stack.is_open and stack._exits == []
    with stack:
        copy = pickle.loads(pickle.dumps(stack))  # an open stack pickles without its handles
    assert not copy.is_open
    again = copy.read_window(first.window)
    np.testing.assert_array_equal(again[0], first.data)


@settings(max_examples=200, deadline=None)
@given(
    dtype=st.sampled_from(["uint8", "uint16", "int16", "float32"]),
    values=st.lists(st.integers(-300, 300), min_size=1, max_size=40),
    nodata=st.one_of(st.none(), st.sampled_from([0.0, -9999.0, 255.0, 7.0, float("nan")])),
    nan_at=st.one_of(st.none(), st.integers(0, 39)),
)
def test_the_no_nodata_shortcut_never_hides_nodata(dtype, values, nodata, nan_at) -> None:
    info = np.iinfo(dtype) if dtype != "float32" else None
    arr = np.array([min(max(v, info.min), info.max) if info else v for v in values]).astype(dtype)
    if nan_at is not None and dtype == "float32":
        arr[nan_at % arr.size] = np.nan
    missing = missing_values(arr, nodata)
    if not may_be_missing(arr, nodata):
        assert not missing.any()
    # and the flagged cut says "empty" exactly when every value is missing
    block = WindowRead(Window(0, 0, arr.size, 1), [[arr.reshape(1, 1, -1)]], [[None]], [[None]], [[nodata]],
                       stacked=arr.reshape(1, 1, 1, -1))
    data, nodata_mask, _, empty = block.cut_flagged(0, 0, 1, arr.size)
    assert empty == bool(missing.all()) and np.array_equal(nodata_mask[0, 0, 0], missing)
    assert np.isnan(data[0, 0, 0][missing]).all()
