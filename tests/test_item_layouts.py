"""``data.anyres`` / ``data.scales`` reach the model in training and come back the same in ``agrivlm infer``.

Tiny model: 4-px patches, pooling stride 2, so a 32-px frame is 16 visual tokens. AnyRes with 16-px tiles cuts a
32-px chip into a thumbnail and 2 × 2 tiles of 4 tokens each (20 per frame); scales ``[1.0, 0.5]`` give 16 + 4.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pytest
import torch
from train_helpers import curriculum_recipe, stage_yaml

from agrivlm.errors import ConfigError
from agrivlm.geo.coords import TimeAxis
from agrivlm.infer.batch import run_inference
from agrivlm.infer.generate import Predictor, Question, Visual
from agrivlm.infer.prompts import build_prompt, fields_question
from agrivlm.model import load_pretrained
from agrivlm.pipeline.inputs import AnyResConfig, item_layout, load_input_config
from agrivlm.train.config import load_stage_config
from agrivlm.train.data import Collator, RecordDataset, read_split, select_records
from agrivlm.train.trainer import run_stage

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LAYOUTS: dict[str, dict[str, Any]] = {
    "anyres": {"data.anyres": {"tile_size": 16, "max_tiles": 4}},
    "scales": {"data.scales": [1.0, 0.5]},
}


@pytest.fixture(scope="module")
def stage1(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    data = curriculum_recipe(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("layouts")
    s1 = run_stage(stage_yaml("stage1", tmp / "s1.yaml", {**_common(data, tmp / "s1")}), stage="stage1")
    return data, tmp, s1


def _common(data: Path, out: Path) -> dict[str, Any]:
    return {"output_dir": str(out), "data.roots": [str(data)], "train.max_steps": 2, "train.batch_size": 4,
            "train.save_every": 0, "train.torch_threads": 1, "train.progress": False, "train.eval_every": -1,
            "data.frames.num_frames": 2}


def _visual_tokens(batch: Any, processor: Any) -> int:
    ids = batch["input_ids"][0]
    return int((ids == processor.layout.video_token_id).sum())


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_a_layout_changes_the_visual_tokens_and_infer_cuts_the_same(
        stage1: tuple[Path, Path, Path], sample_root: Path, name: str) -> None:
    data, tmp, s1 = stage1
    cfg_path = stage_yaml("stage2", tmp / f"s2_{name}.yaml", {**_common(data, tmp / f"s2_{name}"),
                                                                "model.init_from": str(s1), **LAYOUTS[name]})
    cfg = load_stage_config(cfg_path)
    _, processor = load_pretrained(s1)
    records, _ = select_records(read_split(cfg.data.roots, "train"), cfg.data, 0, True)
    ds = RecordDataset(records[:2], cfg.data.frames, cfg.data.normalize.model_copy(update={"mode": "chip"}),
                       processor.vocab, 0)
    samples = [ds[0], ds[1]]
    plain = Collator(processor, True)(samples)
    layout = item_layout(cfg.data.anyres, cfg.data.scales)
    tiled = Collator(processor, True, layout)(samples)
    frames = 2
    assert samples[0].pixels.shape[-1] == 32
    assert _visual_tokens(plain, processor) == frames * 16
    assert _visual_tokens(tiled, processor) == frames * 20  # thumbnail + 4 tiles of 4, or 16 + 4
    assert tiled["pixel_values"].shape[0] == 2 * (5 if name == "anyres" else 2)
    # (u, v) of each item's tokens per frame: 4 per tile, 16 for the largest scale
    assert tiled["patch_positions"].shape[:2] == (tiled["pixel_values"].shape[0], 4 if name == "anyres" else 16)
    if name == "scales":  # the half-size copy is padded; its real size travels beside it
        assert tiled["image_sizes"].tolist()[:2] == [[32, 32], [16, 16]]
    # the answers, labels and position values are the plain batch's: only the visual tokens differ
    assert torch.equal(tiled["labels"][tiled["labels"] != -100], plain["labels"][plain["labels"] != -100])

    s2 = run_stage(cfg_path, stage="stage2")
    inputs, found = load_input_config(s2)
    assert found and (inputs.anyres == AnyResConfig(tile_size=16, max_tiles=4) if name == "anyres"
                      else inputs.scales == [1.0, 0.5])
    predictor = Predictor.load(s2, device="cpu", max_new_tokens=4)
    assert predictor.layout == layout
    out = tmp / f"{name}_fields.gpkg"
    run_inference([str(sample_root / "ndvi")], s2, out, task="fields", masks=[str(sample_root / "cloud_mask")],
                  overrides={"stride": 32}, batch_size=16, max_new_tokens=6, progress=False, threads=1)
    assert isinstance(gpd.read_file(out), gpd.GeoDataFrame)
    # infer's batch of a question has the training layout's token count for its frames
    t = int(inputs.min_frames)
    dates = np.datetime64("2021-05-01") + np.arange(t) * np.timedelta64(10, "D")
    visual = Visual(np.zeros((t, 1, 32, 32), np.float32), np.linspace(0, 1, t), dates, TimeAxis.from_dates(dates))
    q = Question(visual, build_prompt(fields_question(predictor.vocab).text, t))
    ((_, batch),) = predictor.encode([q], 1)
    assert _visual_tokens(batch, predictor.processor) == t * 20


def test_reconstruction_does_not_take_a_layout(stage1: tuple[Path, Path, Path]) -> None:
    data, tmp, s1 = stage1
    path = stage_yaml("stage2", tmp / "s2_rec.yaml", {**_common(data, tmp / "s2_rec"), "model.init_from": str(s1),
                                                       "reconstruction.enabled": True, **LAYOUTS["anyres"]})
    with pytest.raises(ConfigError, match="reconstruction"):
        load_stage_config(path)


def test_fast_slow_changes_the_frame_layout_and_travels_to_infer(stage1: tuple[Path, Path, Path]) -> None:
    from agrivlm.train.trainer import checkpoint_inputs

    data, tmp, s1 = stage1
    frames = {"data.frames.sampler": "fast_slow", "data.frames.num_fast": 2, "data.frames.num_slow": 2,
              "data.frames.slow_stride": 2, "data.frames.merge": "concat"}
    cfg = load_stage_config(stage_yaml("stage2", tmp / "s2_fs.yaml", {**_common(data, tmp / "s2_fs"),
                                                                      "model.init_from": str(s1), **frames}))
    _, processor = load_pretrained(s1)
    records, _ = select_records(read_split(cfg.data.roots, "train"), cfg.data, 0, True)
    ds = RecordDataset(records[:2], cfg.data.frames, cfg.data.normalize.model_copy(update={"mode": "chip"}),
                       processor.vocab, 0)
    sample = ds[0]
    n = len(records[0].record.chip.frame_dates)
    assert sample.is_fast.tolist() == [False, False, True, True]  # concat: the slow frames, then the fast ones
    chip = records[0].record.chip
    newest = chip.time_axis.to_norm(np.datetime64(chip.frame_dates[-1], "s"))
    assert sample.pixels.shape[0] == 4 and sample.frame_times[-1] == newest  # the newest date is the last fast frame
    assert n > 4
    batch = Collator(processor, True)([ds[0], ds[1]])
    assert batch["is_fast"].tolist() == [[False, False, True, True]] * 2
    saved = checkpoint_inputs(cfg, None, records).frames
    assert (saved.sampler, saved.num_fast, saved.num_slow, saved.slow_stride, saved.merge) == (
        "fast_slow", 2, 2, 2, "concat")
    # the sampler `agrivlm infer` gets is the one training drew with: the same frames of every record length
    from agrivlm.pipeline.frames import select_indices
    from agrivlm.train.data import choose_frames

    for length in (4, 7, n, 3 * n):
        days = np.arange(length).astype("datetime64[D]")
        trained, asked = choose_frames(length, cfg.data.frames, None), select_indices(days, saved)
        assert all(np.array_equal(a, b) for a, b in zip(trained, asked, strict=True)), length
