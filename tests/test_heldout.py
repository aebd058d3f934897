"""Held-out scoring chip by chip and its baselines (agrivlm.eval.heldout) on a real synthetic scene."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import pandas as pd
import pytest
import shapely

from agrivlm.eval.heldout import (
    chip_grid,
    clip_to_chips,
    evaluate_chipwise,
    predict_climatology,
    segmentation_baseline,
    stage_climatology,
    whole_chip_baseline,
)
from agrivlm.geo.stack import open_stack
from agrivlm.synth import SceneSpec, write_scene


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("heldout") / "scene"
    write_scene(out, SceneSpec(region="pannonian", area_km2=0.41, seed=4, start="2021-03-01", end="2021-11-30"))
    return out


def _fields(scene: Path) -> gpd.GeoDataFrame:
    p = gpd.read_file(scene / "parcels.gpkg")
    return p[p["class"].isin(["cultivated land", "grassland"])]


def test_perfect_answers_score_one_and_the_whole_chip_scores_low(scene: Path) -> None:
    stack = open_stack(str(scene / "stack"), masks=str(scene / "cloud_mask"))
    chips = chip_grid(stack, 32, 32)
    assert len(chips) == 4 and set(chips.chip_id) == {"r000000_c000000", "r000000_c000032", "r000032_c000000",
                                                       "r000032_c000032"}
    truth = _fields(scene)
    # a perfect model: each chip answers exactly the fields it shows, clipped to it
    perfect = clip_to_chips(truth, chips, "field_id", min_area_m2=400.0)
    extent = sorted((scene / "stack").glob("*.tif"))[0]
    ev = evaluate_chipwise(perfect, truth, chips, extent=extent)
    assert ev.f1 == pytest.approx(1.0) and ev.n_truth == len(perfect) >= 4
    assert ev.pixel is not None and ev.pixel.iou == pytest.approx(1.0, abs=1e-6)
    # a chip's answer never matches another chip's truth: the same answers under swapped chip ids score 0
    swapped = perfect.assign(chip_id=perfect.chip_id.map(dict(zip(chips.chip_id, chips.chip_id[::-1], strict=True))))
    assert evaluate_chipwise(swapped, truth, chips).tp == 0
    # the whole chip as one field: at most one match per chip, far below the perfect answer
    whole = evaluate_chipwise(whole_chip_baseline(chips), truth, chips)
    assert whole.n_pred == 4 and whole.tp <= 4 and whole.f1 < 0.6
    # a shrunken copy of each field still matches (IoU 0.81 > 0.5), a tiny square never does
    shrunk = perfect.assign(geometry=perfect.geometry.scale(0.9, 0.9))
    assert evaluate_chipwise(shrunk, truth, chips).f1 == pytest.approx(1.0)
    dots = perfect.assign(geometry=[shapely.box(*g.centroid.buffer(3).bounds) for g in perfect.geometry])
    assert evaluate_chipwise(dots, truth, chips).tp == 0


def test_segmentation_baseline_finds_fields_from_the_time_series(scene: Path) -> None:
    stack = open_stack(str(scene / "stack"), masks=str(scene / "cloud_mask"))
    chips = chip_grid(stack, 32, 32)
    seg = segmentation_baseline(stack, chips)
    assert set(seg.chip_id) <= set(chips.chip_id) and len(seg) >= 4
    truth = _fields(scene)
    ev = evaluate_chipwise(seg, truth, chips)
    whole = evaluate_chipwise(whole_chip_baseline(chips), truth, chips)
    assert ev.tp >= 1 and ev.recall > whole.recall


def test_stage_climatology_predicts_by_day_of_year(scene: Path) -> None:
    stages = pd.read_csv(scene / "truth" / "stages.csv", dtype=str)
    clim = stage_climatology([stages], bin_days=10)
    assert set(clim["class"]) == {"any"} and clim.stage.isin(["dormant", "green-up", "peak", "senescence",
                                                               "harvested"]).all()
    pred = predict_climatology(stages, clim, bin_days=10)
    assert len(pred) == len(stages)
    acc = (pred.stage.to_numpy() == stages.stage.to_numpy()).mean()
    # a day-of-year rule gets part of a mixed-crop scene right, never all of it
    assert 0.2 < acc < 0.95
