"""NaViT-style packing (``vision.packing``): items of different sizes share packed encoder sequences.

Each frame's patches attend only to each other (a block-diagonal mask), so packing changes how the encoder is
called, not what it computes: the features and gradients equal one encoder call per size.
"""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import torch
from train_helpers import ask_sample_fields, curriculum_recipe, quick_run, stage_yaml

from agrivlm.errors import ConfigError
from agrivlm.geo import Chip, ChipStream, open_stack
from agrivlm.model import build_model, load_pretrained
from agrivlm.model.builders import TINY_CONFIG, load_model_settings
from agrivlm.model.modeling import _packs
from agrivlm.pipeline.frames import FrameSamplingConfig
from agrivlm.pipeline.inputs import ChipInputConfig, item_layout, load_input_config, navit_size
from agrivlm.train.trainer import run_stage

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_packs_fill_the_budget_in_order() -> None:
    assert _packs([64, 36, 16, 64, 36], 100) == [[0, 1], [2, 3], [4]]
    assert _packs([150, 10, 10], 100) == [[0], [1, 2]]  # a frame over the budget goes alone
    assert _packs([], 100) == []


@pytest.fixture(scope="module")
def packed():  # type: ignore[no-untyped-def]
    model, proc = build_model(load_model_settings(TINY_CONFIG, {"vision.packing": True, "vision.pack_tokens": 120}))
    proc.chip_config = ChipInputConfig(sampling=FrameSamplingConfig(max_frames=3, empty="drop", clouds_as_nodata=True),
                                       bands={"preset": "ndvi"}).model_dump(mode="json")
    return model, proc


@pytest.fixture(scope="module")
def chips(sample_root: Path) -> list[Chip]:
    stack = open_stack(sample_root / "ndvi", masks=sample_root / "cloud_mask")
    return sorted(ChipStream(stack, chip_size=32, stride=32), key=lambda c: c.index)[:2]


def _features(model, batch) -> torch.Tensor:  # type: ignore[no-untyped-def]
    parts = model.get_visual_features_by_size(batch["pixel_values"], batch["image_sizes"], batch["frame_times"],
                                              None, batch["patch_positions"])
    return torch.cat(parts)


@pytest.mark.parametrize("budget", [1, 120, 10_000])
def test_packed_features_equal_one_encoder_call_per_size(packed, chips: list[Chip], budget: int) -> None:
    model, proc = packed
    b = proc.from_chips(chips, ["<video> Where?", "<video> Stage?"], scales=(1.0, 0.75, 0.5)).batch
    assert sorted({tuple(s) for s in b["image_sizes"].tolist()}) == [(16, 16), (24, 24), (32, 32)]
    model.eval()
    try:
        model.config.vision_pack_tokens = budget  # 1: every frame alone; 10,000: all 18 frames in one sequence
        with torch.no_grad():
            together = _features(model, b)
        model.config.vision_packing = False
        with torch.no_grad():
            alone = _features(model, b)
    finally:
        model.config.vision_packing, model.config.vision_pack_tokens = True, 120
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_a_frame_attends_only_to_itself_in_a_pack(packed) -> None:  # type: ignore[no-untyped-def]
    model, _ = packed
    model.eval()
    gen = torch.Generator().manual_seed(0)
    big, small = torch.rand(2, 1, 32, 32, generator=gen), torch.rand(3, 1, 16, 16, generator=gen)
    model.config.vision_pack_tokens = 10_000  # all five frames in one sequence
    try:
        with torch.no_grad():
            before = model.encode_packed([big, small])
            changed = small.clone()
            changed[1] = torch.rand(1, 16, 16, generator=gen)
            after = model.encode_packed([big, changed])
    finally:
        model.config.vision_pack_tokens = 120
    assert torch.equal(before[0], after[0])  # the other frames of the pack did not see the change
    assert torch.equal(before[1][[0, 2]], after[1][[0, 2]])
    assert (before[1][1] - after[1][1]).abs().max() > 1e-3


