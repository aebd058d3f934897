"""The faster-video stream (LLaVA-NeXT-Video's ``add_faster_video``): token layout, LAPE positions, training, infer.

With ``pooling.faster_video_stride: k`` every ``k``-th frame keeps the pooled grid, the frames between are pooled
twice as coarsely, and each frame ends with a learned separator; the processor expands each placeholder to
exactly the tokens the model makes, the trainer trains the separator with the projector, and ``agrivlm infer``
reads a checkpoint trained so.
"""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import pytest
import torch
from train_helpers import ask_sample_fields, curriculum_recipe, quick_run, stage_yaml

from agrivlm.errors import ConfigError
from agrivlm.geo import Chip, ChipStream, open_stack
from agrivlm.lape.embedding import cell_centres, token_transfer
from agrivlm.lape.tokens import Axis
from agrivlm.model import build_model, load_pretrained
from agrivlm.model.builders import TINY_CONFIG, load_model_settings
from agrivlm.pipeline.frames import FrameSamplingConfig
from agrivlm.pipeline.inputs import AnyResConfig, ChipInputConfig, frame_token_counts, num_visual_tokens
from agrivlm.train.trainer import run_stage

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SAMPLING = FrameSamplingConfig(max_frames=5, empty="drop", clouds_as_nodata=True)


def test_frame_token_counts() -> None:
    assert frame_token_counts(4, (4, 4)) == [16] * 4
    # frames 0 and 3 slow (16 + separator), the others 2 x 2 + separator
    assert frame_token_counts(5, (4, 4), 3) == [17, 5, 5, 17, 5]
    assert frame_token_counts(3, (5, 3), 1) == [16, 16, 16]  # every frame slow: separators only
    assert frame_token_counts(2, (5, 3), 2) == [16, 7]  # a 5 x 3 grid pools to ceil: 3 x 2
    assert num_visual_tokens(8, 32, 32, 4, 2, 4) == 2 * 17 + 6 * 5
    with pytest.raises(ValueError, match="faster_video_stride"):
        frame_token_counts(2, (4, 4), -1)


@pytest.fixture(scope="module")
def faster():  # type: ignore[no-untyped-def]
    settings = load_model_settings(TINY_CONFIG, {"pooling.faster_video_stride": 3})
    model, proc = build_model(settings)
    proc.chip_config = ChipInputConfig(sampling=SAMPLING, bands={"preset": "ndvi"}).model_dump(mode="json")
    return model.eval(), proc


@pytest.fixture(scope="module")
def chips(sample_root: Path) -> list[Chip]:
    stack = open_stack(sample_root / "ndvi", masks=sample_root / "cloud_mask")
    return sorted(ChipStream(stack, chip_size=32, stride=32), key=lambda c: c.index)[:2]


def test_placeholders_hold_the_slow_fast_and_separator_tokens_the_model_makes(faster, chips: list[Chip]) -> None:
    model, proc = faster
    assert proc.faster_video_stride == model.config.faster_video_stride == 3
    out = proc.from_chips(chips, ["<video> Where are the fields?", "<video> Stage?"], answers=["a", "b"])
    b = out.batch
    n, t = b["pixel_values"].shape[:2]
    assert (n, t) == (2, 5)
    visual = (b["input_ids"] == model.config.video_token_id).sum(dim=1)
    assert visual.tolist() == [2 * 17 + 3 * 5] * 2  # 8 x 8 patches → 4 x 4 slow, 2 x 2 fast cells
    with torch.no_grad():
        feats = model.get_visual_features(b["pixel_values"], b["frame_times"], None, b["patch_positions"])
        loss = model(**b).loss
    assert feats.shape[:2] == (2, 49) and torch.isfinite(loss)
    # the separator closes every frame: the model's parameter, the same in every item
    ends = [16, 21, 26, 43, 48]
    for e in ends:
        torch.testing.assert_close(feats[:, e], model.faster_token.detach().expand(2, -1))
    # the slow frames are today's tokens of those frames, bit for bit
    stride = model.config.faster_video_stride
    try:
        model.config.faster_video_stride = 0
        with torch.no_grad():
            plain = model.get_visual_features(b["pixel_values"], b["frame_times"], None, b["patch_positions"])
    finally:
        model.config.faster_video_stride = stride
    plain = plain.reshape(2, 5, 16, -1)
    assert torch.equal(feats[:, :16], plain[:, 0]) and torch.equal(feats[:, 27:43], plain[:, 3])


