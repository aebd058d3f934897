from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rasters import UTM33, UTM_TRANSFORM, smooth_field, write_raster

from agrivlm.config import parse_config
from agrivlm.errors import ConfigError, PipelineError
from agrivlm.geo import Chip, ChipStream, GeoGrid, TimeAxis, open_stack
from agrivlm.pipeline.frames import (
    FrameSamplingConfig,
    fast_slow_indices,
    frame_time_positions,
    merge_streams,
    multiscale,
    rescale_grid,
    resize_frames,
    sample_frames,
    scaled_size,
    time_uniform_indices,
    uniform_indices,
)


@pytest.fixture(scope="module")
def sample_chips(sample_root: Path) -> list[Chip]:
    stack = open_stack(sample_root / "ndvi", masks=sample_root / "cloud_mask")
    return list(ChipStream(stack, chip_size=48, stride=26))


# -- pure samplers ---------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 400), m=st.integers(1, 64))
def test_uniform_indices_properties(n: int, m: int) -> None:
    idx = uniform_indices(n, m)
    assert idx.size == min(n, m)
    assert np.all(np.diff(idx) > 0)
    if idx.size >= 2:
        assert idx[0] == 0 and idx[-1] == n - 1
        # evenly spread: every gap is within one date of (n - 1) / (m - 1)
        ideal = (n - 1) / (idx.size - 1)
        assert np.all(np.abs(np.diff(idx) - ideal) <= 1.0 + 1e-9)


def _cost(secs: np.ndarray, idx: tuple[int, ...] | np.ndarray, m: int) -> float:
    targets = np.array([(secs[0] + secs[-1]) / 2]) if m == 1 else np.linspace(secs[0], secs[-1], m)
    return float(np.abs(secs[np.asarray(idx)] - targets).sum())


@settings(max_examples=150, deadline=None)
@given(days=st.lists(st.integers(0, 400), min_size=1, max_size=9, unique=True), m=st.integers(1, 5))
def test_time_uniform_indices_is_optimal_against_brute_force(days: list[int], m: int) -> None:
    days = sorted(days)
    times = np.datetime64("2020-01-01") + np.asarray(days).astype("timedelta64[D]")
    idx = time_uniform_indices(times, m)
    assert idx.size == min(len(days), m) and np.all(np.diff(idx) > 0)
    if len(days) <= m:
        return
    secs = np.asarray(days, dtype=np.float64) * 86400.0
    best = min(_cost(secs, c, m) for c in itertools.combinations(range(len(days)), m))
    assert _cost(secs, idx, m) == pytest.approx(best, rel=1e-12, abs=1e-6)


def test_time_uniform_follows_the_calendar_not_the_index() -> None:
    # a burst of dates in January, then sparse ones: index-uniform spends its frames on the burst
    days = [0, 1, 2, 3, 4, 5, 6, 7, 120, 240, 360]
    times = np.datetime64("2021-01-01") + np.asarray(days).astype("timedelta64[D]")
    assert uniform_indices(len(days), 4).tolist() == [0, 3, 7, 10]
    assert time_uniform_indices(times, 4).tolist() == [0, 8, 9, 10]  # days 0, 120, 240, 360


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 120), fs=st.integers(1, 4), ss=st.integers(1, 9), nf=st.integers(1, 10),
       ns=st.integers(1, 10), data=st.data())
