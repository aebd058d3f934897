"""AnyRes high-resolution tiling that keeps geography, and position-embedding interpolation.

A chip larger than the vision encoder's input is cut into a ``rows × cols`` grid of tiles (the grid that
best fits the chip's aspect ratio, :func:`select_grid`) plus a global thumbnail, as LLaVA-NeXT and
InternVL do. Unlike those, every tile here is a pixel *window* of the chip and carries a
:class:`~agrivlm.geo.coords.GeoGrid` of itself *as fed to the encoder* (``tile_size`` pixels, built from
``chip_grid.subgrid(window)`` with an exact scaled transform), so a position predicted in a tile —
normalized ``(u, v)`` of that tile — maps to map coordinates with ``tile.grid.norm_to_crs(u, v)`` and to
the chip with :meth:`AnyResTiles.to_chip`. Tiles are stretched to ``tile_size`` (not padded), which the
grid choice keeps close to isotropic; the transform carries the stretch, so geography stays exact.

Also here: the centres of patches and pooled cells (:func:`grid_centres`, matching
:func:`agrivlm.pipeline.pooling.pool_2d` for every mode) and the interpolation of a SigLIP/CLIP vision
encoder's position-embedding table to another input size (:func:`interpolate_position_table`,
:func:`resize_position_embeddings`), the same computation as transformers' ``interpolate_pos_encoding``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from rasterio.windows import Window
from torch import nn

from agrivlm.errors import PipelineError
from agrivlm.geo.coords import FloatArray, GeoGrid
from agrivlm.lape.embedding import axis_centres
from agrivlm.pipeline.frames import ResizeMode, as_frames_tensor, rescale_grid, resize_frames
from agrivlm.pipeline.pooling import POOL_MODES, PoolMode

# -- grid choice and tiles ---------------------------------------------------------------------------


def select_grid(height: int, width: int, tile_size: int, max_tiles: int, min_tiles: int = 1) -> tuple[int, int]:
    """The ``(rows, cols)`` grid of tiles that best fits a ``height × width`` chip.

    Among grids with ``min_tiles ≤ rows·cols ≤ max_tiles`` (and no more rows/cols than pixels), pick the
    one whose ``cols / rows`` is closest to the chip's ``width / height`` in log space (so 2:1 and 1:2 are
    equally far from 1:1), i.e. whose tiles are closest to square. On a tie, a grid with more tiles wins
    only if the chip has at least half a tile of pixels per tile (``height·width > 0.5·tile_size²·n``),
    InternVL's rule: big chips get more tiles, small chips are not upsampled into many.

    Returns:
        ``(rows, cols)``.

    """
    if height < 1 or width < 1:
        raise PipelineError(f"cannot tile a {height}x{width} px chip")
    if tile_size < 1 or max_tiles < 1 or not 1 <= min_tiles <= max_tiles:
        raise PipelineError(
            f"tiling needs tile_size ≥ 1 and 1 ≤ min_tiles ≤ max_tiles, got {tile_size}, {min_tiles}, {max_tiles}")
    candidates = sorted(
        ((r, c) for r in range(1, max_tiles + 1) for c in range(1, max_tiles // r + 1)
         if min_tiles <= r * c and r <= height and c <= width),
        key=lambda rc: (rc[0] * rc[1], rc[0]),
    )
    if not candidates:
        raise PipelineError(f"a {height}x{width} px chip cannot hold {min_tiles} tiles of at least 1 px")
    log_aspect = math.log(width / height)
    best, best_diff = candidates[0], math.inf
    for r, c in candidates:
        diff = abs(log_aspect - math.log(c / r))
        if diff < best_diff - 1e-12:
            best, best_diff = (r, c), diff
        elif abs(diff - best_diff) <= 1e-12 and height * width > 0.5 * tile_size * tile_size * r * c:
            best = (r, c)
    return best


def split_edges(size: int, parts: int) -> list[int]:
    """Integer edges ``0 = e_0 < … < e_parts = size`` splitting ``size`` pixels into near-equal parts."""
    if not 1 <= parts <= size:
        raise PipelineError(f"cannot split {size} px into {parts} parts of at least 1 px")
    return [(2 * i * size + parts) // (2 * parts) for i in range(parts + 1)]


def tile_windows(height: int, width: int, rows: int, cols: int) -> list[Window]:
    """Windows of a ``rows × cols`` split of a ``height × width`` chip, row-major (they tile it exactly)."""
    re, ce = split_edges(height, rows), split_edges(width, cols)
    return [Window(ce[j], re[i], ce[j + 1] - ce[j], re[i + 1] - re[i]) for i in range(rows) for j in range(cols)]


@dataclass(frozen=True)
class Tile:
    """One AnyRes tile (or the thumbnail) of a chip.

    Attributes:
        row: tile row in the grid (``-1`` for the thumbnail).
        col: tile column (``-1`` for the thumbnail).
        window: the chip pixels it shows, on the chip's grid (the whole chip for the thumbnail).
        source_grid: ``chip_grid.subgrid(window)``: the window at the chip's resolution.
        grid: the tile as fed to the encoder (``tile_size`` px, exact scaled transform): normalized
            ``(u, v)`` of the tile → CRS with ``grid.norm_to_crs(u, v)``.

    """

    row: int
    col: int
    window: Window
    source_grid: GeoGrid
    grid: GeoGrid

    @property
    def is_thumbnail(self) -> bool:
        """True for the global thumbnail."""
        return self.row < 0


@dataclass(frozen=True)
class AnyResTiles:
    """A chip's frames cut into AnyRes tiles plus a thumbnail.

    Attributes:
        pixels: ``(1 + rows·cols, T, C, S_h, S_w)`` float32: the thumbnail first (as LLaVA-NeXT puts the
            base image first), then the tiles row-major. NaN = no data, as in the input.
        tiles: the :class:`Tile` of each entry of ``pixels``, same order.
        grid_shape: ``(rows, cols)``.
        chip_grid: the chip's grid.

    """

    pixels: torch.Tensor
    tiles: tuple[Tile, ...]
    grid_shape: tuple[int, int]
    chip_grid: GeoGrid

    def to_crs(self, k: int, u: npt.ArrayLike, v: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
        """Normalized ``(u, v)`` in entry ``k`` (0 = thumbnail) → CRS ``(x, y)``."""
        return self.tiles[k].grid.norm_to_crs(u, v)

    def to_chip(self, k: int, u: npt.ArrayLike, v: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
        """Normalized ``(u, v)`` in entry ``k`` → normalized ``(u, v)`` of the whole chip (via the CRS)."""
        return self.chip_grid.crs_to_norm(*self.to_crs(k, u, v))


def anyres_tiles(
    frames: torch.Tensor | npt.ArrayLike,
    grid: GeoGrid,
    tile_size: int,
    max_tiles: int,
    min_tiles: int = 1,
    mode: ResizeMode = "bilinear",
) -> AnyResTiles:
    """Cut ``(T, C, H, W)`` frames on ``grid`` into AnyRes tiles plus a thumbnail, each ``tile_size²`` px.

    Args:
        frames: ``(T, C, H, W)`` with ``H = grid.height``, ``W = grid.width``; NaN = no data.
        grid: the frames' grid (a chip's ``grid``).
        tile_size: the encoder's input size ``S`` in pixels (tiles are ``S × S``).
        max_tiles: most tiles (not counting the thumbnail).
        min_tiles: fewest tiles.
        mode: resize interpolation (NaN-aware, see :func:`~agrivlm.pipeline.frames.resize_frames`).

    """
    x = as_frames_tensor(frames)
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if (h, w) != (grid.height, grid.width):
        raise PipelineError(f"frames are {h}x{w} px but their grid is {grid.height}x{grid.width}")
    rows, cols = select_grid(h, w, tile_size, max_tiles, min_tiles)
    size = (tile_size, tile_size)
    whole = Window(0, 0, w, h)
    tiles = [Tile(-1, -1, whole, grid, rescale_grid(grid, tile_size, tile_size))]
    pixels = [resize_frames(x, size, mode)]
    for k, win in enumerate(tile_windows(h, w, rows, cols)):
        sub = grid.subgrid(win)
        r0, c0 = int(win.row_off), int(win.col_off)
        part = x[..., r0: r0 + int(win.height), c0: c0 + int(win.width)]
        pixels.append(resize_frames(part, size, mode))
        tiles.append(Tile(k // cols, k % cols, win, sub, rescale_grid(sub, tile_size, tile_size)))
    return AnyResTiles(pixels=torch.stack(pixels), tiles=tuple(tiles), grid_shape=(rows, cols), chip_grid=grid)


# -- centres of patches and pooled cells ---------------------------------------------------------------


def grid_centres(h: int, w: int, stride: int = 1, mode: PoolMode = "average") -> tuple[FloatArray, FloatArray]:
    """Normalized ``(u, v)`` of each cell of :func:`~agrivlm.pipeline.pooling.pool_2d`'s output.

    ``(h, w)`` is the patch grid covering an image (a chip, a tile); ``stride = 1`` gives the patch
    centres. For ``"average"``/``"max"`` a cell's centre is the centre of the patches it covers (edge
    cells of a grid not divisible by ``stride`` are smaller); for ``"bilinear"`` it is the point the
    resize samples, ``(j + 0.5)·w / w'`` patches (``align_corners=False``). Pooling a field that is
    linear in ``u`` gives exactly these ``u`` for ``average`` and ``bilinear``.

    Returns:
        ``(u, v)``, each ``(h'·w',)`` row-major, in ``[0, 1]`` of the image's width and height.

    """
    if mode not in POOL_MODES:
        raise PipelineError(f"pooling mode must be one of {POOL_MODES}, got {mode!r}")
    vv, uu = np.meshgrid(axis_centres(h, stride, mode), axis_centres(w, stride, mode), indexing="ij")
    return uu.ravel(), vv.ravel()


def token_positions(tiles: AnyResTiles, k: int, patch_grid: tuple[int, int], stride: int = 1,
                    mode: PoolMode = "average") -> tuple[FloatArray, FloatArray]:
    """Chip-normalized ``(u, v)`` of each visual token of entry ``k`` (0 = thumbnail) of ``tiles``.

    ``patch_grid`` is the encoder's patch grid on one tile (e.g. ``(27, 27)`` for SigLIP-384/14) and
    ``stride``/``mode`` the spatial pooling applied to it. This is where LAPE's H/W embeddings of a
    tile's tokens come from.

    Returns:
        ``(u, v)``, each ``(h'·w',)`` row-major, fractions of the *chip's* width and height.

    """
    u, v = grid_centres(patch_grid[0], patch_grid[1], stride, mode)
    return tiles.to_chip(k, u, v)


# -- position-embedding interpolation ------------------------------------------------------------------


def interpolate_position_table(
    table: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 0,
    mode: str = "bicubic",
) -> torch.Tensor:
    """Resize a ViT's learned position-embedding table to another patch grid.

    Args:
        table: ``(num_prefix_tokens + h·w, D)``: prefix rows (CLIP's class token) then the patch rows,
            row-major.
        new_grid: ``(h', w')`` patch grid wanted (may be non-square).
        old_grid: ``(h, w)`` of ``table`` (default: square ``√(rows − prefix)``).
        num_prefix_tokens: rows kept as they are (1 for CLIP, 0 for SigLIP).
        mode: ``torch.nn.functional.interpolate`` mode (``"bicubic"`` like transformers, or
            ``"bilinear"``), ``align_corners=False``.

    Returns:
        ``(num_prefix_tokens + h'·w', D)`` in ``table``'s dtype (interpolated in float32).

    """
    if table.ndim != 2:
        raise PipelineError(f"position table must be (N, D), got {tuple(table.shape)}")
    n = table.shape[0] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise PipelineError(f"{n} patch positions are not a square grid; pass old_grid=(h, w)")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != n:
        raise PipelineError(f"{n} patch positions do not fill a {old_grid[0]}x{old_grid[1]} grid")
    if min(new_grid) < 1:
        raise PipelineError(f"new patch grid must be at least 1x1, got {new_grid}")
    prefix, patches = table[:num_prefix_tokens], table[num_prefix_tokens:]
    d = table.shape[1]
    x = patches.float().reshape(1, old_grid[0], old_grid[1], d).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=tuple(new_grid), mode=mode, align_corners=False)
    x = x.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], d).to(table.dtype)
    return torch.cat([prefix, x], dim=0)


def _vision_embeddings(model: nn.Module) -> nn.Module:
    emb: nn.Module | None = None
    for candidate in (model, getattr(model, "vision_model", None), getattr(model, "embeddings", None)):
        if candidate is None:
            continue
        if isinstance(getattr(candidate, "position_embedding", None), nn.Embedding):
            emb = candidate
            break
        inner = getattr(candidate, "embeddings", None)
        if inner is not None and isinstance(getattr(inner, "position_embedding", None), nn.Embedding):
            emb = inner
            break
    if emb is None or not hasattr(emb, "patch_size") or not hasattr(emb, "position_ids"):
        raise PipelineError(
            f"{type(model).__name__}: no ViT embeddings with a learned position_embedding (expected a "
            "SiglipVisionModel / CLIPVisionModel or their .vision_model)")
    return emb


def resize_position_embeddings(model: nn.Module, image_size: int, mode: str = "bicubic") -> nn.Module:
    """Resize a SigLIP/CLIP vision encoder's position embeddings, in place, to square ``image_size`` inputs.

    Afterwards the model takes ``image_size × image_size`` pixels without ``interpolate_pos_encoding``
    and gives what the original gives *with* ``interpolate_pos_encoding=True`` (bicubic, as transformers
    does), so the resized table can be fine-tuned and saved: ``config.image_size`` is updated and a
    ``save_pretrained``/``from_pretrained`` round trip keeps the new size. Non-square inputs: use
    :func:`interpolate_position_table` (CLIP's forward refuses non-square images without the flag).

    Args:
        model: a ``SiglipVisionModel``, ``CLIPVisionModel`` or their ``vision_model``/``embeddings``.
        image_size: new input side in pixels, a multiple of the patch size.
        mode: interpolation mode of :func:`interpolate_position_table`.

    Returns:
        The resized embeddings module.

    """
    emb = _vision_embeddings(model)
    patch = int(emb.patch_size)  # type: ignore[arg-type]
    if image_size < patch or image_size % patch:
        raise PipelineError(f"image_size {image_size} must be a positive multiple of the patch size {patch}")
    old: nn.Embedding = emb.position_embedding  # type: ignore[assignment]
    prefix = 1 if hasattr(emb, "class_embedding") else 0
    side = image_size // patch
    with torch.no_grad():
        new_table = interpolate_position_table(old.weight.detach(), (side, side), num_prefix_tokens=prefix, mode=mode)
    new = nn.Embedding(new_table.shape[0], new_table.shape[1], device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(new_table)
    new.weight.requires_grad_(old.weight.requires_grad)
    num_positions = side * side + prefix
    emb.position_embedding = new
    emb.position_ids = torch.arange(num_positions, device=old.weight.device).expand((1, -1))  # a buffer
    for name, value in (("num_patches", side * side), ("num_positions", num_positions), ("image_size", image_size)):
        setattr(emb, name, value)
    for holder in (model, getattr(model, "vision_model", None), emb):
        cfg = getattr(holder, "config", None)
        if cfg is not None and hasattr(cfg, "image_size"):
            cfg.image_size = image_size
    return emb
