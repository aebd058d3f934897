"""The chip-input contract: what a chip becomes before the model sees it, and what comes back.

The visual-token count lives in ONE function, :func:`visual_token_grid`, used by the processor
(:class:`agrivlm.model.processing.AgriVLMProcessor`) and by the model: the encoder makes an ``(H/p, W/p)``
patch grid per frame and :func:`agrivlm.pipeline.pooling.pooled_grid` shrinks it by the pooling stride.
The settings of how a chip is prepared (bands, frames, AnyRes tiles or scales: :class:`ChipInputConfig`)
and the geography of every visual item that comes back (:class:`VisualItem`, :class:`ChipGeography`,
:class:`ChipBatch`) are declared here, below the model, so recipes, training, inference and the explorer
read one contract without importing the model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
import numpy.typing as npt
import yaml
from pydantic import Field, field_validator, model_validator
from rasterio.crs import CRS
from rasterio.windows import Window

from agrivlm.config import StrictModel, parse_config, read_json_mapping, read_yaml_mapping
from agrivlm.geo.coords import FloatArray, GeoGrid, TimeAxis
from agrivlm.geo.grid import CHIP_EDGE, CHIP_SIZE, CHIP_STRIDE
from agrivlm.lape.tokens import QuestionPositions
from agrivlm.pipeline.anyres import Tile, grid_centres
from agrivlm.pipeline.bands import COMPOSITES, PRESETS, BandStats, available_composites
from agrivlm.pipeline.focus import GrowthFocus, PointMarker
from agrivlm.pipeline.frames import (
    FrameSamplingConfig,
    ResizeMode,
    TimeAxisRule,
)
from agrivlm.pipeline.pooling import PoolMode, pooled_grid

if TYPE_CHECKING:  # transformers is loaded only where a batch is made
    from transformers import BatchFeature

#: Label value ignored by the loss (HF convention).
IGNORE_INDEX = -100


def visual_token_grid(height: int, width: int, patch_size: int, pool_stride: int) -> tuple[int, int]:
    """The grid ``(h', w')`` of visual tokens of one ``height × width`` px frame: the single source of the count.

    The vision encoder cuts the frame into ``(height / patch_size, width / patch_size)`` patches (both
    must divide exactly, so that the patch grid covers the frame and LAPE's normalized positions mean
    the same on the grid as on the chip); pooling with ``pool_stride`` gives
    ``pooled_grid(height / p, width / p, stride)`` = ``ceil`` of each side over the stride.

    Raises:
        ValueError: a side that is not a multiple of ``patch_size``, naming what to change.
    """
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"frames of {height}x{width} px are not a multiple of the vision encoder's patch size {patch_size}; "
            f"use a chip size that is (e.g. {max(patch_size, height - height % patch_size)}) or resize the frames"
        )
    return pooled_grid(height // patch_size, width // patch_size, pool_stride)


def frame_token_counts(num_frames: int, token_grid: tuple[int, int], faster_video_stride: int = 0) -> list[int]:
    """Visual tokens of each frame of an item whose frames have ``token_grid`` ``(h', w')`` tokens.

    ``faster_video_stride`` 0: every frame ``h'·w'``. ``k ≥ 1`` (LLaVA-NeXT-Video's ``add_faster_video``): frames
    ``0, k, 2k, …`` keep the ``h' × w'`` grid (the slow stream), the others are pooled twice as coarsely
    (the faster stream, ``ceil(h'/2) · ceil(w'/2)`` tokens), and every frame ends with one learned separator
    token — more frames for the same visual tokens.
    """
    h, w = token_grid
    if faster_video_stride < 0:
        raise ValueError(f"faster_video_stride must be ≥ 0 (0 = off), got {faster_video_stride}")
    if faster_video_stride == 0:
        return [h * w] * num_frames
    fh, fw = pooled_grid(h, w, 2)
    return [(h * w if i % faster_video_stride == 0 else fh * fw) + 1 for i in range(num_frames)]


def num_visual_tokens(num_frames: int, height: int, width: int, patch_size: int, pool_stride: int,
                      faster_video_stride: int = 0) -> int:
    """Visual tokens of one item of ``num_frames`` frames of ``height × width`` px.

    ``T · h' · w'`` without the faster stream, else the sum of :func:`frame_token_counts`.
    """
    grid = visual_token_grid(height, width, patch_size, pool_stride)
    return sum(frame_token_counts(num_frames, grid, faster_video_stride))


def visual_token_centres(height: int, width: int, patch_size: int, pool_stride: int,
                         pool_mode: PoolMode = "average") -> FloatArray:
    """``(h'·w', 2)`` normalized ``(u, v)`` of each visual token of one frame, in that frame's own ``[0, 1]²``.

    The centres of the pooled cells of :func:`visual_token_grid` (row-major, the model's token order):
    :func:`agrivlm.pipeline.anyres.grid_centres` on the ``(height / p, width / p)`` patch grid. For an item
    that shows the whole chip (a plain chip, a thumbnail, a scale) these are chip positions; a tile's go
    through :func:`agrivlm.pipeline.anyres.token_positions` instead.
    """
    visual_token_grid(height, width, patch_size, pool_stride)  # checks the size
    u, v = grid_centres(height // patch_size, width // patch_size, pool_stride, pool_mode)
    return np.stack([u, v], axis=1)




# -- chip inputs: settings -----------------------------------------------------------------------------


def known_preset(name: str | None) -> str | None:
    """``name`` when it is a sensor preset of :data:`~agrivlm.pipeline.bands.PRESETS` (or None); a config validator."""
    if name is not None and name not in PRESETS:
        raise ValueError(f"unknown sensor preset {name!r}; use one of {', '.join(PRESETS)}")
    return name


class BandConfig(StrictModel):
    """Band preset and normalisation (:func:`~agrivlm.pipeline.bands.prepare_bands`), one class for every user.

    A checkpoint's input settings (:class:`InputConfig`, ``agrivlm_inputs.yaml``) and the processor's chip settings
    (:class:`ChipInputConfig`) share it, so what training saved is what ``agrivlm infer`` and the processor check.
    """

    #: Sensor preset key (:data:`agrivlm.pipeline.bands.PRESETS`: ``ndvi``, ``sentinel2_l2a``, …): band count,
    #: scale, offset, nodata. Required to prepare chips; None in input settings that name none yet
    #: (``agrivlm infer`` then needs ``--preset``).
    preset: str | None = None
    #: Optional false-colour composite (:data:`agrivlm.pipeline.bands.COMPOSITES`); None keeps every band.
    composite: str | None = None
    #: Percentiles of the per-chip robust clip range (used when ``low``/``high`` are not set).
    percentiles: tuple[float, float] = (2.0, 98.0)
    #: Fixed, dataset-wide per-channel value mapped to 0 (with ``high``); None: each chip's own percentiles.
    low: list[float] | None = None
    #: Fixed per-channel value mapped to 1.
    high: list[float] | None = None

    _known_preset = field_validator("preset")(known_preset)

    @model_validator(mode="after")
    def _consistent(self) -> BandConfig:
        if self.composite is not None:
            if self.composite not in COMPOSITES:
                raise ValueError(f"unknown composite {self.composite!r}; use one of {', '.join(COMPOSITES)}")
            if self.preset is None:
                raise ValueError(f"composite {self.composite!r} needs a band preset")
            if self.composite not in available_composites(self.preset):
                raise ValueError(f"preset {self.preset!r} cannot make composite {self.composite!r}; it supports "
                                 f"{', '.join(available_composites(self.preset)) or 'none'}")
        if (self.low is None) != (self.high is None):
            raise ValueError("give both low and high (fixed stats) or neither (per-chip percentiles)")
        if self.low is not None and self.high is not None and len(self.low) != len(self.high):
            raise ValueError(f"low has {len(self.low)} values but high has {len(self.high)}")
        lo_p, hi_p = self.percentiles
        if not 0.0 <= lo_p < hi_p <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 ≤ lower < upper ≤ 100, got {self.percentiles}")
        return self

    def stats(self) -> BandStats | None:
        """The fixed :class:`BandStats`, or None for per-chip percentiles."""
        if self.low is None or self.high is None:
            return None
        return BandStats(np.asarray(self.low, dtype=np.float64), np.asarray(self.high, dtype=np.float64),
                         self.percentiles)


#: Multi-scale factors of a chip, e.g. ``[1.0, 0.5]`` (chip settings, stage configs, saved inputs).
ScaleFactors = list[Annotated[float, Field(gt=0)]]


class AnyResConfig(StrictModel):
    """AnyRes tiling of :meth:`AgriVLMProcessor.from_chips` (:func:`~agrivlm.pipeline.anyres.anyres_tiles`)."""

    #: Side of every tile (and the thumbnail) fed to the encoder, in px; a multiple of the patch size.
    tile_size: Annotated[int, Field(ge=1)]
    #: Most tiles (thumbnail not counted).
    max_tiles: Annotated[int, Field(ge=1)] = 6
    #: Fewest tiles.
    min_tiles: Annotated[int, Field(ge=1)] = 1
    #: Put the whole chip, resized to ``tile_size``, first (as LLaVA-NeXT does).
    thumbnail: bool = True

    @model_validator(mode="after")
    def _range(self) -> AnyResConfig:
        if self.min_tiles > self.max_tiles:
            raise ValueError(f"min_tiles={self.min_tiles} is more than max_tiles={self.max_tiles}")
        return self


class ChipInputConfig(StrictModel):
    """Everything :meth:`AgriVLMProcessor.from_chips` does to a chip; saved with the processor.

    Exactly one layout: plain (one item per chip), ``anyres`` (thumbnail + tiles), or ``scales`` (one item per
    scale factor).
    """

    #: Which dates become frames.
    sampling: FrameSamplingConfig = Field(default_factory=FrameSamplingConfig)
    #: Band scaling (its ``preset`` set); None feeds the chip's values as they are (NaN still becomes
    #: ``fill_value``).
    bands: BandConfig | None = None
    #: AnyRes tiling; None: no tiles.
    anyres: AnyResConfig | None = None
    #: Multi-scale: scale factors, e.g. ``[1.0, 0.75, 0.5]``; each scale's side is rounded to a multiple of
    #: the patch size (at least one patch). None: one scale, the chip's own size.
    scales: ScaleFactors | None = None
    #: Plain and multi-scale: resize each chip to ``size × size`` px first (the geography follows exactly).
    size: Annotated[int, Field(ge=1)] | None = None
    #: NaViT-style dynamic resolution (plain items): each chip resized at its own aspect ratio to the most patches
    #: within this budget (:func:`navit_size`), up or down; None: the chip's own size.
    max_patches: Annotated[int, Field(ge=1)] | None = None
    #: Interpolation of every resize (NaN-aware, :func:`~agrivlm.pipeline.frames.resize_frames`).
    resize_mode: ResizeMode = "bilinear"
    #: Value that replaces no data (NaN) in the pixels fed to the encoder.
    fill_value: float = 0.0

    @field_validator("bands")
    @classmethod
    def _bands_have_preset(cls, v: BandConfig | None) -> BandConfig | None:
        if v is not None and v.preset is None:
            raise ValueError("bands needs a preset to scale a chip's bands (or bands: null for the values as they are)")
        return v

    @model_validator(mode="after")
    def _one_layout(self) -> ChipInputConfig:
        check_item_layout(self.anyres, self.scales, self.max_patches)
        if self.anyres is not None and self.size is not None:
            raise ValueError("size resizes plain and multi-scale chips; AnyRes tiles are anyres.tile_size px")
        if self.size is not None and self.max_patches is not None:
            raise ValueError("use either size (a fixed square) or max_patches (a token budget), not both")
        return self


def check_item_layout(anyres: AnyResConfig | None, scales: Sequence[float] | None,
                      max_patches: int | None = None) -> None:
    """The rule of every ``anyres`` / ``scales`` / ``max_patches`` set (chip settings, stage configs, saved inputs).

    Raises:
        ValueError: more than one is set, or ``scales`` is empty.
    """
    if anyres is not None and scales is not None:
        raise ValueError("use either anyres or scales, not both")
    if max_patches is not None and (anyres is not None or scales is not None):
        raise ValueError("max_patches is a plain item's token budget; it does not go with anyres or scales")
    if scales is not None and not scales:
        raise ValueError("scales needs at least one factor (or null for one scale)")


def navit_size(height: int, width: int, patch_size: int, max_patches: int) -> tuple[int, int]:
    """NaViT's resize: the largest ``(h, w)``, multiples of ``patch_size``, at ``height : width``, within the budget.

    The scale ``sqrt(max_patches / patches)`` is applied to both sides, each rounded down to whole patches (at least
    one); sides are then shortened a patch at a time, the longer first, until ``(h/p)·(w/p) ≤ max_patches``.
    """
    p = patch_size
    s = math.sqrt(max_patches / ((height / p) * (width / p)))
    rows, cols = max(1, math.floor(height * s / p)), max(1, math.floor(width * s / p))
    while rows * cols > max_patches:
        if rows >= cols:
            rows -= 1
        else:
            cols -= 1
    return rows * p, cols * p


def frames_as_bands(pixels: npt.NDArray[Any], frame_times: npt.ArrayLike) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """A sample's frames ``(T, C, H, W)`` as one frame of ``T·C`` bands (date-major), at their mean time.

    The dates become channels of one image, so the vision encoder sees every date of a patch at once (as the FTW
    field-boundary baselines stack dates as channels) instead of each frame alone.
    """
    t, c, h, w = pixels.shape
    times = np.asarray(frame_times, dtype=np.float64)
    return pixels.reshape(1, t * c, h, w), np.array([times.mean() if times.size else 0.0], dtype=times.dtype)


def item_layout(anyres: AnyResConfig | None, scales: Sequence[float] | None,
                max_patches: int | None = None) -> ChipInputConfig | None:
    """The layout of :meth:`AgriVLMProcessor.from_frames` for training's / a checkpoint's item settings.

    ``anyres``, ``scales`` or ``max_patches``; None when all are None (one item per frame stack,
    :meth:`AgriVLMProcessor.__call__`).
    """
    if anyres is None and scales is None and max_patches is None:
        return None
    return ChipInputConfig(anyres=anyres, scales=None if scales is None else [float(x) for x in scales],
                           max_patches=max_patches)


def chip_config_with_inputs(config: ChipInputConfig, inputs: Mapping[str, Any]) -> ChipInputConfig:
    """``config`` with the frame sampling and band scaling of a checkpoint's input settings.

    ``inputs`` is :class:`agrivlm.pipeline.inputs.InputConfig` as JSON (``agrivlm_inputs.yaml``, what ``agrivlm infer``
    reads): its ``frames`` become ``sampling`` and its ``bands`` become ``bands`` (None when they name no preset),
    so :meth:`AgriVLMProcessor.from_chips` picks and scales a chip's frames as ``agrivlm infer`` does. The other
    keys (tiles, scales, resizing, fill value) stay as they are.

    Raises:
        ConfigError: ``frames`` or ``bands`` that are not valid settings (naming the key).
    """
    update: dict[str, Any] = {}
    if inputs.get("frames") is not None:
        update["sampling"] = parse_config(FrameSamplingConfig, dict(inputs["frames"]), "processor inputs.frames")
    bands = dict(inputs.get("bands") or {})
    update["bands"] = None
    if bands.get("preset") is not None:
        keep = {k: v for k, v in bands.items() if k in BandConfig.model_fields}
        update["bands"] = parse_config(BandConfig, keep, "processor inputs.bands")
    return ChipInputConfig.model_validate({**config.model_dump(), **update})




# -- chip inputs: what comes back ---------------------------------------------------------------------


ItemKind = Literal["chip", "scale", "thumbnail", "tile"]


#: A nominal CRS for the pixel frame of frames given without geography (:meth:`AgriVLMProcessor.from_frames`):
#: only the affine pixel ↔ (u, v) arithmetic is used, never a reprojection.
PIXEL_CRS = CRS.from_epsg(3857)


@dataclass(frozen=True)
class VisualItem:
    """Where one visual item (one row of ``pixel_values``) lies.

    Attributes:
        chip: index of its chip in :attr:`ChipBatch.chips`.
        kind: ``"chip"`` (plain), ``"scale"``, ``"thumbnail"`` or ``"tile"``.
        grid: the item's pixels as fed to the encoder: normalized ``(u, v)`` *of the item* → CRS with
            ``grid.norm_to_crs(u, v)``.
        chip_grid: the chip's grid.
        window: the chip pixels it shows, on the chip's grid (the whole chip except for tiles).
        token_grid: ``(h', w')`` visual tokens per frame (:func:`visual_token_grid`).
        scale: the scale factor (``"scale"`` items; 1.0 otherwise).
        tile: the :class:`~agrivlm.pipeline.anyres.Tile` of a thumbnail or tile, else None.
    """

    chip: int
    kind: ItemKind
    grid: GeoGrid
    chip_grid: GeoGrid
    window: Window
    token_grid: tuple[int, int]
    scale: float = 1.0
    tile: Tile | None = None

    @property
    def num_tokens_per_frame(self) -> int:
        """``h'·w'``."""
        return self.token_grid[0] * self.token_grid[1]

    def to_crs(self, u: npt.ArrayLike, v: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
        """Normalized ``(u, v)`` of this item → CRS ``(x, y)``."""
        return self.grid.norm_to_crs(u, v)

    def to_chip(self, u: npt.ArrayLike, v: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
        """Normalized ``(u, v)`` of this item → normalized ``(u, v)`` of the chip (via the CRS, as ``Tile.to_chip``)."""
        return self.chip_grid.crs_to_norm(*self.grid.norm_to_crs(u, v))


@dataclass(frozen=True)
class ChipGeography:
    """Where and when one chip of a batch is: what turns decoded positions into map coordinates and dates.

    Positions the model reads and writes are the *chip's* normalized ``(u, v)`` (and ``t`` on ``time_axis``),
    whatever the tiling: a tile's visual tokens carry chip positions.

    Attributes:
        chip_id: the chip's id.
        sample: index of the prompt it belongs to.
        grid: the chip's grid: decoded ``(u, v)`` → CRS with ``grid.norm_to_crs``.
        time_axis: the season windows the chip's usable dates fall in (a record's ``time_range``), as
            training and ``agrivlm infer`` measure ``t`` (:func:`~agrivlm.pipeline.frames.frame_time_positions`);
            not the chosen frames' range.
        frame_dates: ``(T,)`` ``datetime64[us]`` acquisition time of each frame.
        frame_indices: ``(T,)`` int64 index of each frame into the chip's date axis (``chip.times``).
        frame_t: ``(T,)`` normalized time of each frame on ``time_axis`` (the ``frame_times`` row fed to the model).
        items: rows of ``pixel_values`` (and of :attr:`ChipBatch.items`) that show this chip, in order.
        grid_shape: ``(rows, cols)`` of AnyRes tiles, or None.
        stats: the band normalisation used (per chip or fixed), or None without band scaling.
    """

    chip_id: str
    sample: int
    grid: GeoGrid
    time_axis: TimeAxis
    frame_dates: npt.NDArray[np.datetime64]
    frame_indices: npt.NDArray[np.int64]
    frame_t: FloatArray
    items: tuple[int, ...]
    grid_shape: tuple[int, int] | None = None
    stats: BandStats | None = None

    def to_crs(self, u: npt.ArrayLike, v: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
        """Decoded chip-normalized ``(u, v)`` → CRS ``(x, y)``."""
        return self.grid.norm_to_crs(u, v)

    def to_dates(self, t: npt.ArrayLike) -> npt.NDArray[np.datetime64]:
        """Decoded normalized ``t`` → dates (``datetime64[us]``)."""
        return self.time_axis.from_norm(t)


@dataclass(frozen=True)
class ChipBatch:
    """What :meth:`AgriVLMProcessor.from_chips` returns.

    Attributes:
        batch: the model inputs: ``model(**chip_batch.batch)`` / ``model.generate(**chip_batch.batch)``.
        chips: one :class:`ChipGeography` per chip, in the order given.
        items: one :class:`VisualItem` per row of ``pixel_values``.
    """

    batch: BatchFeature
    chips: tuple[ChipGeography, ...]
    items: tuple[VisualItem, ...]




def saved_processor_config(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``processor_config.json`` of a checkpoint folder as a dict (tokenizer not loaded), or None without one.

    Raises:
        ConfigError: the file is not a JSON object (naming it).
    """
    from transformers.utils import PROCESSOR_NAME  # transformers: loaded only when needed

    return read_json_mapping(Path(folder) / PROCESSOR_NAME)

# -- the checkpoint's input settings (``agrivlm_inputs.yaml``) ------------------------------------------------
#
# How a checkpoint wants its inputs: chip grid, frames, bands — ``agrivlm_inputs.yaml`` beside the weights.
#
# A model only answers well on inputs like those it was trained on, so the chip size, the frame selection and
# the band normalisation travel with the checkpoint in ``CKPT_DIR/agrivlm_inputs.yaml`` (:class:`InputConfig`,
# strict: unknown keys are errors). The same settings live in the processor's ``processor_config.json``
# (``inputs``, :meth:`~agrivlm.model.processing.AgriVLMProcessor.set_checkpoint_inputs`), the source the file is
# written from, so a ``save_pretrained`` → ``from_pretrained`` → ``save_pretrained`` round trip keeps them. A
# trainer writes both (``agrivlm.train.final.save_final``); ``agrivlm infer`` reads them with
# :func:`load_input_config` (the file first, else the processor's) and lets flags override single values. Without
# either the defaults below apply; they are the recipes' defaults (``agrivlm.recipes.config``), i.e. the inputs the
# training records describe:
#
# * chips of 32 px, stride 16, the last row/column snapped to the raster's edge;
# * frames: the chip's dates that are more than 60 % clear (data, no cloud; cloudy pixels become no data),
#   at most 16 evenly spread over them (``sample_frames`` with ``uniform``/``index``, ``empty="drop"``);
#   chips with fewer than 4 such dates are skipped (``min_frames``);
# * growth questions: one season per calendar year starting on ``season_start`` (01-01), frames chosen within
#   the season; a field is asked about where at least 9 of its pixels lie in the chip;
# * bands: a sensor preset of :data:`agrivlm.pipeline.bands.PRESETS` (none by default: pass ``--preset`` or
#   write it here), normalised to [0, 1] with fixed per-channel ``low``/``high`` or, without them, each chip's
#   own 2nd–98th percentiles over all its frames.

#: The frame choice every reader of chips starts from (the recipes' ``chips``, the checkpoint's input settings),
#: on the chip grid of :mod:`agrivlm.geo.grid` (``CHIP_SIZE``, ``CHIP_STRIDE``, ``CHIP_EDGE``): a date is a frame
#: when at least 60 % of the chip is clear; at most 16 frames, at least 4.
MIN_CLEAR = 0.6
MAX_FRAMES = 16
MIN_FRAMES = 4
#: Growth: seasons start on this day each year (``MM-DD``); a field is asked about where it has this many pixels.
SEASON_START = "01-01"
MIN_FIELD_PX = 9.0

#: The file beside a checkpoint's weights that says how its inputs are made.
INPUT_CONFIG_FILE = "agrivlm_inputs.yaml"

def default_frames() -> FrameSamplingConfig:
    """The recipes' frame choice: clear dates (> ``min_clear``), at most ``max_frames``, evenly spread."""
    return FrameSamplingConfig(
        sampler="uniform", uniform_by="index", max_frames=MAX_FRAMES, empty="drop", clouds_as_nodata=True,
        min_valid_fraction=MIN_CLEAR,
    )


def clear_threshold(min_clear: float) -> float:
    """The frames' ``min_valid_fraction`` that takes exactly the dates a recipe's ``min_clear`` takes.

    A recipe takes a date whose clear fraction is ``>= min_clear``; the frame sampler keeps one whose valid
    fraction is ``> min_valid_fraction``. The largest float below ``min_clear`` makes the two one rule, ties
    included (a 10 × 10 chip 60 % clear: taken by both); 0 stays 0 (the sampler never keeps an empty frame).
    """
    return float(np.nextafter(min_clear, 0.0)) if min_clear > 0 else 0.0


class ChipRule(StrictModel):
    """How chips are cut and which of a chip's dates are frames: the part of the contract records are made by.

    A recipe's ``chips`` section (``agrivlm recipe build`` cuts its records by it and keeps it in the manifest);
    a trainer reads it back from the manifests (:func:`agrivlm.train.data.recipe_chips`) and writes it into the
    checkpoint's :class:`InputConfig` with :meth:`input_frames`, so ``agrivlm infer`` cuts chips and takes
    dates as the training records did.
    """

    #: Chip size in pixels (square).
    size: int = Field(default=CHIP_SIZE, gt=0)
    #: Step between chips in pixels (default: ``size``).
    stride: int | None = Field(default=CHIP_STRIDE, gt=0)
    #: Remainder at the raster edge: ``snap`` | ``drop``.
    edge: Literal["snap", "drop"] = CHIP_EDGE
    #: A date is usable as a frame when at least this fraction of the chip's pixels is clear (data, no cloud).
    min_clear: float = Field(default=MIN_CLEAR, ge=0.0, le=1.0)
    #: At most this many frames per record (evenly spaced in time over the usable dates).
    max_frames: int = Field(default=MAX_FRAMES, gt=0)
    #: Records need at least this many usable frames.
    min_frames: int = Field(default=MIN_FRAMES, gt=0)

    def input_frames(self, frames: FrameSamplingConfig | None = None) -> FrameSamplingConfig:
        """``frames`` (default :func:`default_frames`) taking exactly this rule's dates: clear ones, ties included.

        Only the date rule changes (:func:`clear_threshold` of ``min_clear``, cloudy pixels counted as not clear);
        how many frames and which of them stay as ``frames`` says: a checkpoint takes as many per question as
        its training samples had, not the records' ``max_frames``.
        """
        base = default_frames() if frames is None else frames
        return base.model_copy(update={"min_valid_fraction": clear_threshold(self.min_clear),
                                       "clouds_as_nodata": True})


class InputConfig(StrictModel):
    """Chip grid, frames and bands of a checkpoint (see the module docstring for the defaults)."""

    chip_size: Annotated[int, Field(gt=0)] = CHIP_SIZE
    stride: Annotated[int, Field(gt=0)] | None = CHIP_STRIDE
    edge: Literal["snap", "drop"] = CHIP_EDGE
    frames: FrameSamplingConfig = Field(default_factory=default_frames)
    #: Chips (or, for growth, seasons of a chip) with fewer usable frames are skipped.
    min_frames: Annotated[int, Field(gt=0)] = MIN_FRAMES
    #: Start of each growth season, ``MM-DD``; the frames' time axis is the season windows from it.
    season_start: str = SEASON_START
    #: How the frames' ``t`` is measured (:data:`~agrivlm.pipeline.frames.TimeAxisRule`): ``seasons``, the rule
    #: training follows; a checkpoint whose saved inputs do not name it was trained on ``usable_dates`` and is
    #: read so (:func:`load_input_config`).
    time_axis: TimeAxisRule = "seasons"
    #: Growth: fields with fewer pixels (area) in a chip are not asked about there.
    min_field_px: Annotated[float, Field(ge=0)] = MIN_FIELD_PX
    bands: BandConfig = Field(default_factory=BandConfig)
    #: How ``--task fields`` asks: ``listing`` — one question per chip, "Outline every field in this image."
    #: (the recipes' ``outline_fields``); ``points`` — "Outline the field at <point>." at the centres of a
    #: ``point_grid`` × ``point_grid`` grid of the chip (the recipes' ``field_at_point``), each answer kept when
    #: its outline holds its point, duplicates merged by NMS. Trainers write ``points`` when the model was
    #: trained on ``field_at_point`` records.
    fields_prompt: Literal["listing", "points"] = "listing"
    #: How ``--task growth`` asks: ``dates`` — "What growth stage is the field at <box> in at <TEMP>?" for every
    #: frame (the recipes' ``stage_on_date``); ``timeline`` — one question per field and season, "Give the growth
    #: stages of the field at <box> over time.", answered as ``<TEMP>`` spans (the recipes' ``stage_timeline``)
    #: and decoded to the stage on every date of the season. Trainers write ``timeline`` when the model was
    #: trained on ``stage_timeline`` records.
    growth_prompt: Literal["dates", "timeline"] = "dates"
    #: ``box``: a growth question sees only the pixels inside its field's box, as the model was trained
    #: (``data.growth_focus``, :mod:`agrivlm.pipeline.focus`); ``none``: the whole chip.
    growth_focus: GrowthFocus = "none"
    #: ``square``: each point prompt's point is drawn into its frames, as the model was trained
    #: (``data.point_marker``, :func:`~agrivlm.pipeline.focus.mark_point`); ``none``: in the words only.
    point_marker: PointMarker = "none"
    #: How a question's positions (the point of ``points``, the field's box of ``growth``) are written: ``bins`` —
    #: position tokens; ``input`` — ``-INPUT`` placeholders carrying the exact values
    #: (:data:`~agrivlm.lape.tokens.QuestionPositions`). Trainers write the ``data.question_positions`` they used.
    question_positions: QuestionPositions = "bins"
    #: AnyRes: each question's frames become a thumbnail plus tiles of ``tile_size`` px
    #: (:meth:`~agrivlm.model.processing.AgriVLMProcessor.from_frames`), as the model was trained
    #: (``data.anyres``); None: one item.
    anyres: AnyResConfig | None = None
    #: Multi-scale: one item per scale factor (``data.scales``); None: one scale.
    scales: ScaleFactors | None = None
    #: NaViT-style dynamic resolution (``data.max_patches``): each chip at its aspect ratio within this patch budget.
    max_patches: Annotated[int, Field(ge=1)] | None = None
    #: The frames as the bands of one image (``data.frames_as_bands``, :func:`frames_as_bands`): the model's
    #: ``num_bands`` is then frames × bands.
    frames_as_bands: bool = False
    #: Points per side of the ``points`` prompt grid.
    point_grid: Annotated[int, Field(gt=0)] = 6

    @model_validator(mode="after")
    def _one_layout(self) -> InputConfig:
        check_item_layout(self.anyres, self.scales, self.max_patches)
        return self


def load_input_config(folder: str | os.PathLike[str]) -> tuple[InputConfig, bool]:
    """``(config, found)``: the checkpoint's input settings, or the defaults (``found`` False) when it has none.

    From its :data:`INPUT_CONFIG_FILE`, else the ``inputs`` its ``processor_config.json`` carries.

    Raises:
        ConfigError: the file or the processor's ``inputs`` have an unknown key or a bad value (naming the file
            and key).

    """
    from transformers.utils import PROCESSOR_NAME  # transformers: loaded only when needed

    path = Path(folder) / INPUT_CONFIG_FILE
    if path.is_file():
        raw = read_yaml_mapping(path)  # read once: the parsed config and whether it names a time_axis
        return _before_seasons(parse_config(InputConfig, raw, str(path)), raw), True
    saved = saved_processor_config(folder)
    if saved is None or saved.get("inputs") is None:
        return InputConfig(), False
    config = parse_config(InputConfig, saved["inputs"], f"{Path(folder) / PROCESSOR_NAME}: inputs")
    return _before_seasons(config, saved["inputs"]), True


def _before_seasons(config: InputConfig, raw: Any) -> InputConfig:
    """Saved inputs that do not name a ``time_axis`` come from a checkpoint trained on ``usable_dates``."""
    if isinstance(raw, dict) and "time_axis" not in raw:
        return config.model_copy(update={"time_axis": "usable_dates"})
    return config


def save_input_config(config: InputConfig, folder: str | os.PathLike[str]) -> Path:
    """Write ``config`` as :data:`INPUT_CONFIG_FILE` into a checkpoint folder; returns the path."""
    path = Path(folder) / INPUT_CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    data = config.model_dump(mode="json")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
