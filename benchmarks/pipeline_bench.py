"""Side-by-side timings of the chip → model-input pipeline (CPU), printed as ratios.

    python benchmarks/pipeline_bench.py

* NaN-aware resize (:func:`resize_frames` on frames with nodata) vs plain ``F.interpolate`` on the same
  frames without NaN: the price of never letting nodata bleed into neighbours.
* Calendar-uniform sampling (dynamic programme) vs index-uniform sampling, for a long series.
* The whole path on the embedded sample: sample frames → bands → AnyRes tiles, per chip.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from agrivlm.geo import ChipStream, open_stack
from agrivlm.pipeline.anyres import anyres_tiles
from agrivlm.pipeline.bands import prepare_bands
from agrivlm.pipeline.frames import (
    FrameSamplingConfig,
    resize_frames,
    sample_frames,
    time_uniform_indices,
    uniform_indices,
)
from agrivlm.sample import SAMPLE_ROOT


def best_of(fn: Callable[[], object], repeat: int = 5, number: int = 3) -> float:
    """Best mean seconds per call over ``repeat`` rounds of ``number`` calls."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t0) / number)
    return min(times)


def main() -> None:
    torch.manual_seed(0)
    x = torch.rand(16, 3, 512, 512)
    x_nan = x.clone()
    x_nan[:, :, 100:180, 200:260] = float("nan")
    plain = best_of(lambda: F.interpolate(x, size=(384, 384), mode="bilinear", align_corners=False, antialias=True))
    aware = best_of(lambda: resize_frames(x_nan, (384, 384)))
    print(f"resize 16x3x512² → 384²: plain {plain * 1e3:.1f} ms, NaN-aware {aware * 1e3:.1f} ms, "
          f"ratio {aware / plain:.2f}x")

    days = np.cumsum(np.random.default_rng(0).integers(1, 12, size=730))
    times = np.datetime64("2018-01-01") + days.astype("timedelta64[D]")
    idx_t = best_of(lambda: uniform_indices(times.size, 64), repeat=5, number=50)
    cal_t = best_of(lambda: time_uniform_indices(times, 64), repeat=5, number=5)
    print(f"sampling 64 of {times.size} dates: index-uniform {idx_t * 1e6:.0f} µs, calendar-uniform "
          f"{cal_t * 1e3:.2f} ms, ratio {cal_t / idx_t:.0f}x")

    stack = open_stack(SAMPLE_ROOT / "ndvi", masks=SAMPLE_ROOT / "cloud_mask")
    chips = list(ChipStream(stack, chip_size=64, stride=32))
    cfg = FrameSamplingConfig(max_frames=8, clouds_as_nodata=True, empty="drop")

    def one(chip_i: int) -> torch.Tensor:
        frames = sample_frames(chips[chip_i], cfg)
        chans, _ = prepare_bands(frames.pixels, "ndvi", composite_name="ndvi_gray")
        return anyres_tiles(chans, frames.grid, tile_size=384, max_tiles=4, min_tiles=4).pixels

    per_chip = best_of(lambda: [one(i) for i in range(len(chips))], repeat=3, number=1) / len(chips)
    sample_only = best_of(lambda: [sample_frames(c, cfg) for c in chips], repeat=3, number=1) / len(chips)
    print(f"sample chip 64² → 8 frames → NDVI grey → 4 tiles + thumbnail of 384² ({len(chips)} chips): "
          f"{per_chip * 1e3:.1f} ms/chip, of which sampling {sample_only * 1e3:.2f} ms "
          f"({sample_only / per_chip:.1%})")


if __name__ == "__main__":
    main()