def test_packed_training_step_gives_the_same_loss_and_gradients(packed, chips: list[Chip]) -> None:
    model, proc = packed
    b = proc.from_chips(chips, ["<video> Where?", "<video> Stage?"], answers=["here", "tillering"],
                        scales=(1.0, 0.5)).batch
    model.eval()  # the projector's batch norm in running mode: the same normalisation both ways

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad()
        loss = model(**b).loss
        loss.backward()
        return loss.detach(), model.band_adapter.weight.grad.detach().clone()

    loss_packed, grad_packed = step()
    model.config.vision_packing = False
    try:
        loss_alone, grad_alone = step()
    finally:
        model.config.vision_packing = True
        model.zero_grad()
    torch.testing.assert_close(loss_packed, loss_alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_packed, grad_alone, rtol=1e-3, atol=1e-6)


def test_packing_needs_a_siglip_encoder_read_at_its_last_layer() -> None:
    with pytest.raises(ConfigError, match="vision_packing"):
        build_model(load_model_settings(TINY_CONFIG, {"vision.packing": True, "vision.type": "clip"}))
    with pytest.raises(ConfigError, match="vision_packing"):
        build_model(load_model_settings(TINY_CONFIG, {"vision.packing": True, "vision.feature_layer": -2}))


def test_navit_size_keeps_the_aspect_ratio_within_the_budget() -> None:
    assert navit_size(32, 32, 4, 64) == (32, 32)
    assert navit_size(64, 48, 4, 64) == (36, 24)  # 9 x 6 patches, 3 : 2 as the chip
    assert navit_size(16, 16, 4, 64) == (32, 32)  # small chips grow to the budget
    assert navit_size(32, 48, 4, 24) == (16, 24)
    assert navit_size(4, 400, 4, 10) == (4, 40)  # at least one patch a side
    for h, w, budget in [(33, 57, 20), (100, 7, 5), (64, 64, 1)]:
        rh, rw = navit_size(h, w, 4, budget)
        assert rh % 4 == 0 and rw % 4 == 0 and (rh // 4) * (rw // 4) <= budget


def test_dynamic_resolution_resizes_items_to_the_budget(packed) -> None:  # type: ignore[no-untyped-def]
    _, proc = packed
    frames = [np.random.default_rng(0).random((3, 1, 32, 48)).astype(np.float32),
              np.random.default_rng(1).random((3, 1, 32, 32)).astype(np.float32)]
    b = proc.from_frames(["<video> Where?", "<video> Stage?"], frames, item_layout(None, None, 24))
    assert b["image_sizes"].tolist() == [[16, 24], [16, 16]]  # 4 x 6 and 4 x 4 patches (budget 24)
    visual = (b["input_ids"] == proc.layout.video_token_id).sum(dim=1)
    assert visual.tolist() == [3 * 2 * 3, 3 * 2 * 2]  # pooled by 2: 2 x 3 and 2 x 2 tokens per frame
    with pytest.raises(ValueError, match="max_patches"):
        item_layout(None, [1.0, 0.5], 24)


def test_trained_with_packing_and_a_token_budget_and_asked_by_infer(tmp_path_factory: pytest.TempPathFactory,
                                                                     sample_root: Path) -> None:
    data = curriculum_recipe(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("navit")
    common = quick_run(data, tmp / "s1")
    s1 = run_stage(stage_yaml("stage1", tmp / "s1.yaml", {**common, "output_dir": str(tmp / "s1"),
                                                           "model.overrides": {"vision.packing": True}}),
                   stage="stage1")
    s2 = run_stage(stage_yaml("stage2", tmp / "s2.yaml", {**common, "output_dir": str(tmp / "s2"),
                                                           "model.init_from": str(s1), "data.max_patches": 16}),
                   stage="stage2")
    inputs, found = load_input_config(s2)
    assert found and inputs.max_patches == 16
    model, _ = load_pretrained(s2)
    assert model.config.vision_packing
    assert isinstance(ask_sample_fields(s2, sample_root, tmp / "fields.gpkg"), gpd.GeoDataFrame)
