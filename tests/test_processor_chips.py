"""``AgriVLMProcessor.from_chips`` on real chips of the embedded sample: shapes, counts, dates, geography."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from agrivlm.errors import ConfigError, PipelineError
from agrivlm.geo import Chip, ChipStream, TimeAxis, open_stack
from agrivlm.lape.embedding import cell_centres as lape_cell_centres
from agrivlm.lape.tokens import LapeVocab
from agrivlm.model.processing import AgriVLMProcessor
from agrivlm.model.tokenizer import add_agrivlm_tokens, default_tokenizer
from agrivlm.pipeline.anyres import anyres_tiles, token_positions
from agrivlm.pipeline.bands import fill_nodata, prepare_bands
from agrivlm.pipeline.frames import FrameSamplingConfig, sample_frames
from agrivlm.pipeline.inputs import (
    AnyResConfig,
    BandConfig,
    ChipInputConfig,
    InputConfig,
    num_visual_tokens,
    visual_token_centres,
)

#: Four frames from the dates with data, clouds as no data: what a caller would feed the model.
SAMPLING = FrameSamplingConfig(max_frames=4, empty="drop", clouds_as_nodata=True)


@pytest.fixture(scope="module")
def processor() -> AgriVLMProcessor:
    tok = default_tokenizer()
    add_agrivlm_tokens(tok, LapeVocab())
    return AgriVLMProcessor(tokenizer=tok, patch_size=4, pool_stride=2, num_bands=1,
                            chip_config={"sampling": SAMPLING.model_dump(), "bands": {"preset": "ndvi"}})


@pytest.fixture(scope="module")
def chips32(sample_root: Path) -> list[Chip]:
    stack = open_stack(sample_root / "ndvi", masks=sample_root / "cloud_mask")
    return sorted(ChipStream(stack, chip_size=32, stride=32), key=lambda c: c.index)[:3]


@pytest.fixture(scope="module")
def offset_chip(sample_root: Path) -> Chip:
    """The sample's bottom-right 64 px chip: window offset (row 37, col 36) on the stack."""
    stack = open_stack(sample_root / "ndvi", masks=sample_root / "cloud_mask")
    chip = sorted(ChipStream(stack, chip_size=64, stride=32), key=lambda c: c.index)[-1]
    assert (chip.window.row_off, chip.window.col_off) == (37, 36)
    return chip


def _count(batch, processor: AgriVLMProcessor, b: int) -> int:  # type: ignore[no-untyped-def]
    ids = batch["input_ids"][b]
    return int(((ids == processor.layout.video_token_id) | (ids == processor.layout.image_token_id)).sum())


def test_plain_chips_shapes_counts_values_and_dates(processor: AgriVLMProcessor, chips32: list[Chip]) -> None:
    out = processor.from_chips(chips32[:2], ["<video> Box of the field?", "When did <video> green up?"],
                               answers=["a", "b"])
    b = out.batch
    assert b["pixel_values"].shape == (2, 4, 1, 32, 32) and b["pixel_values"].dtype == torch.float32
    assert b["patch_positions"].shape == (2, 16, 2) and "image_sizes" not in b
    assert b["frame_times"].shape == (2, 4) and b["labels"].shape == b["input_ids"].shape
    for i in range(2):
        assert _count(b, processor, i) == num_visual_tokens(4, 32, 32, 4, 2) == 64
    assert [it.kind for it in out.items] == ["chip", "chip"] and [g.items for g in out.chips] == [(0,), (1,)]
    assert [g.sample for g in out.chips] == [0, 1]
    had_nodata = []
    for c, (chip, geo) in enumerate(zip(chips32, out.chips, strict=False)):
        frames = sample_frames(chip, SAMPLING)
        # dates kept: the sampler's frames, their dates from the chip's own date axis, increasing
        np.testing.assert_array_equal(geo.frame_indices, frames.indices)
        np.testing.assert_array_equal(geo.frame_dates, chip.times[frames.indices].astype("datetime64[us]"))
        assert np.all(np.diff(geo.frame_dates.astype(np.int64)) > 0)
        # t on the calendar years of the usable dates the sampler drew from (as training and `agrivlm infer`):
        # seconds since January 1 of the first one's year over the whole years
        assert geo.time_axis == frames.time_axis == TimeAxis.of_seasons(geo.frame_dates)
        start = geo.frame_dates[0].astype("datetime64[Y]").astype("datetime64[us]")
        end = (geo.frame_dates[-1].astype("datetime64[Y]") + 1).astype("datetime64[us]")
        np.testing.assert_allclose(geo.frame_t, (geo.frame_dates - start) / (end - start), rtol=0, atol=1e-12)
        np.testing.assert_allclose(b["frame_times"][c].numpy(), geo.frame_t, atol=1e-7)
        np.testing.assert_array_equal(geo.to_dates(geo.frame_t), geo.frame_dates)
        # pixels: bands scaled with the ndvi preset and per-chip percentiles, no data → 0
        want, stats = prepare_bands(frames.pixels, "ndvi", times=frames.times)
        np.testing.assert_array_equal(b["pixel_values"][c].numpy(), fill_nodata(want)[0])
        np.testing.assert_array_equal(geo.stats.low, stats.low)  # type: ignore[union-attr]
        had_nodata.append(bool(np.isnan(frames.pixels).any()))
        # positions: the pooled cells of the whole chip
        np.testing.assert_array_equal(b["patch_positions"][c].numpy(),
                                      visual_token_centres(32, 32, 4, 2).astype(np.float32))
        np.testing.assert_allclose(np.stack(geo.to_crs([0, 1], [0, 1]), 1), chip.grid.corners()[[0, 2]], atol=1e-9)
    assert any(had_nodata), "the sample's clouds give no-data pixels to fill"
    assert float(b["pixel_values"].min()) >= 0.0 and float(b["pixel_values"].max()) <= 1.0