@pytest.mark.parametrize("layout", ["chip", "thumbnail"])
def test_fast_tokens_sit_at_the_centres_of_their_coarse_cells(faster, chips: list[Chip], layout: str) -> None:
    """The LAPE positions added to a fast frame's tokens are the centres of its 2 x 2 cells of the chip.

    Given ``patch_positions`` (the thumbnail of AnyRes, a whole-chip item) they are the slow cells' positions
    averaged per block, which on the whole chip are the same centres.
    """
    model, proc = faster
    kw = {"anyres": AnyResConfig(tile_size=16, max_tiles=4)} if layout == "thumbnail" else {}
    b = proc.from_chips(chips[0], "<video>", **kw).batch
    positions = b["patch_positions"] if layout == "thumbnail" else None
    cfg = model.config
    with torch.no_grad():
        full = model.get_visual_features(b["pixel_values"], b["frame_times"], None, positions)
        scale = cfg.spatial_injection_scale
        try:
            cfg.spatial_injection_scale = 0.0
            no_space = model.get_visual_features(b["pixel_values"], b["frame_times"], None, positions)
        finally:
            cfg.spatial_injection_scale = scale
        tables = model.lape.input_tables_by_axis()
    side = 8 if layout == "chip" else 4  # the thumbnail is 16 px: 4 x 4 patches
    centres = cell_centres(side, 2 * cfg.pool_stride)
    want = (token_transfer(tables[Axis.HEIGHT], centres)[:, None] + token_transfer(tables[Axis.WIDTH], centres)[None])
    slow = (side // 2) ** 2
    first_fast = slow + 1  # after frame 0's slow tokens and its separator
    added = (full - no_space)[0, first_fast:first_fast + want.shape[0] * want.shape[1]]
    torch.testing.assert_close(added, scale * want.reshape(-1, want.shape[-1]), rtol=0, atol=2e-5)


def test_trained_with_the_faster_stream_and_asked_by_infer(tmp_path_factory: pytest.TempPathFactory,
                                                            sample_root: Path) -> None:
    data = curriculum_recipe(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("faster_video")
    common = quick_run(data, tmp / "s1", 3, **{"optim.warmup_steps": 0, "optim.lr": 1e-2,
                                               "model.overrides": {"pooling.faster_video_stride": 2}})
    built, _ = build_model(load_model_settings(TINY_CONFIG, {"pooling.faster_video_stride": 2}))
    s1 = run_stage(stage_yaml("stage1", tmp / "s1.yaml", common), stage="stage1")
    model, proc = load_pretrained(s1)
    assert model.config.faster_video_stride == 2 and proc.faster_video_stride == 2
    # stage 1 trains the connector, the separator with it
    assert not torch.equal(model.faster_token.detach(), built.faster_token.detach())
    # stage 2 (LAPE on) from it: a checkpoint that answers with positions
    c2 = {**common, "output_dir": str(tmp / "s2"), "model.overrides": {}, "model.init_from": str(s1)}
    s2 = run_stage(stage_yaml("stage2", tmp / "s2.yaml", c2), stage="stage2")
    assert isinstance(ask_sample_fields(s2, sample_root, tmp / "fields.gpkg"), gpd.GeoDataFrame)
    # the next-frame loss reads one grid per frame: refused with the faster stream, naming both keys
    c2 = stage_yaml("stage2", tmp / "s2_rec.yaml", {**common, "output_dir": str(tmp / "s2_rec"),
                                                    "model.overrides": {}, "model.init_from": str(s1),
                                                    "reconstruction.enabled": True})
    with pytest.raises(ConfigError, match="faster_video_stride"):
        run_stage(c2, stage="stage2")