def test_fast_slow_indices_properties(n: int, fs: int, ss: int, nf: int, ns: int, data: st.DataObject) -> None:
    end = data.draw(st.integers(0, n - 1))
    fast, slow = fast_slow_indices(n, fast_stride=fs, slow_stride=ss, num_fast=nf, num_slow=ns, fast_end=end)
    assert fast[-1] == end and fast.size == min(nf, end // fs + 1)
    assert np.all(np.diff(fast) == fs)
    assert (slow[0] == 0 or ns == 1) and slow.size == min(ns, end // ss + 1) and slow.max() <= end
    assert np.all(slow % ss == 0) and np.all(np.diff(slow) >= ss)


def test_merge_streams_concat_and_interleave() -> None:
    fast, slow = np.array([5, 6, 7]), np.array([0, 4, 7])
    idx, is_fast = merge_streams(fast, slow, "concat")
    assert idx.tolist() == [0, 4, 7, 5, 6, 7] and is_fast.tolist() == [False] * 3 + [True] * 3
    idx, is_fast = merge_streams(fast, slow, "interleave")
    assert idx.tolist() == [0, 4, 5, 6, 7, 7] and is_fast.tolist() == [False, False, True, True, False, True]
    with pytest.raises(PipelineError, match="merge must be"):
        merge_streams(fast, slow, "zip")  # type: ignore[arg-type]


def test_config_is_strict_and_checked() -> None:
    cfg = parse_config(FrameSamplingConfig, {"sampler": "fast_slow", "num_fast": 4}, "frames.yaml")
    assert cfg.num_fast == 4 and cfg.slow_stride == 4
    with pytest.raises(ConfigError, match="frames.yaml: max_frame: unknown key"):
        parse_config(FrameSamplingConfig, {"max_frame": 4}, "frames.yaml")
    with pytest.raises(ConfigError, match="frames.yaml: num_slow"):
        parse_config(FrameSamplingConfig, {"num_slow": 0}, "frames.yaml")


# -- time: one rule for training and inference -----------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(days=st.lists(st.integers(0, 3000), min_size=1, max_size=30, unique=True), data=st.data(),
       season_start=st.sampled_from(["01-01", "08-01", "10-15"]))
def test_frame_times_are_on_the_season_windows_of_the_candidates(days: list[int], data: st.DataObject,
                                                                 season_start: str) -> None:
    dates = np.datetime64("2016-01-01") + np.sort(np.array(days)).astype("timedelta64[D]")
    chosen = np.array(sorted(data.draw(st.sets(st.integers(0, len(days) - 1), min_size=1))), dtype=np.int64)
    axis, t = frame_time_positions(dates, chosen, season_start)
    # the axis runs from the season start on or before the first candidate to the one after the last
    assert axis.start <= dates[0] and axis.start > dates[0] - np.timedelta64(366, "D")
    assert axis.end > dates[-1] and axis.end <= dates[-1] + np.timedelta64(366, "D")
    for edge in (axis.start, axis.end):
        assert str(edge)[5:10] == season_start
    assert t.shape == chosen.shape and np.all((t >= 0) & (t < 1)) and np.all(np.diff(t) > 0)
    span = (axis.end - axis.start) / np.timedelta64(1, "D")
    np.testing.assert_allclose(t, (dates[chosen] - axis.start) / np.timedelta64(1, "D") / span, atol=1e-12)
    # a date's t does not depend on which other dates of its season windows are candidates
    again, t_again = frame_time_positions(dates[[0, -1]], [0, 1], season_start)
    assert again == axis and t_again[0] == frame_time_positions(dates, [0], season_start)[1][0]
    # a known axis is used as given (a record's time_range)
    given_axis, t_given = frame_time_positions(dates, chosen, axis=TimeAxis.from_dates(dates))
    assert given_axis == TimeAxis.from_dates(dates) and np.all((t_given >= 0) & (t_given <= 1))
    with pytest.raises(PipelineError, match="outside the"):
        frame_time_positions(dates, [len(days)])


# -- frames of real chips --------------------------------------------------------------------------------


def test_uniform_frames_of_a_real_chip_keep_pixels_dates_and_t(sample_chips: list[Chip]) -> None:
    chip = sample_chips[4]
    frames = sample_frames(chip, FrameSamplingConfig(max_frames=8))
    assert frames.pixels.shape == (8, 1, 48, 48) and frames.pixels.dtype == np.float32
    assert frames.indices.tolist() == [0, 10, 19, 29, 38, 48, 57, 67]
    np.testing.assert_array_equal(frames.pixels, chip.data[frames.indices])
    np.testing.assert_array_equal(frames.times, chip.times[frames.indices])
    assert str(frames.times[0])[:10] == "2015-07-11" and str(frames.times[-1])[:10] == "2017-12-22"
    # t is measured on the calendar years the chip's dates fall in (2015-01-01 → 2018-01-01)
    start, end = np.datetime64("2015-01-01", "s"), np.datetime64("2018-01-01", "s")
    assert (frames.time_axis.start, frames.time_axis.end) == (start, end)
    expected_t = (chip.times[frames.indices] - start) / (end - start)
    np.testing.assert_allclose(frames.t, expected_t, rtol=0, atol=1e-12)
    assert frames.grid == chip.grid and not frames.is_fast.any()
    assert frames.tensor().shape == (8, 1, 48, 48)


def test_time_uniform_frames_of_a_real_chip(sample_chips: list[Chip]) -> None:
    chip = sample_chips[0]
    by_time = sample_frames(chip, FrameSamplingConfig(max_frames=6, uniform_by="time"))
    by_index = sample_frames(chip, FrameSamplingConfig(max_frames=6))
    target = np.linspace(0, 1, 6)
    own = chip.time_axis  # the chip's own date range
    # the calendar-uniform frames are at least as close to evenly spaced instants as the index-uniform ones
    gap_time = np.abs(own.to_norm(by_time.times) - target).sum()
    assert gap_time <= np.abs(own.to_norm(by_index.times) - target).sum() + 1e-12
    assert by_time.times[0] == chip.times[0] and by_time.times[-1] == chip.times[-1]
    np.testing.assert_array_equal(by_time.times, chip.times[by_time.indices])


@pytest.mark.parametrize("merge", ["concat", "interleave"])
def test_fast_slow_frames_of_a_real_chip(sample_chips: list[Chip], merge: str) -> None:
    chip = sample_chips[2]
    cfg = FrameSamplingConfig(sampler="fast_slow", num_fast=4, num_slow=5, fast_stride=2, slow_stride=6, merge=merge)
    frames = sample_frames(chip, cfg, fast_end=40)
    fast, slow = fast_slow_indices(68, fast_stride=2, slow_stride=6, num_fast=4, num_slow=5, fast_end=40)
    assert fast.tolist() == [34, 36, 38, 40]
    assert sorted(frames.indices[frames.is_fast].tolist()) == fast.tolist()
    assert sorted(frames.indices[~frames.is_fast].tolist()) == slow.tolist()
    assert frames.indices.max() == 40  # nothing after "now"
    # t on the season windows of the dates the frames were drawn from (every date of the chip), so "now" is not t = 1
    axis = TimeAxis.of_seasons(chip.times)
    np.testing.assert_allclose(frames.t, axis.to_norm(frames.times), atol=1e-12)
    assert frames.t.max() < 1.0
    np.testing.assert_array_equal(frames.pixels, chip.data[frames.indices])
    np.testing.assert_array_equal(frames.times, chip.times[frames.indices])
    if merge == "interleave":
        assert np.all(np.diff(frames.t) >= 0)
    else:
        assert frames.is_fast.tolist() == [False] * slow.size + [True] * fast.size


def test_cloudy_dates_are_dropped_with_dates_kept_consistent(sample_chips: list[Chip]) -> None:
    chip = sample_chips[0]
    clear = (~chip.mask).reshape(len(chip.times), -1).mean(axis=1)
    fully_cloudy = np.flatnonzero(clear == 0)
    assert fully_cloudy.size > 10  # real data: many dates are cloud-covered over this chip
    cfg = FrameSamplingConfig(max_frames=12, clouds_as_nodata=True, empty="drop")
    frames = sample_frames(chip, cfg)
    assert len(frames) == 12 and not np.isin(frames.indices, fully_cloudy).any()
    usable = np.flatnonzero(clear > 0)
    assert frames.indices.tolist() == usable[uniform_indices(usable.size, 12)].tolist()
    # t is measured on the season windows of the usable dates (the dates drawn from, as a record's frames)
    assert frames.time_axis == TimeAxis.of_seasons(chip.times[usable])
    np.testing.assert_array_equal(frames.times, chip.times[frames.indices])
    # cloudy pixels are NaN and not valid; clear pixels are the chip's values
    cloudy = chip.mask[frames.indices]
    assert np.isnan(frames.pixels[:, 0][cloudy]).all()
    np.testing.assert_array_equal(frames.pixels[:, 0][~cloudy], chip.data[frames.indices, 0][~cloudy])
    assert not frames.valid[cloudy].any()
    # without dropping, the uniform pick lands on a fully cloudy date: a clear error naming chip and date
    with pytest.raises(PipelineError, match=r"chip r000000_c000000: selected frame\(s\) #\d+ 20\d\d-"):
        sample_frames(chip, replace_cfg(cfg, empty="raise", max_frames=68))


def replace_cfg(cfg: FrameSamplingConfig, **kw: object) -> FrameSamplingConfig:
    return FrameSamplingConfig(**{**cfg.model_dump(), **kw})


def test_all_nodata_frame_in_a_geotiff_stack(tmp_path: Path) -> None:
    for k, day in enumerate(["20210301", "20210311", "20210321", "20210331"]):
        data = smooth_field(24, 24, seed=k)
        if day == "20210321":
            data[:] = -9999.0  # a date whose file holds no data at all
        write_raster(tmp_path / f"S2_{day}.tif", data)
    chip = next(iter(ChipStream(open_stack(tmp_path), chip_size=24)))
    with pytest.raises(PipelineError, match=r"r000000_c000000: selected frame\(s\) #2 2021-03-21.*empty='drop'"):
        sample_frames(chip)
    frames = sample_frames(chip, FrameSamplingConfig(empty="drop"))
    assert frames.indices.tolist() == [0, 1, 3]
    assert [str(t)[:10] for t in frames.times] == ["2021-03-01", "2021-03-11", "2021-03-31"]
    # on the calendar year of the usable dates: 2021-03-31 is day 89 of 365
    assert frames.t[-1] == pytest.approx(89 / 365) and frames.time_axis.span_seconds == 365 * 86400
    every = replace(chip, data=np.full_like(chip.data, np.nan), nodata=np.ones_like(chip.nodata))
    with pytest.raises(PipelineError, match="all 4 frames are empty"):
        sample_frames(every, FrameSamplingConfig(empty="drop"))


def test_zero_frames_is_a_clear_error(sample_chips: list[Chip]) -> None:
    chip = sample_chips[0]
    empty = replace(chip, times=chip.times[:0], data=chip.data[:0], nodata=chip.nodata[:0], mask=chip.mask[:0])
    with pytest.raises(PipelineError, match=r"chip r000000_c000000: fast_end=68 is outside its 68 dates \(0…67\)"):
        sample_frames(chip, FrameSamplingConfig(sampler="fast_slow", empty="drop"), fast_end=68)
    with pytest.raises(PipelineError, match="chip r000000_c000000: no frames"):
        sample_frames(empty)
    with pytest.raises(PipelineError, match="zero frames"):
        resize_frames(torch.zeros(0, 1, 4, 4), (2, 2))
    with pytest.raises(PipelineError, match=r"\(T, C, H, W\)"):
        resize_frames(torch.zeros(1, 4, 4), (2, 2))


# -- multi-scale ------------------------------------------------------------------------------------------


def test_multiscale_shapes_grids_and_values(sample_chips: list[Chip]) -> None:
    chip = sample_chips[4]
    frames = sample_frames(chip, FrameSamplingConfig(max_frames=3))
    out = multiscale(frames.pixels, frames.grid, (1.0, 0.75, 0.5), mode="area")
    assert [tuple(s.pixels.shape) for s in out] == [(3, 1, 48, 48), (3, 1, 36, 36), (3, 1, 24, 24)]
    torch.testing.assert_close(out[0].pixels, frames.tensor())
    # area downsampling by 2 is the mean of each 2x2 block
    x = frames.pixels.astype(np.float64)
    blocks = x.reshape(3, 1, 24, 2, 24, 2).mean(axis=(3, 5))
    np.testing.assert_allclose(out[2].pixels.numpy(), blocks, rtol=1e-5, atol=1e-6)
    for s in out:
        # same footprint, and the centre of output pixel (0, 0) is where it should be on the map
        np.testing.assert_allclose(s.grid.corners(), chip.grid.corners(), rtol=0, atol=1e-6)
        k = chip.grid.width / s.grid.width
        np.testing.assert_allclose(s.grid.pixel_to_crs(0.5, 0.5), chip.grid.pixel_to_crs(0.5 * k, 0.5 * k), atol=1e-6)
        assert s.grid.transform.a == pytest.approx(chip.grid.transform.a * k, rel=1e-12)


def test_resize_honours_nodata() -> None:
    x = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    x[0, 0, 0, 0] = float("nan")
    x[0, 0, 2:, 2:] = float("nan")
    out = resize_frames(x, (2, 2), mode="area")
    # the top-left block averages only its 3 valid pixels; the all-nodata block stays nodata
    assert out[0, 0, 0, 0].item() == pytest.approx((1 + 4 + 5) / 3)
    assert out[0, 0, 0, 1].item() == pytest.approx((2 + 3 + 6 + 7) / 4)
    assert torch.isnan(out[0, 0, 1, 1])
    smooth = resize_frames(x, (3, 3), mode="bilinear")
    assert torch.isfinite(smooth[0, 0, 0, 0]) and torch.isnan(smooth[0, 0, 2, 2])


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 300), w=st.integers(1, 300), s=st.floats(0.05, 3.0),
       u=st.floats(0, 1), v=st.floats(0, 1))
def test_rescaled_grid_keeps_every_normalized_position(h: int, w: int, s: float, u: float, v: float) -> None:
    grid = GeoGrid(UTM_TRANSFORM, UTM33, w, h)
    nh, nw = scaled_size(h, w, s)
    assert (abs(nh - h * s) <= 0.5 + 1e-9 or nh == 1) and (abs(nw - w * s) <= 0.5 + 1e-9 or nw == 1)
    small = rescale_grid(grid, nh, nw)
    np.testing.assert_allclose(small.norm_to_crs(u, v), grid.norm_to_crs(u, v), rtol=0, atol=1e-6)



def test_resize_nodata_in_one_band_only() -> None:
    x = torch.arange(32, dtype=torch.float32).reshape(1, 2, 4, 4)
    x[0, 0, 0, 0] = float("nan")  # band 0 lacks a pixel that band 1 has
    out = resize_frames(x, (2, 2), mode="area")
    assert out[0, 0, 0, 0].item() == pytest.approx((1 + 4 + 5) / 3)
    assert out[0, 1, 0, 0].item() == pytest.approx((16 + 17 + 20 + 21) / 4)
    torch.testing.assert_close(resize_frames(torch.nan_to_num(x), (2, 2), mode="area")[0, 1], out[0, 1])