def test_frame_indices_of_a_record_replace_the_sampler(processor: AgriVLMProcessor, chips32: list[Chip]) -> None:
    chip = chips32[0]
    usable = [i for i in range(len(chip.times)) if (~chip.mask[i]).any()][:20]
    picked = [usable[1], usable[5], usable[9], usable[19]]
    out = processor.from_chips(chip, "<video>", frame_indices=[picked])
    geo = out.chips[0]
    np.testing.assert_array_equal(geo.frame_indices, picked)
    np.testing.assert_array_equal(geo.frame_dates, chip.times[picked].astype("datetime64[us]"))
    # on the record's time axis: the calendar years of its frames, not their own range
    axis = TimeAxis.of_seasons(chip.times[picked])
    np.testing.assert_allclose(geo.frame_t, axis.to_norm(chip.times[picked]), atol=1e-12)
    assert 0.0 < geo.frame_t[0] and geo.frame_t[-1] < 1.0
    with pytest.raises(PipelineError, match="must be increasing indices"):
        processor.from_chips(chip, "<video>", frame_indices=[[5, 3]])


def test_anyres_tiles_map_to_the_right_map_coordinates(processor: AgriVLMProcessor, offset_chip: Chip,
                                                       sample_root: Path) -> None:
    chip = offset_chip
    out = processor.from_chips(chip, "<video> Outline the fields:", anyres=AnyResConfig(tile_size=32, max_tiles=4))
    b, geo = out.batch, out.chips[0]
    assert geo.grid_shape == (2, 2)
    assert b["pixel_values"].shape == (5, 4, 1, 32, 32)
    assert [it.kind for it in out.items] == ["thumbnail", "tile", "tile", "tile", "tile"]
    assert _count(b, processor, 0) == 5 * num_visual_tokens(4, 32, 32, 4, 2) == 320
    # the same tiles, cut independently from the same prepared frames
    frames = sample_frames(chip, SAMPLING)
    prepared, _ = prepare_bands(frames.pixels, "ndvi", times=frames.times)
    tiles = anyres_tiles(prepared, chip.grid, tile_size=32, max_tiles=4)
    np.testing.assert_array_equal(b["pixel_values"].numpy(), fill_nodata(tiles.pixels.numpy())[0])
    with rasterio.open(sample_root / "ndvi" / chip.files[0]) as ds:
        stack_transform = ds.transform
    for k, item in enumerate(out.items):
        w = item.window
        # corners of the item, through its own grid, are the source raster's pixel edges at chip + tile offset
        col0, row0 = chip.window.col_off + w.col_off, chip.window.row_off + w.row_off
        corners = [(0, 0), (w.width, 0), (w.width, w.height), (0, w.height)]
        want = np.array([stack_transform * (col0 + dc, row0 + dr) for dc, dr in corners])
        got = np.stack(item.to_crs([0, 1, 1, 0], [0, 0, 1, 1]), axis=1)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        # tile-normalized corners → chip-normalized: the window's edges over the chip's 64 px
        cu, cv = item.to_chip([0, 1], [0, 1])
        np.testing.assert_allclose(cu, [w.col_off / 64, (w.col_off + w.width) / 64], atol=1e-12)
        np.testing.assert_allclose(cv, [w.row_off / 64, (w.row_off + w.height) / 64], atol=1e-12)
        np.testing.assert_allclose(np.stack(item.to_chip(0.3, 0.7)), np.stack(tiles.to_chip(k, 0.3, 0.7)), atol=1e-12)
        # the injection positions of its tokens are token_positions in chip coordinates
        u, v = token_positions(tiles, k, (8, 8), stride=2, mode="average")
        np.testing.assert_array_equal(b["patch_positions"][k].numpy(), np.stack([u, v], 1).astype(np.float32))
    # the bottom-right tile's tokens sit in the chip's bottom-right quarter
    assert float(b["patch_positions"][4].min()) > 0.5
    # a decoded chip position goes to the map through the chip's grid, whatever the tiling
    np.testing.assert_allclose(np.stack(geo.to_crs(0.75, 0.25)), np.stack(out.items[2].to_crs(0.5, 0.5)), atol=1e-6)


