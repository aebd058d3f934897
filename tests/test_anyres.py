from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rasters import ROTATED_TRANSFORM, write_dated_stack
from torch import nn

from agrivlm.errors import PipelineError
from agrivlm.geo import Chip, ChipStream, open_stack
from agrivlm.pipeline.anyres import (
    anyres_tiles,
    grid_centres,
    interpolate_position_table,
    resize_position_embeddings,
    select_grid,
    split_edges,
    tile_windows,
    token_positions,
)
from agrivlm.pipeline.frames import FrameSamplingConfig, sample_frames
from agrivlm.pipeline.pooling import pool_2d, pooled_grid


@pytest.fixture(scope="module")
def offset_chip(sample_root: Path) -> Chip:
    """The sample's bottom-right 64 px chip: window offset (row 37, col 36) on the stack."""
    stack = open_stack(sample_root / "ndvi", masks=sample_root / "cloud_mask")
    chips = list(ChipStream(stack, chip_size=64, stride=32))
    chip = chips[-1]
    assert (chip.window.row_off, chip.window.col_off) == (37, 36)
    return chip


# -- grid choice -----------------------------------------------------------------------------------------


def test_select_grid_examples() -> None:
    assert select_grid(101, 100, tile_size=384, max_tiles=6) == (1, 1)  # small chip: no upsampling into tiles
    assert select_grid(101, 100, tile_size=32, max_tiles=6) == (2, 2)
    assert select_grid(512, 1024, tile_size=256, max_tiles=8) == (2, 4)
    assert select_grid(512, 1024, tile_size=512, max_tiles=8) == (1, 2)
    assert select_grid(1000, 300, tile_size=336, max_tiles=6) == (3, 1)
    assert select_grid(300, 1000, tile_size=336, max_tiles=6, min_tiles=4) == (1, 4)


@settings(max_examples=150, deadline=None)
@given(h=st.integers(1, 3000), w=st.integers(1, 3000), s=st.integers(8, 512), mx=st.integers(1, 12),
       data=st.data())
def test_select_grid_is_the_best_aspect_fit(h: int, w: int, s: int, mx: int, data: st.DataObject) -> None:
    mn = data.draw(st.integers(1, mx))
    feasible = [(r, c) for r in range(1, mx + 1) for c in range(1, mx + 1) if mn <= r * c <= mx and r <= h and c <= w]
    if not feasible:
        with pytest.raises(PipelineError):
            select_grid(h, w, s, mx, mn)
        return
    r, c = select_grid(h, w, s, mx, mn)
    assert (r, c) in feasible
    diff = abs(math.log(w / h) - math.log(c / r))
    assert all(diff <= abs(math.log(w / h) - math.log(cc / rr)) + 1e-9 for rr, cc in feasible)


@settings(max_examples=100, deadline=None)
@given(h=st.integers(1, 200), w=st.integers(1, 200), data=st.data())
def test_tile_windows_partition_the_chip(h: int, w: int, data: st.DataObject) -> None:
    rows, cols = data.draw(st.integers(1, min(h, 6))), data.draw(st.integers(1, min(w, 6)))
    cover = np.zeros((h, w), dtype=int)
    wins = tile_windows(h, w, rows, cols)
    assert len(wins) == rows * cols
    for win in wins:
        cover[int(win.row_off): int(win.row_off + win.height), int(win.col_off): int(win.col_off + win.width)] += 1
        assert abs(win.width - w / cols) < 1 and abs(win.height - h / rows) < 1
    assert (cover == 1).all()
    assert split_edges(10, 3) == [0, 3, 7, 10]


# -- tiles on real chips ----------------------------------------------------------------------------------


