"""Frames from a chip's dates: uniform and fast/slow sampling, nodata checks, multi-scale resizing.

A chip holds every date of its window, ``(T, C, h, w)`` with NaN where there is no data. The model sees
a few of them. The samplers here pick *which* dates (pure functions of the date axis, property-tested)
and :func:`sample_frames` applies one to a :class:`~agrivlm.geo.chips.Chip`, keeping the chosen dates,
their indices into the chip's date axis and their normalized time ``t`` (the value LAPE's ``TEMP`` tokens
encode).

Time (one rule, :func:`frame_time_positions`, for training, ``agrivlm infer``, the processor and the
explorer): a frame's ``t`` is its date on the **season windows** its candidate dates fall in — yearly windows
from ``season_start`` (``MM-DD``, January 1 by default), from the start of the window holding the first
candidate to the end of the one holding the last (:meth:`TimeAxis.of_seasons`). The candidates are a record's
frames in training (the axis is saved as its ``time_range``) and a chip's usable dates at inference (a growth
question's: those of its season). So a ``TEMP`` bin names the same days of the season on every chip, scene and
year, and a frame and an answer that name the same day carry the same ``t`` whichever frames were sampled.
Measured before (``t`` on the range of the usable dates), on four synthetic scenes (1 year, 32-px chips): the
first usable date of a chip ran from day 11 to day 106 and the last from day 271 to 361, so one bin meant
3.5-7 days and a day sat at a different ``t`` on each chip; the shipped model's green-up errors were scene-wide
offsets (−22 and −15 days on two held-out scenes) while the climatology of the training scenes was off by a
median 2.5 days. The default retrained on the seasons rule (same command and options): held-out green-up / peak
median errors 7.5 / 15 days against 24 / 31, stage accuracy 0.689 against 0.586 (README, the default checkpoint).

Samplers (after LLaVA-NeXT's video loader and the fast/slow sampler of the reconstruction notes):

* ``uniform``: at most ``max_frames`` dates spread evenly, either over the *index* axis (as LLaVA-NeXT
  does for video frames, ``linspace(0, T-1, n)``) or over *time* (:func:`time_uniform_indices`: the
  dates closest to evenly spaced instants, which matters for satellite series whose revisits are
  irregular because cloudy dates were dropped).
* ``fast_slow``: *slow* frames every ``slow_stride``-th date over the whole series, thinned evenly to
  ``num_slow`` (long context); *fast* frames the ``num_fast`` most recent dates at ``fast_stride`` up to
  ``fast_end`` (detail around "now"). ``merge="concat"`` puts the slow stream first, then the fast
  stream (as the notes' ``merge_fast_slow_frames``); ``merge="interleave"`` puts every frame in date
  order (slow before fast on the same date). The notes' interleave alternates blocks of ``T_slow //
  T_fast`` frames and silently drops the remainder; date order keeps every frame and keeps ``t``
  monotone, which the TEMP tokens and the frame masks of :mod:`agrivlm.pipeline.masks` rely on.
  A date may be in both streams; :attr:`Frames.is_fast` says which stream each frame came from.

Nodata: a frame is *empty* when none of its values hold data (with ``clouds_as_nodata`` cloud-masked
pixels count as no data too, and are NaN in the returned frames). ``empty="raise"`` (default) raises
:class:`~agrivlm.errors.PipelineError` naming the chip and the dates if a *selected* frame is empty;
``empty="drop"`` removes empty dates *before* sampling, so the sampler spreads its frames over the usable
dates and the returned ``indices``/``times`` still refer to the chip's own date axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from affine import Affine
from pydantic import Field

from agrivlm.config import StrictModel
from agrivlm.errors import PipelineError
from agrivlm.geo.chips import Chip
from agrivlm.geo.coords import GeoGrid, TimeAxis

IntArray = npt.NDArray[np.int64]
Merge = Literal["concat", "interleave"]
ResizeMode = Literal["bilinear", "bicubic", "nearest", "area"]


# -- index samplers (pure) ---------------------------------------------------------------------------


def _round_half_up(x: npt.NDArray[np.float64]) -> IntArray:
    # np.rint rounds half to even, which can map two evenly spaced positions to one index
    return np.floor(x + 0.5).astype(np.int64)


def uniform_indices(n: int, max_frames: int) -> IntArray:
    """At most ``max_frames`` indices of ``range(n)`` evenly spread over the index axis.

    ``n <= max_frames`` keeps every index; otherwise ``round(linspace(0, n - 1, max_frames))`` (halves
    round up), which keeps the first and last index and is strictly increasing; one frame is the middle
    index ``(n - 1) // 2``.

    Returns:
        ``(min(n, max_frames),)`` int64, strictly increasing.

    """
    if max_frames < 1:
        raise PipelineError(f"max_frames must be ≥ 1, got {max_frames}")
    if n <= max_frames:
        return np.arange(n, dtype=np.int64)
    if max_frames == 1:
        return np.array([(n - 1) // 2], dtype=np.int64)
    return _round_half_up(np.linspace(0.0, n - 1, max_frames))


def time_uniform_indices(times: npt.ArrayLike, max_frames: int) -> IntArray:
    """At most ``max_frames`` dates closest to evenly spaced instants of ``[times[0], times[-1]]``.

    Picks strictly increasing indices ``i_1 < … < i_m`` (``m = min(T, max_frames)``) that minimise
    ``Σ_k |times[i_k] − g_k|`` with ``g_k`` evenly spaced from the first to the last date (one instant:
    the middle of the range), by dynamic programming in ``O(m·T)``. Ties go to the earlier date. With
    evenly spaced dates this is :func:`uniform_indices`; with irregular revisits it follows the calendar.

    Args:
        times: ``(T,)`` acquisition times, sorted ascending (``datetime64`` or anything numpy parses).
        max_frames: upper bound on the number of dates.

    Returns:
        ``(min(T, max_frames),)`` int64, strictly increasing.

    """
    if max_frames < 1:
        raise PipelineError(f"max_frames must be ≥ 1, got {max_frames}")
    secs = np.asarray(times, dtype="datetime64[us]").astype(np.int64).astype(np.float64) / 1e6
    n = secs.size
    if n <= max_frames:
        return np.arange(n, dtype=np.int64)
    if np.any(np.diff(secs) < 0):
        raise PipelineError("time_uniform_indices needs dates sorted ascending")
    m = max_frames
    targets = np.array([(secs[0] + secs[-1]) / 2.0]) if m == 1 else np.linspace(secs[0], secs[-1], m)
    # best[k, i]: least cost of frames 0..k with frame k at date i; back[k, i]: frame k-1's date then
    best = np.full((m, n), np.inf)
    back = np.zeros((m, n), dtype=np.int64)
    best[0, : n - m + 1] = np.abs(secs[: n - m + 1] - targets[0])  # leave room for the later frames
    positions = np.arange(n)
    for k in range(1, m):
        prev = best[k - 1]
        run_min = np.minimum.accumulate(prev)
        # earliest argmin of prev[0..i]: the index of the last strict new minimum up to i
        is_new = np.r_[True, prev[1:] < run_min[:-1]]
        arg_min = np.maximum.accumulate(np.where(is_new, positions, 0))
        lo, hi = k, n - m + k  # frame k can sit at dates k … n-m+k
        best[k, lo: hi + 1] = run_min[lo - 1: hi] + np.abs(secs[lo: hi + 1] - targets[k])
        back[k, lo: hi + 1] = arg_min[lo - 1: hi]
    out = np.empty(m, dtype=np.int64)
    out[-1] = int(np.argmin(best[-1]))
    for k in range(m - 1, 0, -1):
        out[k - 1] = back[k, out[k]]
    return out


def fast_slow_indices(
    n: int,
    *,
    fast_stride: int = 1,
    slow_stride: int = 4,
    num_fast: int = 8,
    num_slow: int = 8,
    fast_end: int | None = None,
) -> tuple[IntArray, IntArray]:
    """Fast and slow date indices of a series of ``n`` dates.

    * fast: ``fast_end, fast_end − fast_stride, …`` — the ``num_fast`` most recent dates at ``fast_stride``
      ending at ``fast_end`` (default: the last date), fewer when the series is too short.
    * slow: every ``slow_stride``-th date from the first up to ``fast_end``, thinned evenly (first and
      last kept) to at most ``num_slow`` — so consecutive slow dates are at least ``slow_stride`` apart.

    Nothing after ``fast_end`` is chosen, so ``fast_end`` can be the "now" of a training sample.

    Returns:
        ``(fast, slow)``, each int64 and strictly increasing.

    """
    for name, value in (("fast_stride", fast_stride), ("slow_stride", slow_stride),
                        ("num_fast", num_fast), ("num_slow", num_slow)):
        if value < 1:
            raise PipelineError(f"{name} must be ≥ 1, got {value}")
    if n < 1:
        raise PipelineError("fast/slow sampling needs at least one date, got none")
    end = n - 1 if fast_end is None else fast_end
    if not 0 <= end < n:
        raise PipelineError(f"fast_end={fast_end} is outside the series' {n} dates (0…{n - 1})")
    fast = np.arange(end, -1, -fast_stride, dtype=np.int64)[:num_fast][::-1].copy()
    candidates = np.arange(0, end + 1, slow_stride, dtype=np.int64)
    slow = candidates[uniform_indices(candidates.size, num_slow)]
    return fast, slow


def merge_streams(fast: IntArray, slow: IntArray, merge: Merge = "concat") -> tuple[IntArray, npt.NDArray[np.bool_]]:
    """Merge fast and slow indices into one frame order.

    Args:
        fast: ``(F,)`` fast-stream date indices.
        slow: ``(S,)`` slow-stream date indices.
        merge: ``"concat"`` (slow stream, then fast stream) or ``"interleave"`` (date order, slow first
            on equal dates).

    Returns:
        ``(indices, is_fast)``, both ``(F + S,)``.

    """
    indices = np.concatenate([slow, fast]).astype(np.int64)
    is_fast = np.concatenate([np.zeros(slow.size, bool), np.ones(fast.size, bool)])
    if merge == "interleave":
        order = np.lexsort((is_fast, indices))  # by date, then slow (False) before fast
        indices, is_fast = indices[order], is_fast[order]
    elif merge != "concat":
        raise PipelineError(f"merge must be 'concat' or 'interleave', got {merge!r}")
    return indices, is_fast


# -- time ------------------------------------------------------------------------------------------------


def frame_time_positions(
    candidates: npt.ArrayLike, indices: npt.ArrayLike, season_start: str = "01-01", axis: TimeAxis | None = None
) -> tuple[TimeAxis, npt.NDArray[np.float64]]:
    """Where chosen frames sit in time: the one rule of training and inference (see the module docstring).

    Args:
        candidates: ``(T,)`` acquisition times the frames are drawn from (a record's ``frame_dates``; a chip's
            usable dates), sorted ascending.
        indices: ``(T',)`` indices into ``candidates`` of the chosen frames.
        season_start: ``MM-DD`` the yearly season windows start on.
        axis: the axis itself, when it is known (a record's ``time_range``), instead of the candidates' seasons.

    Returns:
        ``(axis, t)``: the season windows the candidates fall in (:meth:`TimeAxis.of_seasons`; else ``axis``)
        and ``(T',)`` float64 ``t`` of the chosen frames on it, in ``[0, 1]``.

    Raises:
        PipelineError: no candidate date, or an index outside them.

    """
    times = np.asarray(candidates, dtype="datetime64[us]").ravel()
    idx = np.asarray(indices, dtype=np.int64).ravel()
    if times.size == 0:
        raise PipelineError("frame times need at least one candidate date, got none")
    if idx.size and (idx.min() < 0 or idx.max() >= times.size):
        raise PipelineError(f"frame indices {idx.tolist()} are outside the {times.size} candidate dates")
    axis = axis if axis is not None else TimeAxis.of_seasons(times, season_start)
    return axis, np.clip(axis.to_norm(times[idx]), 0.0, 1.0)


# -- config and frames of a chip ---------------------------------------------------------------------


#: How frames' ``t`` is measured: ``seasons`` — on the season windows of the candidate dates (the rule,
#: :func:`frame_time_positions`); ``usable_dates`` — on the candidates' own range (checkpoints trained before the
#: seasons rule, whose saved inputs do not name one: their ``TEMP`` tokens mean that range).
TimeAxisRule = Literal["seasons", "usable_dates"]


class FrameSamplingConfig(StrictModel):
    """How :func:`sample_frames` picks a chip's dates (a config section; unknown keys are errors)."""

    #: ``"uniform"`` or ``"fast_slow"``.
    sampler: Literal["uniform", "fast_slow"] = "uniform"
    #: Uniform sampler: most frames to keep.
    max_frames: Annotated[int, Field(ge=1)] = 8
    #: Uniform sampler: spread evenly over the date ``"index"`` axis or over calendar ``"time"``.
    uniform_by: Literal["index", "time"] = "index"
    #: Fast/slow sampler: step between fast dates (in dates).
    fast_stride: Annotated[int, Field(ge=1)] = 1
    #: Fast/slow sampler: least step between slow dates (in dates).
    slow_stride: Annotated[int, Field(ge=1)] = 4
    #: Fast/slow sampler: most fast frames.
    num_fast: Annotated[int, Field(ge=1)] = 8
    #: Fast/slow sampler: most slow frames.
    num_slow: Annotated[int, Field(ge=1)] = 8
    #: Fast/slow sampler: ``"concat"`` (slow then fast) or ``"interleave"`` (date order).
    merge: Merge = "concat"
    #: ``"raise"`` on a selected all-nodata frame, or ``"drop"`` empty dates before sampling.
    empty: Literal["raise", "drop"] = "raise"
    #: Count cloud-masked pixels as no data (and set them to NaN in the frames).
    clouds_as_nodata: bool = False
    #: A frame whose fraction of valid values is ≤ this is empty (0: empty only when nothing is valid).
    min_valid_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0


@dataclass(frozen=True)
class Frames:
    """Frames chosen from one chip, with where and when they are.

    Attributes:
        pixels: ``(T', C, h, w)`` float32, NaN = no data (and clouds with ``clouds_as_nodata``).
        indices: ``(T',)`` int64, each frame's index into the chip's date axis (``chip.times``).
        times: ``(T',)`` ``datetime64[us]`` acquisition times of the frames.
        is_fast: ``(T',)`` bool, True for frames of the fast stream (all False for ``uniform``).
        valid: ``(T', h, w)`` bool, True where every band holds data (and, with ``clouds_as_nodata``,
            no cloud).
        grid: the chip's :class:`GeoGrid` (pixel edges → CRS); the frames share it.
        time_axis: the season windows of the dates the frames were drawn from (:func:`frame_time_positions`);
            ``t`` is measured on it, not on the chosen frames' range.
        chip_id: id of the source chip (for errors and records).

    """

    pixels: npt.NDArray[np.float32]
    indices: IntArray
    times: npt.NDArray[np.datetime64]
    is_fast: npt.NDArray[np.bool_]
    valid: npt.NDArray[np.bool_]
    grid: GeoGrid
    time_axis: TimeAxis
    chip_id: str = ""

    @property
    def t(self) -> npt.NDArray[np.float64]:
        """``(T',)`` normalized time of each frame in ``[0, 1]`` of :attr:`time_axis`."""
        return np.clip(self.time_axis.to_norm(self.times), 0.0, 1.0)

    def __len__(self) -> int:
        return int(self.indices.size)

    def tensor(self) -> torch.Tensor:
        """The pixels as a ``(T', C, h, w)`` float32 torch tensor (shares memory)."""
        return torch.from_numpy(self.pixels)


def frame_valid_fraction(data: npt.NDArray[np.float32], mask: npt.NDArray[np.bool_] | None = None) -> npt.NDArray[
        np.float64]:
    """Fraction of each frame's values that hold data.

    Args:
        data: ``(T, C, h, w)``, NaN = no data.
        mask: optional ``(T, h, w)``, True = also no data (clouds).

    Returns:
        ``(T,)`` in ``[0, 1]``.

    """
    ok = ~np.isnan(data)
    if mask is not None:
        ok &= ~mask[:, None]
    return ok.reshape(ok.shape[0], -1).mean(axis=1) if ok.size else np.zeros(data.shape[0])


def _describe(times: npt.NDArray[np.datetime64], idx: npt.ArrayLike) -> str:
    picked = np.asarray(idx, dtype=np.int64)
    names = [str(np.datetime64(times[i], "s")) for i in picked[:5]]
    more = f" and {picked.size - 5} more" if picked.size > 5 else ""
    return ", ".join(f"#{i} {n}" for i, n in zip(picked[:5], names, strict=True)) + more


def select_indices(times: npt.ArrayLike, config: FrameSamplingConfig, fast_end: int | None = None) -> tuple[
        IntArray, npt.NDArray[np.bool_]]:
    """Apply ``config``'s sampler to a date axis.

    Args:
        times: ``(T,)`` sorted acquisition times.
        config: the sampler and its settings.
        fast_end: for ``fast_slow``, the index of the last fast date (default the last date).

    Returns:
        ``(indices, is_fast)`` into ``times``, each ``(T',)``.

    """
    arr = np.asarray(times, dtype="datetime64[us]")
    if config.sampler == "uniform":
        idx = (uniform_indices(arr.size, config.max_frames) if config.uniform_by == "index"
               else time_uniform_indices(arr, config.max_frames))
        return idx, np.zeros(idx.size, dtype=bool)
    fast, slow = fast_slow_indices(arr.size, fast_stride=config.fast_stride, slow_stride=config.slow_stride,
                                   num_fast=config.num_fast, num_slow=config.num_slow, fast_end=fast_end)
    return merge_streams(fast, slow, config.merge)


def sample_frames(chip: Chip, config: FrameSamplingConfig | None = None, fast_end: int | None = None,
                  season_start: str = "01-01", time_axis: TimeAxisRule = "seasons") -> Frames:
    """Choose frames from a chip's dates.

    Args:
        chip: the chip (``data`` ``(T, C, h, w)``, NaN = no data; ``mask`` ``(T, h, w)`` clouds).
        config: sampler settings (default :class:`FrameSamplingConfig()`: uniform, 8 frames).
        fast_end: for ``fast_slow``, index into ``chip.times`` of the last fast frame. With
            ``empty="drop"`` it must be a usable date.
        season_start: ``MM-DD`` the yearly season windows of the time axis start on (``agrivlm infer``'s
            ``season_start``; :func:`frame_time_positions`).
        time_axis: :data:`TimeAxisRule` (``usable_dates`` only for checkpoints trained before ``seasons``).

    Raises:
        PipelineError: the chip has no dates, no usable date, or (``empty="raise"``) a selected frame is
            all nodata — naming the chip and the dates.

    """
    config = config or FrameSamplingConfig()
    _check_chip_dates(chip, fast_end)
    cloud = chip.mask if config.clouds_as_nodata else None
    usable = frame_valid_fraction(chip.data, cloud) > config.min_valid_fraction
    what = "valid (cloud-free) values" if config.clouds_as_nodata else "valid values"
    if config.empty == "drop":
        indices, is_fast = _select_among_usable(chip, config, fast_end, usable, what)
        candidates = chip.times[usable]
    else:
        indices, is_fast = _select_among_all(chip, config, fast_end, usable, what)
        candidates = chip.times
    axis = (TimeAxis.from_dates(candidates) if time_axis == "usable_dates"
            else TimeAxis.of_seasons(candidates, season_start))
    return _gather_frames(chip, config, indices, is_fast, axis)


def _check_chip_dates(chip: Chip, fast_end: int | None) -> None:
    """Refuse a chip without dates, with frames that do not match its dates, or a ``fast_end`` outside them."""
    n = len(chip.times)
    if n == 0 or chip.data.shape[0] == 0:
        raise PipelineError(f"chip {chip.chip_id}: no frames (zero dates); ingest a stack with at least one date")
    if chip.data.shape[0] != n:
        raise PipelineError(f"chip {chip.chip_id}: {chip.data.shape[0]} frames but {n} dates")
    if fast_end is not None and not 0 <= fast_end < n:
        raise PipelineError(f"chip {chip.chip_id}: fast_end={fast_end} is outside its {n} dates (0…{n - 1})")


def _select_among_usable(chip: Chip, config: FrameSamplingConfig, fast_end: int | None,
                         usable: npt.NDArray[np.bool_], what: str) -> tuple[IntArray, npt.NDArray[np.bool_]]:
    """``empty="drop"``: sample among the usable dates only (``fast_end`` must be one of them)."""
    keep = np.flatnonzero(usable)
    if keep.size == 0:
        raise PipelineError(
            f"chip {chip.chip_id}: all {len(chip.times)} frames are empty (fraction of {what} ≤ "
            f"{config.min_valid_fraction}); no frame to sample — skip this chip or lower min_valid_fraction")
    local_end = None
    if fast_end is not None:
        hits = np.flatnonzero(keep == fast_end)
        if hits.size == 0:
            raise PipelineError(f"chip {chip.chip_id}: fast_end date {_describe(chip.times, [fast_end])} is empty")
        local_end = int(hits[0])
    local, is_fast = select_indices(chip.times[keep], config, local_end)
    return keep[local], is_fast


def _select_among_all(chip: Chip, config: FrameSamplingConfig, fast_end: int | None,
                      usable: npt.NDArray[np.bool_], what: str) -> tuple[IntArray, npt.NDArray[np.bool_]]:
    """``empty="raise"``: sample among every date, and refuse a selected date that is not usable."""
    indices, is_fast = select_indices(chip.times, config, fast_end)
    bad = indices[~usable[indices]]
    if bad.size:
        raise PipelineError(
            f"chip {chip.chip_id}: selected frame(s) {_describe(chip.times, np.unique(bad))} have no {what} "
            f"(fraction ≤ {config.min_valid_fraction}); pass empty='drop' to sample only usable dates")
    return indices, is_fast


def _gather_frames(chip: Chip, config: FrameSamplingConfig, indices: IntArray, is_fast: npt.NDArray[np.bool_],
                   axis: TimeAxis) -> Frames:
    """The selected frames' pixels (clouds as NaN when ``clouds_as_nodata``) and their validity."""
    pixels = chip.data[indices].astype(np.float32, copy=True)
    valid: npt.NDArray[np.bool_] = np.logical_not(chip.nodata[indices].any(axis=1))
    if config.clouds_as_nodata:
        cloudy = chip.mask[indices]
        pixels[np.broadcast_to(cloudy[:, None], pixels.shape)] = np.nan
        valid &= ~cloudy
    return Frames(
        pixels=pixels,
        indices=indices.astype(np.int64),
        times=np.asarray(chip.times, dtype="datetime64[us]")[indices],
        is_fast=is_fast,
        valid=valid,
        grid=chip.grid,
        time_axis=axis,
        chip_id=chip.chip_id,
    )


# -- resizing and multi-scale ------------------------------------------------------------------------


def as_frames_tensor(frames: torch.Tensor | npt.ArrayLike) -> torch.Tensor:
    """``(T, C, H, W)`` frames as a float32 tensor; a clear error for any other rank."""
    x = frames if isinstance(frames, torch.Tensor) else torch.as_tensor(np.asarray(frames))
    if x.ndim != 4:
        raise PipelineError(f"frames must be (T, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise PipelineError("frames hold zero frames (T = 0)")
    return x.float()


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """``(round(height·scale), round(width·scale))``, at least 1 pixel each (halves round up)."""
    if not scale > 0:
        raise PipelineError(f"scale factors must be > 0, got {scale}")
    return max(1, math.floor(height * scale + 0.5)), max(1, math.floor(width * scale + 0.5))


def rescale_grid(grid: GeoGrid, height: int, width: int) -> GeoGrid:
    """The grid of ``grid``'s footprint resampled to ``height × width`` pixels (exact scaled transform).

    Normalized ``(u, v)`` map to the same CRS point on both grids; only pixel sizes change.
    """
    if height < 1 or width < 1:
        raise PipelineError(f"cannot resample a grid to {height}x{width} px")
    transform = grid.transform * Affine.scale(grid.width / width, grid.height / height)
    return GeoGrid(transform=transform, crs=grid.crs, width=width, height=height)


def resize_frames(frames: torch.Tensor | npt.ArrayLike, size: tuple[int, int], mode: ResizeMode = "bilinear",
                  antialias: bool = True) -> torch.Tensor:
    """Resize ``(T, C, H, W)`` frames to ``size = (h, w)``, honouring NaN = no data.

    Edges map to edges (``align_corners=False``), so a normalized position is the same place before and
    after. Without NaN this is ``torch.nn.functional.interpolate``. With NaN it is *normalized*
    interpolation: data and validity are resized separately and divided, so no-data pixels never bleed
    into their neighbours; output pixels that see no valid input are NaN.

    Returns:
        ``(T, C, h, w)`` float32.

    """
    x = as_frames_tensor(frames)
    if tuple(x.shape[-2:]) == tuple(size):
        return x.clone()

    def interp(t: torch.Tensor) -> torch.Tensor:
        if mode in ("bilinear", "bicubic"):
            return F.interpolate(t, size=size, mode=mode, align_corners=False, antialias=antialias)
        return F.interpolate(t, size=size, mode=mode)

    nan = torch.isnan(x)
    if not nan.any():
        return interp(x)
    any_nan = nan.any(dim=1, keepdim=True)
    # the usual case, nodata per pixel in every band, needs one weight channel, not C
    weight = ~any_nan if torch.equal(any_nan, nan.all(dim=1, keepdim=True)) else ~nan
    den = interp(weight.to(x.dtype))
    num = interp(torch.nan_to_num(x, nan=0.0))
    return num.div_(den.clamp_min(1e-6)).masked_fill_(den <= 1e-3, float("nan"))


@dataclass(frozen=True)
class ScaledFrames:
    """Frames at one scale of :func:`multiscale`.

    Attributes:
        pixels: ``(T, C, h·s, w·s)`` float32 (rounded sizes, see :func:`scaled_size`).
        scale: the scale factor ``s``.
        grid: the exact grid of these pixels (same footprint as the input grid).

    """

    pixels: torch.Tensor
    scale: float
    grid: GeoGrid


def multiscale(frames: torch.Tensor | npt.ArrayLike, grid: GeoGrid, scales: Sequence[float] = (1.0, 0.75, 0.5),
               mode: ResizeMode = "bilinear") -> list[ScaledFrames]:
    """The same frames at several scale factors, each with its own exact grid.

    Args:
        frames: ``(T, C, H, W)`` on ``grid`` (``H = grid.height``, ``W = grid.width``).
        grid: the frames' grid.
        scales: factors, e.g. ``(1.0, 0.75, 0.5)``; output order follows them.
        mode: interpolation (see :func:`resize_frames`).

    """
    x = as_frames_tensor(frames)
    if (x.shape[-2], x.shape[-1]) != (grid.height, grid.width):
        raise PipelineError(f"frames are {x.shape[-2]}x{x.shape[-1]} px but their grid is {grid.height}x{grid.width}")
    if not scales:
        raise PipelineError("multiscale needs at least one scale factor")
    out = []
    for s in scales:
        h, w = scaled_size(grid.height, grid.width, float(s))
        out.append(ScaledFrames(pixels=resize_frames(x, (h, w), mode), scale=float(s), grid=rescale_grid(grid, h, w)))
    return out