def test_anyres_without_thumbnail(processor: AgriVLMProcessor, offset_chip: Chip) -> None:
    out = processor.from_chips(offset_chip, "<video>",
                               anyres=AnyResConfig(tile_size=32, max_tiles=4, thumbnail=False))
    assert [it.kind for it in out.items] == ["tile"] * 4 and out.batch["pixel_values"].shape[0] == 4


def test_multiscale_items_are_padded_with_their_sizes(processor: AgriVLMProcessor, chips32: list[Chip]) -> None:
    out = processor.from_chips(chips32[:2], ["<video> and <video>"], scales=(1.0, 0.75, 0.5, 0.6))
    b = out.batch
    sizes = [[32, 32], [24, 24], [16, 16], [20, 20]]  # 0.6·32 = 19.2 px → the nearest multiple of the patch, 20
    assert b["image_sizes"].tolist() == sizes * 2
    assert b["pixel_values"].shape == (8, 4, 1, 32, 32)
    per_frame = [16, 9, 4, 9]
    assert _count(b, processor, 0) == 2 * 4 * sum(per_frame)
    assert [it.token_grid for it in out.items[:4]] == [(4, 4), (3, 3), (2, 2), (3, 3)]
    chip = chips32[0]
    for k, ((h, w), p) in enumerate(zip(sizes, per_frame, strict=True)):
        item = out.items[k]
        assert item.kind == "scale" and (item.grid.height, item.grid.width) == (h, w)
        np.testing.assert_allclose(item.grid.corners(), chip.grid.corners(), atol=1e-6)  # same footprint
        assert item.grid.transform.a == pytest.approx(chip.grid.transform.a * 32 / w)
        assert torch.all(b["pixel_values"][k, :, :, h:] == 0) and torch.all(b["pixel_values"][k, :, :, :, w:] == 0)
        np.testing.assert_array_equal(b["patch_positions"][k, :p].numpy(),
                                      visual_token_centres(h, w, 4, 2).astype(np.float32))
        assert torch.isnan(b["patch_positions"][k, p:]).all()