def test_tile_corners_and_pixels_match_the_source_geotiff(offset_chip: Chip, sample_root: Path) -> None:
    chip = offset_chip
    frames = sample_frames(chip, FrameSamplingConfig(max_frames=3))
    tiles = anyres_tiles(frames.pixels, frames.grid, tile_size=32, max_tiles=4)
    assert tiles.grid_shape == (2, 2)
    assert tiles.pixels.shape == (5, 3, 1, 32, 32)
    assert tiles.tiles[0].is_thumbnail and [(t.row, t.col) for t in tiles.tiles[1:]] == [(0, 0), (0, 1), (1, 0),
                                                                                          (1, 1)]
    with rasterio.open(sample_root / "ndvi" / chip.files[frames.indices[1]]) as ds:
        band = ds.read(1)
        for k, tile in enumerate(tiles.tiles[1:], start=1):
            # the tile's corners are the source raster's pixel edges at chip offset + tile offset
            col0 = chip.window.col_off + tile.window.col_off
            row0 = chip.window.row_off + tile.window.row_off
            want = np.array([ds.transform * (col0 + dc, row0 + dr) for dc, dr in
                             [(0, 0), (tile.window.width, 0), (tile.window.width, tile.window.height),
                              (0, tile.window.height)]])
            np.testing.assert_allclose(tile.grid.corners(), want, rtol=0, atol=1e-6)
            np.testing.assert_allclose(tiles.to_crs(k, [0, 1], [0, 1]), (want[[0, 2], 0], want[[0, 2], 1]), atol=1e-6)
            # tiles are 32 px windows shown at 32 px: every tile pixel is the source pixel under its centre
            rows, cols = np.mgrid[0:32, 0:32]
            x, y = tile.grid.pixel_to_crs(cols + 0.5, rows + 0.5)
            src_rows, src_cols = rasterio.transform.rowcol(ds.transform, x.ravel(), y.ravel())
            np.testing.assert_array_equal(tiles.pixels[k, 1, 0].numpy().ravel(),
                                          band[np.asarray(src_rows), np.asarray(src_cols)])
    thumb = tiles.tiles[0]
    np.testing.assert_allclose(thumb.grid.corners(), chip.grid.corners(), rtol=0, atol=1e-6)
    assert thumb.grid.transform.a == pytest.approx(chip.grid.transform.a * 2)  # 64 px shown at 32 px


@settings(max_examples=40, deadline=None)
@given(u=st.floats(0, 1), v=st.floats(0, 1), k=st.integers(1, 4))
def test_position_in_a_tile_maps_back_to_the_chip(offset_chip: Chip, u: float, v: float, k: int) -> None:
    tiles = anyres_tiles(offset_chip.data[:1], offset_chip.grid, tile_size=32, max_tiles=4)
    win = tiles.tiles[k].window
    cu, cv = tiles.to_chip(k, u, v)
    assert cu == pytest.approx((win.col_off + u * win.width) / 64, abs=1e-9)
    assert cv == pytest.approx((win.row_off + v * win.height) / 64, abs=1e-9)
    # and through the chip's own grid to the same CRS point
    np.testing.assert_allclose(offset_chip.grid.norm_to_crs(cu, cv), tiles.to_crs(k, u, v), atol=1e-6)
    tu, tv = tiles.to_chip(0, u, v)  # the thumbnail covers the whole chip
    assert tu == pytest.approx(u, abs=1e-9) and tv == pytest.approx(v, abs=1e-9)


def test_rotated_non_square_stack_tiles(tmp_path: Path) -> None:
    write_dated_stack(tmp_path, n_dates=2, height=30, width=45, bands=2, transform=ROTATED_TRANSFORM)
    chip = next(iter(ChipStream(open_stack(tmp_path), chip_size=(30, 45))))
    tiles = anyres_tiles(chip.data, chip.grid, tile_size=16, max_tiles=6)
    assert tiles.grid_shape == (2, 3) and tiles.pixels.shape == (7, 2, 2, 16, 16)
    for tile in tiles.tiles[1:]:
        w = tile.window
        corners = [(w.col_off, w.row_off), (w.col_off + w.width, w.row_off),
                   (w.col_off + w.width, w.row_off + w.height), (w.col_off, w.row_off + w.height)]
        want = np.array([ROTATED_TRANSFORM * c for c in corners])
        np.testing.assert_allclose(tile.grid.corners(), want, rtol=0, atol=1e-6)
        assert tile.grid.footprint().area == pytest.approx(w.width * w.height * 100.0)


def test_tiling_errors(offset_chip: Chip) -> None:
    with pytest.raises(PipelineError, match="frames are 64x64 px but their grid is 32x32"):
        anyres_tiles(offset_chip.data[:, :, :64, :64], offset_chip.grid.subgrid(
            rasterio.windows.Window(0, 0, 32, 32)), 16, 4)
    with pytest.raises(PipelineError, match="zero frames"):
        anyres_tiles(offset_chip.data[:0], offset_chip.grid, 16, 4)


# -- patch and pooled-cell centres -------------------------------------------------------------------------


