"""`agrivlm train default` end to end at a toy size, its float16 install, and `--model default`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from agrivlm import resources
from agrivlm.default_checkpoint import DEFAULT_MODEL_DIR, resolve_model
from agrivlm.errors import ConfigError
from agrivlm.train.default import (
    DefaultTraining,
    install,
    model_overrides,
    phase_overrides,
    phases,
    recipe_text,
    run_default,
)


def test_default_training_runs_end_to_end_and_installs_in_half_precision(tmp_path: Path,
                                                                         one_torch_thread: None) -> None:
    opts = DefaultTraining(scenes_per_region=1, steps={"stage1": 2, "stage2": 2, "stage3_focus": 2, "stage3": 4,
                                                       "stage3_fields": 2},
                           snapshot_every=2, threads=1, num_frames=4, encoder_steps=3, train_vision=False,
                           point_features=True)
    final = run_default(tmp_path / "run", opts, echo=lambda _: None)
    assert (final / "config.json").is_file() and (final / "README.md").is_file()
    card = json.loads((final / "default_training.json").read_text())
    assert card["options"]["scenes_per_region"] == 1 and card["seconds"] > 0
    # the step time of every phase, read from its log, so a resumed run still tells what the checkpoint cost
    assert set(card["phase_step_seconds"]) == {"encoder", "stage1", "stage2", "stage3_focus", "stage3",
                                               "stage3_fields"}
    assert card["step_seconds"] > 0
    assert card["step_seconds"] == pytest.approx(sum(card["phase_step_seconds"].values()), abs=0.2)
    assert final == tmp_path / "run" / "train" / "stage3_fields" / "final"
    snaps = sorted(p.name for p in (tmp_path / "run" / "train" / "stage3" / "snapshots").iterdir())
    assert snaps == ["step-000002", "step-000004"]
    # stage 3 closes with the fields phase (the point questions, the timeline replayed) from the mixture's weights
    info = json.loads((final / "stage_info.json").read_text())
    assert info["stage"] == "stage3"
    assert Path(info["config"]["model"]["init_from"]) == tmp_path / "run" / "train" / "stage3" / "final"
    fields_data = json.loads((tmp_path / "run" / "data" / "stage3_fields" / "manifest.json").read_text())
    assert set(fields_data["counts"]["by_task"]) == {"field_boundaries/field_at_point", "growth_stages/stage_timeline"}
    # stage 3 opens with the focus phase (growth-stage questions alone) and goes on from its weights
    mixture = json.loads((tmp_path / "run" / "train" / "stage3" / "final" / "stage_info.json").read_text())
    focus = tmp_path / "run" / "train" / "stage3_focus" / "final"
    assert Path(mixture["config"]["model"]["init_from"]) == focus
    focus_data = json.loads((tmp_path / "run" / "data" / "stage3_focus" / "manifest.json").read_text())
    assert set(focus_data["counts"]["by_task"]) == {"growth_stages/stage_timeline"}
    # the checkpoint asks growth as a timeline, each question seeing its field's box only, as it was trained
    inputs = yaml.safe_load((final / "agrivlm_inputs.yaml").read_text())
    assert (inputs["growth_prompt"], inputs["growth_focus"]) == ("timeline", "box")
    assert (inputs["fields_prompt"], inputs["point_marker"]) == ("points", "none")
    # the recipe trains on the sample's train blocks only: its test blocks stay unseen
    manifest = json.loads((tmp_path / "run" / "data" / "stage3" / "manifest.json").read_text())
    trained = {c for c in manifest["chips"]["by_split"]["train"] if c.startswith("sample/")}
    tested = {c for c in manifest["chips"]["by_split"]["test"] if c.startswith("sample/")}
    assert trained and tested and not trained & tested
    # the encoder phase: pre-trained on the scenes the recipes deal to train, scored on those dealt to val, and
    # stage 1 starts from it (its vision encoder is frozen there, so stage 1's weights are the encoder's)
    pre = json.loads((tmp_path / "run" / "train" / "encoder" / "pretrain.json").read_text())
    assert len(pre["scenes"]) == 2 and len(pre["val_scenes"]) == 1 and pre["steps"] == 3
    encoder = load_file(tmp_path / "run" / "train" / "encoder" / "model.safetensors")
    stage1 = load_file(tmp_path / "run" / "train" / "stage1" / "final" / "model.safetensors")
    key = "encoder.layers.0.self_attn.q_proj.weight"
    assert torch.equal(stage1[f"vision_tower.{key}"], encoder[key])
    # --no-train-vision: the pre-trained encoder stays frozen through stage 3; --point-features reaches the model
    assert torch.equal(load_file(final / "model.safetensors")[f"vision_tower.{key}"], encoder[key])
    assert json.loads((final / "config.json").read_text())["point_features"] is True
    # a second run finds everything done and trains nothing again
    stamp = (final / "model.safetensors").stat().st_mtime_ns
    run_default(tmp_path / "run", opts, echo=lambda _: None)
    assert (final / "model.safetensors").stat().st_mtime_ns == stamp
    # install: the same folder with float16 weights, which load and generate
    target = install(final, tmp_path / "installed")
    full, half = load_file(final / "model.safetensors"), load_file(target / "model.safetensors")
    assert full.keys() == half.keys()
    assert all(half[k].dtype == torch.float16 for k in half if full[k].is_floating_point())
    assert (target / "model.safetensors").stat().st_size < 0.6 * (final / "model.safetensors").stat().st_size
    from agrivlm.model import load_pretrained

    model, _processor = load_pretrained(target)
    assert model is not None


def test_stage3_trains_the_vision_encoder_unless_told_not_to(tmp_path: Path) -> None:
    args = (tmp_path / "data", tmp_path / "out", tmp_path / "prev")
    assert phase_overrides("stage3", DefaultTraining(), *args)["trainable.vision"] is True
    assert phase_overrides("stage3", DefaultTraining(train_vision=False), *args)["trainable.vision"] is False
    assert phase_overrides("stage2", DefaultTraining(), *args)["trainable.vision"] is False
    assert model_overrides(DefaultTraining(), None) == {}
    assert model_overrides(DefaultTraining(point_features=True), tmp_path) == {
        "vision.checkpoint": str(tmp_path.resolve()), "lape.point_features": True}


def test_recipe_keeps_corn_belt_out_and_draws_steps_times_batch() -> None:
    opts = DefaultTraining()
    text = recipe_text("stage3", "/x/scenes/*", opts)
    assert "corn_belt" not in text and "/x/scenes/*" in text
    assert f"train: {opts.steps['stage3'] * opts.batch_size}" in text
    # points_per_record (6 by default) reaches the field_at_point task of the recipes that ask it, and only those
    assert "points_per_record: 6" in text and "points_per_record: 6" in recipe_text("stage3_fields", "/x/*", opts)
    assert "points_per_record" not in recipe_text("stage2", "/x/*", opts)
    single = DefaultTraining(points_per_record=1)
    assert "points_per_record" not in recipe_text("stage3", "/x/scenes/*", single)


def test_timeline_dates_reach_the_stage3_recipes_that_ask_timelines_and_build_them() -> None:
    assert DefaultTraining().timeline_dates == "season"  # the shipped checkpoint's rule
    frames = DefaultTraining(timeline_dates="frames")
    for stage in ("stage3_focus", "stage3", "stage3_fields"):
        for opts in (DefaultTraining(), frames):
            growth = yaml.safe_load(recipe_text(stage, "/x/*", opts))["tasks"]["growth_stages"]
            assert growth["timeline_dates"] == opts.timeline_dates, stage
            # the recipe's own growth tasks stay as they were
            base = yaml.safe_load(resources.recipe(f"synthetic_{stage}").read_text())["tasks"]["growth_stages"]
            assert {k: v for k, v in growth.items() if k != "timeline_dates"} == base
    # stage 2 asks growth questions too, but its recipe is the shared warm-up: untouched
    assert "timeline_dates" not in recipe_text("stage2", "/x/*", frames)
    # the recipe loads: the key is one the growth family knows
    from agrivlm.recipes.config import GrowthStagesConfig

    assert GrowthStagesConfig(**yaml.safe_load(recipe_text("stage3", "/x/*", frames))["tasks"]["growth_stages"])\
        .timeline_dates == "frames"


def test_phases_skip_an_unset_focus_and_refuse_a_missing_stage() -> None:
    assert phases(DefaultTraining()) == ["stage1", "stage2", "stage3_focus", "stage3", "stage3_fields"]
    without_fields = DefaultTraining(steps={**DefaultTraining().steps, "stage3_fields": 0})
    assert phases(without_fields) == ["stage1", "stage2", "stage3_focus", "stage3"]
    assert phases(DefaultTraining(steps={"stage1": 1, "stage2": 1, "stage3": 1})) == ["stage1", "stage2", "stage3"]
    with pytest.raises(ConfigError, match="stage2 needs steps"):
        phases(DefaultTraining(steps={"stage1": 1, "stage3": 1}))


def test_model_default_names_the_shipped_checkpoint(tmp_path: Path) -> None:
    assert resolve_model(tmp_path) == tmp_path
    if (DEFAULT_MODEL_DIR / "config.json").is_file():
        assert resolve_model("default") == DEFAULT_MODEL_DIR
    else:
        with pytest.raises(ConfigError, match="agrivlm train default"):
            resolve_model("default")