def test_bad_chip_inputs_name_the_problem(processor: AgriVLMProcessor, chips32: list[Chip],
                                          sample_root: Path) -> None:
    chip = chips32[0]
    with pytest.raises(PipelineError, match="at least one chip"):
        processor.from_chips([], "no image")
    with pytest.raises(PipelineError, match="2 chips for 1 <image>/<video> placeholders"):
        processor.from_chips(chips32[:2], "<video>")
    with pytest.raises(PipelineError, match=r"anyres.tile_size: frames of 30x30 px are not a multiple"):
        processor.from_chips(chip, "<video>", anyres=AnyResConfig(tile_size=30, max_tiles=4))
    with pytest.raises(PipelineError, match="preset 'sentinel2_l2a' expects 12 bands"):
        processor.from_chips(chip, "<video>", bands="sentinel2_l2a")
    with pytest.raises(PipelineError, match=r"give \[3\] channels but the model takes num_bands=1"):
        processor.from_chips(chip, "<video>", bands=BandConfig(preset="ndvi", composite="ndvi_gray"))
    with pytest.raises(PipelineError, match=r"same number of frames, got r000000_c000000: 2, r000000_c000032: 4"):
        processor.from_chips(chips32[:2], ["<video> <video>"], frame_indices=[[0, 67], None])
    with pytest.raises(ValueError, match="<image> stands for one frame but chip 0 has 4 frames"):
        processor.from_chips(chip, "<image>")
    with pytest.raises(ValueError, match="either anyres or scales"):
        ChipInputConfig(anyres=AnyResConfig(tile_size=32), scales=[1.0])
    with pytest.raises(ValueError, match="unknown sensor preset 'landsat'"):
        BandConfig(preset="landsat")
    # one band class for the processor and a checkpoint's input settings: the processor needs its preset
    with pytest.raises(ValueError, match="bands needs a preset"):
        ChipInputConfig(bands=BandConfig())
    with pytest.raises(ValueError, match="composite 'ndvi_gray' needs a band preset"):
        InputConfig(bands=BandConfig(composite="ndvi_gray"))
    odd = next(iter(ChipStream(open_stack(sample_root / "ndvi"), chip_size=30)))
    with pytest.raises(PipelineError, match=r"chip r000000_c000000: set chip_config.size.*30x30 px"):
        processor.from_chips(odd, "<video>")
    resized = processor.from_chips(odd, "<video>", config=processor.chip_settings.model_copy(update={"size": 32}))
    assert resized.batch["pixel_values"].shape[-2:] == (32, 32)
    np.testing.assert_allclose(resized.items[0].grid.corners(), odd.grid.corners(), atol=1e-6)


def test_save_and_load_keep_the_chip_settings(processor: AgriVLMProcessor, offset_chip: Chip,
                                              tmp_path: Path) -> None:
    cfg = ChipInputConfig(sampling=FrameSamplingConfig(max_frames=3, empty="drop", uniform_by="time",
                                                       clouds_as_nodata=True),
                          bands=BandConfig(preset="ndvi", low=[0.1], high=[0.9]),
                          anyres=AnyResConfig(tile_size=32, max_tiles=4, thumbnail=False), fill_value=-1.0)
    proc = AgriVLMProcessor(tokenizer=processor.tokenizer, patch_size=4, pool_stride=2, pool_mode="bilinear",
                            chip_config=cfg)
    proc.save_pretrained(tmp_path)
    again = AgriVLMProcessor.from_pretrained(tmp_path)
    assert again.chip_settings == cfg and again.pool_mode == "bilinear"
    a, b = proc.from_chips(offset_chip, "<video>"), again.from_chips(offset_chip, "<video>")
    assert a.batch.keys() == b.batch.keys()
    for key in a.batch:
        assert torch.equal(a.batch[key], b.batch[key]), key
    assert a.chips[0].stats.low.tolist() == [0.1]  # type: ignore[union-attr]
    assert (a.batch["pixel_values"] == -1.0).any()  # clouds filled with the configured value
    # a folder saved before these settings existed loads with the defaults
    path = tmp_path / "processor_config.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in saved.items() if k not in ("pool_mode", "chip_config")}))
    old = AgriVLMProcessor.from_pretrained(tmp_path)
    assert old.pool_mode == "average" and old.chip_settings == ChipInputConfig()
    with pytest.raises(ConfigError, match="processor chip_config: anyres.tile: unknown key"):
        AgriVLMProcessor(tokenizer=processor.tokenizer, chip_config={"anyres": {"tile_size": 32, "tile": 3}})


@settings(max_examples=60, deadline=None)
@given(ph=st.integers(1, 12), pw=st.integers(1, 12), patch=st.sampled_from([1, 4, 14]), stride=st.integers(1, 4),
       mode=st.sampled_from(["average", "max", "bilinear"]))
def test_token_centres_are_the_models_grid_centres(ph: int, pw: int, patch: int, stride: int, mode: str) -> None:
    # the processor's positions for a whole-chip item are, in float32, exactly the centres the model's
    # default injection uses: the reason patch_positions reproduce it bit for bit
    got = visual_token_centres(ph * patch, pw * patch, patch, stride, mode).astype(np.float32)  # type: ignore[arg-type]
    rows, cols = lape_cell_centres(ph, stride, mode).numpy(), lape_cell_centres(pw, stride, mode).numpy()
    vv, uu = np.meshgrid(rows, cols, indexing="ij")
    np.testing.assert_array_equal(got, np.stack([uu.ravel(), vv.ravel()], 1))
