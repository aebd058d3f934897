"""The tiny model on chip batches: token counts, LAPE at chip positions for tiles, multi-scale, generation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from agrivlm.geo import Chip, ChipStream, open_stack
from agrivlm.lape.embedding import token_transfer
from agrivlm.lape.tokens import Axis
from agrivlm.model import build_model
from agrivlm.pipeline.anyres import anyres_tiles, token_positions
from agrivlm.pipeline.frames import FrameSamplingConfig
from agrivlm.pipeline.inputs import AnyResConfig, ChipBatch, ChipInputConfig, num_visual_tokens

SAMPLING = FrameSamplingConfig(max_frames=3, empty="drop", clouds_as_nodata=True)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():  # type: ignore[no-untyped-def]
    model, proc = build_model()
    proc.chip_config = ChipInputConfig(sampling=SAMPLING, bands={"preset": "ndvi"}).model_dump(mode="json")
    return model, proc


@pytest.fixture(scope="module")
def stack(sample_root: Path):  # type: ignore[no-untyped-def]
    return open_stack(sample_root / "ndvi", masks=sample_root / "cloud_mask")


@pytest.fixture(scope="module")
def chip64(stack) -> Chip:  # type: ignore[no-untyped-def]
    return sorted(ChipStream(stack, chip_size=64, stride=32), key=lambda c: c.index)[-1]


@pytest.fixture(scope="module")
def chips36(stack) -> list[Chip]:  # type: ignore[no-untyped-def]
    """36 px chips: a 9x9 patch grid pooled to 5x5 cells, whose centres (1/9, …) are not binary fractions."""
    return sorted(ChipStream(stack, chip_size=36, stride=32), key=lambda c: c.index)[:2]


def _visual_ids(model, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return (ids == model.config.image_token_id) | (ids == model.config.video_token_id)


def _features(model, batch) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """All visual tokens of a batch, in placeholder order (N·S, D)."""
    if "image_sizes" in batch:
        parts = model.get_visual_features_by_size(batch["pixel_values"], batch["image_sizes"], batch["frame_times"],
                                                  None, batch["patch_positions"])
        return torch.cat(parts)
    vis = model.get_visual_features(batch["pixel_values"], batch["frame_times"], None, batch["patch_positions"])
    return vis.reshape(-1, vis.shape[-1])


@pytest.mark.parametrize("layout", ["plain", "scales", "anyres"])
def test_placeholders_equal_the_features_the_model_makes(tiny, chip64: Chip, layout: str) -> None:
    model, proc = tiny
    kw = {"scales": (1.0, 0.75, 0.5)} if layout == "scales" else {
        "anyres": AnyResConfig(tile_size=32, max_tiles=4)} if layout == "anyres" else {}
    out: ChipBatch = proc.from_chips([chip64, chip64], ["<video> Where are the fields?", "<video> Stage?"],
                                     answers=["a box", "tillering"], **kw)
    b = out.batch
    with torch.no_grad():
        feats = _features(model, b)
        res = model(**b)
    n_placeholders = int(_visual_ids(model, b["input_ids"]).sum())
    assert feats.shape[0] == n_placeholders
    per_item = [3 * it.num_tokens_per_frame for it in out.items]
    assert sum(per_item) == n_placeholders
    expected = {"plain": [3 * 64], "scales": [3 * 64, 3 * 36, 3 * 16], "anyres": [3 * 16] * 5}[layout]
    assert per_item == expected * 2
    assert per_item[0] == num_visual_tokens(3, *b["pixel_values"].shape[-2:], 4, 2)
    assert torch.isfinite(res.logits).all() and torch.isfinite(res.loss)
    # each sample's placeholder run holds exactly its own chip's items
    for s, geo in enumerate(out.chips):
        assert int(_visual_ids(model, b["input_ids"][s]).sum()) == sum(per_item[i] for i in geo.items)


def test_tile_tokens_carry_the_chip_position_of_their_cells(tiny, chip64: Chip) -> None:
    model, proc = tiny
    out = proc.from_chips(chip64, "<video>", anyres=AnyResConfig(tile_size=32, max_tiles=4))
    b = out.batch
    tiles = anyres_tiles(np.zeros((1, 1, 64, 64), np.float32), chip64.grid, 32, 4)
    want_pos = torch.stack([torch.from_numpy(np.stack(token_positions(tiles, k, (8, 8), 2), 1)).float()
                            for k in range(5)])
    assert torch.equal(b["patch_positions"], want_pos)
    cfg = model.config
    with torch.no_grad():
        full = model.get_visual_features(b["pixel_values"], b["frame_times"], None, b["patch_positions"])
        weight = cfg.spatial_injection_scale
        try:
            cfg.spatial_injection_scale = 0.0
            no_space = model.get_visual_features(b["pixel_values"], b["frame_times"], None, b["patch_positions"])
        finally:
            cfg.spatial_injection_scale = weight
        tables = model.lape.input_tables_by_axis()
        spatial = token_transfer(tables[Axis.HEIGHT], want_pos[..., 1]) + token_transfer(tables[Axis.WIDTH],
                                                                                          want_pos[..., 0])
        tile_local = model.get_visual_features(b["pixel_values"], b["frame_times"])  # each tile as a whole chip
    added = (full - no_space).reshape(5, 3, 16, -1)
    for frame in range(3):
        torch.testing.assert_close(added[:, frame], weight * spatial, rtol=0, atol=2e-5)
    # the thumbnail is the whole chip: given positions change nothing; a tile's tokens are elsewhere on the chip
    torch.testing.assert_close(full[0], tile_local[0], rtol=0, atol=1e-6)
    assert (full[4] - tile_local[4]).abs().max() > 1e-2


def test_one_tile_without_thumbnail_is_todays_behaviour_bit_for_bit(tiny, chips36: list[Chip]) -> None:
    model, proc = tiny
    prompts = ["<video> Box?", "Stage of <video>?"]
    one_tile = proc.from_chips(chips36, prompts, anyres=AnyResConfig(tile_size=36, max_tiles=1, thumbnail=False))
    plain = proc.from_chips(chips36, prompts)
    a, b = one_tile.batch, plain.batch
    assert one_tile.chips[0].grid_shape == (1, 1) and [it.kind for it in one_tile.items] == ["tile", "tile"]
    for key in ("pixel_values", "frame_times", "input_ids", "attention_mask", "patch_positions"):
        assert torch.equal(a[key], b[key]), key
    with torch.no_grad():
        given = model.get_visual_features(a["pixel_values"], a["frame_times"], None, a["patch_positions"])
        today = model.get_visual_features(b["pixel_values"], b["frame_times"])
        assert torch.equal(given, today)
        logits_given = model(**a).logits
        b_today = {k: v for k, v in b.items() if k != "patch_positions"}
        assert torch.equal(logits_given, model(**b_today).logits)


def test_multiscale_items_are_encoded_at_their_own_size(tiny, chips36: list[Chip]) -> None:
    model, proc = tiny
    out = proc.from_chips(chips36, ["<video> <video>"], scales=(1.0, 0.5))
    b = out.batch
    assert b["image_sizes"].tolist() == [[36, 36], [20, 20]] * 2  # 18 px → 20: the nearest multiple of 4, ties up
    with torch.no_grad():
        parts = model.get_visual_features_by_size(b["pixel_values"], b["image_sizes"], b["frame_times"], None,
                                                  b["patch_positions"])
        for k, (h, w) in enumerate(b["image_sizes"].tolist()):
            alone = model.get_visual_features(b["pixel_values"][k:k + 1, :, :, :h, :w], b["frame_times"][k:k + 1])
            torch.testing.assert_close(parts[k], alone[0], rtol=0, atol=1e-5)
        bad = b["image_sizes"].clone()
        bad[1] = torch.tensor([16, 16])
        with pytest.raises(ValueError, match=r"prompts hold 204 <image>/<video> tokens but the 4 visual items"):
            model(input_ids=b["input_ids"], pixel_values=b["pixel_values"], frame_times=b["frame_times"],
                  image_sizes=bad)
        with pytest.raises(ValueError, match=r"patch_positions must be \(2, 25, 2\)"):
            model.get_visual_features(b["pixel_values"][[0, 2]], b["frame_times"][[0, 2]], None,
                                      b["patch_positions"][[0, 2], :9])
        with pytest.raises(ValueError, match="patch_positions hold NaN"):
            model.get_visual_features(b["pixel_values"][[1, 3], :, :, :20, :20], b["frame_times"][[1, 3]], None,
                                      b["patch_positions"][[1, 3], 9:18])  # past the 9 tokens of a 20 px item


def test_generate_with_tiles_uses_the_positions_at_prefill(tiny, chip64: Chip) -> None:
    model, proc = tiny
    out = proc.from_chips([chip64, chip64], ["<video> Box of the largest field:", "<video> When?"],
                          anyres=AnyResConfig(tile_size=32, max_tiles=4), padding_side="left")
    b = out.batch
    with torch.no_grad():
        gen = model.generate(**b, max_new_tokens=3, output_logits=True, return_dict_in_generate=True)
        first = model(**b).logits[:, -1]
        without = model(**{k: v for k, v in b.items() if k != "patch_positions"}).logits[:, -1]
    assert gen.sequences.shape == (2, b["input_ids"].shape[1] + 3)
    torch.testing.assert_close(gen.logits[0], first, rtol=0, atol=1e-4)
    assert (without - first).abs().max() > 1e-3  # the positions matter, so generate really used them