@pytest.mark.parametrize(("h", "w", "s"), [(4, 6, 2), (5, 7, 2), (27, 27, 2), (7, 4, 3), (6, 6, 1)])
@pytest.mark.parametrize("mode", ["average", "bilinear", "max"])
def test_cell_centres_match_pooling_of_a_coordinate_field(h: int, w: int, s: int, mode: str) -> None:
    # features = the normalized (u, v) of each patch centre: pooling them is the pooled cell's position
    rows, cols = np.mgrid[0:h, 0:w]
    feats = torch.tensor(np.stack([(cols + 0.5) / w, (rows + 0.5) / h], axis=-1).reshape(1, h * w, 2),
                         dtype=torch.float64)
    pooled = pool_2d(feats, (h, w), s, mode)[0].numpy()  # type: ignore[arg-type]
    u, v = grid_centres(h, w, s, mode)  # type: ignore[arg-type]
    assert u.shape == (math.prod(pooled_grid(h, w, s)),)
    if mode == "max":
        # max of an increasing field is its last patch; the cell's centre is that of the patches it covers
        avg_u, avg_v = grid_centres(h, w, s, "average")
        np.testing.assert_array_equal(u, avg_u)
        assert np.all(pooled[:, 0] >= u) and np.all(pooled[:, 1] >= v)
    else:
        np.testing.assert_allclose(pooled[:, 0], u, rtol=0, atol=1e-12)
        np.testing.assert_allclose(pooled[:, 1], v, rtol=0, atol=1e-12)


def test_token_positions_of_tiles(offset_chip: Chip) -> None:
    tiles = anyres_tiles(offset_chip.data[:1], offset_chip.grid, tile_size=32, max_tiles=4)
    u, v = token_positions(tiles, 0, (4, 4))
    np.testing.assert_allclose(u.reshape(4, 4)[0], [0.125, 0.375, 0.625, 0.875], atol=1e-12)
    u, v = token_positions(tiles, 4, (4, 4), stride=2)  # bottom-right tile, 2x2 pooled cells
    np.testing.assert_allclose(u, [0.625, 0.875, 0.625, 0.875], atol=1e-12)
    np.testing.assert_allclose(v, [0.625, 0.625, 0.875, 0.875], atol=1e-12)


# -- position-embedding interpolation against transformers -------------------------------------------------


def _tiny_siglip() -> nn.Module:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             image_size=56, patch_size=14)
    return SiglipVisionModel(cfg).eval()


def _tiny_clip() -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=56, patch_size=14)
    return CLIPVisionModel(cfg).eval()


def test_table_interpolation_equals_siglip_interpolate_pos_encoding_non_square() -> None:
    model = _tiny_siglip()
    emb = model.embeddings
    x = torch.randn(2, 3, 42, 70)  # a 3x5 patch grid from a 4x4 table
    with torch.no_grad():
        want = emb(x, interpolate_pos_encoding=True)
        table = interpolate_position_table(emb.position_embedding.weight, (3, 5))
        got = emb.patch_embedding(x).flatten(2).transpose(1, 2) + table
    assert table.shape == (15, 32)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the same grid gives the table back; bilinear on a constant table keeps it constant
    same = interpolate_position_table(emb.position_embedding.weight, (4, 4))
    torch.testing.assert_close(same, emb.position_embedding.weight, rtol=1e-5, atol=1e-6)
    const = torch.full((1 + 16, 8), 3.0)
    torch.testing.assert_close(interpolate_position_table(const, (7, 2), num_prefix_tokens=1, mode="bilinear"),
                               torch.full((15, 8), 3.0))


@pytest.mark.parametrize("build", [_tiny_siglip, _tiny_clip], ids=["siglip", "clip"])
def test_resized_model_equals_transformers_interpolation_and_round_trips(build, tmp_path: Path) -> None:  # noqa: ANN001
    model = build()
    x = torch.randn(2, 3, 84, 84)
    with torch.no_grad():
        want = model(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
    emb = resize_position_embeddings(model, 84)
    assert emb.position_embedding.weight.shape[0] == 36 + (1 if hasattr(emb, "class_embedding") else 0)
    assert model.config.image_size == 84
    with torch.no_grad():
        got = model(pixel_values=x).last_hidden_state  # no interpolation flag needed any more
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(pixel_values=x).last_hidden_state, got, rtol=0, atol=0)
    # the resized table is trainable
    out = model(pixel_values=x).last_hidden_state.sum()
    out.backward()
    assert emb.position_embedding.weight.grad is not None and emb.position_embedding.weight.grad.abs().sum() > 0


def test_position_embedding_errors() -> None:
    with pytest.raises(PipelineError, match="multiple of the patch size 14"):
        resize_position_embeddings(_tiny_siglip(), 90)
    with pytest.raises(PipelineError, match="Linear: no ViT embeddings"):
        resize_position_embeddings(nn.Linear(2, 2), 56)
    with pytest.raises(PipelineError, match="15 patch positions are not a square grid"):
        interpolate_position_table(torch.zeros(15, 4), (4, 4))
