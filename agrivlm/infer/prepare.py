"""The data side of inference: a chip → its frames, normalised bands and the questions asked about it.

Per chip (:class:`ChipPreparer`): frames with :func:`agrivlm.pipeline.frames.sample_frames` and the
checkpoint's :class:`~agrivlm.pipeline.inputs.InputConfig` → bands with
:func:`agrivlm.pipeline.bands.prepare_bands` → one :class:`~agrivlm.infer.generate.Visual` → the task's
questions:

* ``fields`` and ``ask``: frames over all the chip's dates, one question (the recipes' ``outline_fields``
  question, or the user's); with the checkpoint's ``fields_prompt: points``, the recipes' ``field_at_point``
  question at each point of a ``point_grid`` × ``point_grid`` grid (the point in the question's ``meta``);
* ``growth``: per season (a calendar year from ``season_start``), frames within the season; per field of
  ``--fields`` with at least ``min_field_px`` pixels in the chip, the recipes' ``stage_on_date`` question about
  the box of its visible part (:func:`agrivlm.geo.coords.norm_box`, as the records compute it) at each
  frame's date, given as the frame's ``<TEMP>`` token.

Frame times follow the one rule of :func:`agrivlm.pipeline.frames.frame_time_positions`, as in training:
each frame's ``t`` is its date on the season windows (from ``season_start``) the chip's usable dates fall in
(a growth question's: its season's window) — the axis the instruction records' ``time_range`` and answer
times use — not on the chosen frames' own range.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import numpy.typing as npt
import shapely
from rasterio.crs import CRS

from agrivlm.errors import PipelineError
from agrivlm.geo.chips import Chip
from agrivlm.geo.coords import GeoGrid, norm_box
from agrivlm.geo.dates import day_str, season_windows, to_days
from agrivlm.infer.errors import InferError
from agrivlm.infer.generate import Question, Visual
from agrivlm.infer.prompts import (
    Task,
    build_prompt,
    field_at_point_question,
    fields_question,
    stage_question,
    timeline_question,
)
from agrivlm.io import field_ids, read_vector, require_crs
from agrivlm.lape.tokens import LapeVocab
from agrivlm.pipeline.bands import BandStats, check_band_count, composite, get_preset, prepare_bands
from agrivlm.pipeline.focus import focus_on_box, mark_point
from agrivlm.pipeline.frames import Frames, sample_frames
from agrivlm.pipeline.inputs import InputConfig

log = logging.getLogger(__name__)

#: Id columns tried, in order, when ``--field-id`` is not given (else the row number is the id).


def channels_of(config: InputConfig) -> int:
    """Channels the band settings give each frame (3 for a composite, else the preset's band count).

    Raises:
        InferError: no preset configured.

    """
    bands = config.bands
    if bands.preset is None:
        raise InferError(
            "no band preset: pass --preset (one of the keys of agrivlm.pipeline.bands.PRESETS, e.g. ndvi or "
            "sentinel2_l2a) or save it in the checkpoint's agrivlm_inputs.yaml (agrivlm.infer.save_input_config)"
        )
    preset = get_preset(bands.preset)
    if bands.composite is not None:
        composite(np.zeros((1, len(preset.bands), 1, 1), np.float32), preset, bands.composite)  # checks the name
        return 3
    return len(preset.bands)


def check_stack_bands(config: InputConfig, n_bands: int, source: str) -> None:
    """The stack's band count against the preset (:class:`PipelineError` naming the stack and both counts)."""
    assert config.bands.preset is not None
    check_band_count(np.zeros((1, n_bands, 1, 1), np.float32), config.bands.preset, source)


def normalize_frames(frames: Frames, config: InputConfig) -> npt.NDArray[np.float32]:
    """Frames' stored values → ``(T, C', h, w)`` channels in [0, 1] (NaN = no data), as the checkpoint wants."""
    bands = config.bands
    assert bands.preset is not None
    stats = None
    if bands.low is not None or bands.high is not None:
        if bands.low is None or bands.high is None:
            raise InferError("bands: give both low and high (fixed normalisation), or neither (per-chip percentiles)")
        stats = BandStats(np.asarray(bands.low, np.float64), np.asarray(bands.high, np.float64), bands.percentiles)
    out, _ = prepare_bands(
        frames.pixels, bands.preset, composite_name=bands.composite, times=frames.times, stats=stats,
        percentiles=bands.percentiles, source=f"chip {frames.chip_id}",
    )
    return out


def make_visual(frames: Frames, config: InputConfig) -> Visual:
    """The model's view of some frames: normalised pixels, frame times (``frames.t`` on ``frames.time_axis``), dates."""
    return Visual(pixels=normalize_frames(frames, config), frame_times=frames.t,
                  dates=np.asarray(frames.times, dtype="datetime64[s]"), time_axis=frames.time_axis)


def chip_frames(chip: Chip, config: InputConfig) -> Frames:
    """:func:`sample_frames` with the checkpoint's settings, and at least ``min_frames`` of them.

    Raises:
        PipelineError: no usable date, or fewer than ``min_frames`` (naming the chip).

    """
    frames = sample_frames(chip, config.frames, season_start=config.season_start, time_axis=config.time_axis)
    if len(frames) < config.min_frames:
        raise PipelineError(
            f"chip {chip.chip_id}: {len(frames)} usable frame(s), fewer than min_frames={config.min_frames}"
        )
    return frames


def sub_chip(chip: Chip, keep: npt.NDArray[np.bool_]) -> Chip:
    """The chip restricted to some of its dates (``keep`` ``(T,)``)."""
    return dataclasses.replace(
        chip, times=chip.times[keep], data=chip.data[keep], nodata=chip.nodata[keep], mask=chip.mask[keep],
        files=[f for f, k in zip(chip.files, keep.tolist(), strict=True) if k],
    )


@dataclass
class FieldLayer:
    """The fields a ``growth`` run asks about: ids, classes and polygons in one CRS, with a spatial index."""

    ids: npt.NDArray[np.object_]
    classes: npt.NDArray[np.object_]
    geoms: npt.NDArray[np.object_]
    crs: CRS
    path: Path

    def __post_init__(self) -> None:
        self.tree = shapely.STRtree(self.geoms)

    @classmethod
    def read(
        cls, path: str | os.PathLike[str], id_column: str | None = None, class_column: str | None = None
    ) -> FieldLayer:
        """Read a polygon layer (GPKG, GeoJSON, Shapefile, GeoParquet; any CRS).

        Ids: ``id_column`` (unique), else the first unique column of :data:`agrivlm.io.FIELD_ID_COLUMNS`, else the
        row number (:func:`agrivlm.io.field_ids`). Classes (for the question's wording, e.g. "grassland parcel"):
        ``class_column`` or none.

        Raises:
            InferError: missing or unreadable file, no CRS, unknown or non-unique id column, no polygon.

        """
        path = Path(path)
        frame = read_vector(path, "fields layer", InferError,
                            hint=" (--fields); give a GeoPackage/GeoJSON of field polygons")
        require_crs(frame, path, "fields layer", InferError)
        frame = frame[frame.geometry.notna() & ~frame.geometry.is_empty
                      & frame.geometry.geom_type.isin(["Polygon", "MultiPolygon"])]
        if frame.empty:
            raise InferError(f"{path}: the fields layer holds no polygon")
        id_series, _, notes = field_ids(frame, path, id_column, InferError, "--field-id")
        for note in notes:
            log.warning("%s: %s", path, note)
        ids = id_series.to_numpy()
        if class_column is not None and class_column not in frame.columns:
            raise InferError(f"{path}: no column {class_column!r} (--field-class)")
        classes = (frame[class_column].fillna("").astype(str).to_numpy() if class_column
                   else np.array([""] * len(frame), dtype=object))
        geoms = shapely.make_valid(frame.geometry.to_numpy())
        return cls(np.asarray(ids, dtype=object), np.asarray(classes, dtype=object), np.asarray(geoms, dtype=object),
                   CRS.from_user_input(frame.crs), path)

    def to_crs(self, crs: CRS) -> FieldLayer:
        """The same fields in ``crs``."""
        if crs == self.crs:
            return self
        series = gpd.GeoSeries(self.geoms, crs=self.crs.to_wkt()).to_crs(crs.to_wkt())
        return FieldLayer(self.ids, self.classes, np.asarray(series.to_numpy(), dtype=object), crs, self.path)

    def in_chip(self, grid: GeoGrid, min_px: float) -> list[tuple[str, str, tuple[float, float, float, float]]]:
        """``(field_id, class, box)`` of the fields with at least ``min_px`` pixels (area) in the chip.

        The box is that of the field's visible part, normalized to the chip (``norm_box``, as records).
        """
        footprint = grid.footprint()
        hits = np.sort(self.tree.query(footprint, predicate="intersects"))
        t = grid.transform
        pixel_area = abs(t.a * t.e - t.b * t.d)
        out = []
        for k in hits.tolist():
            clipped = shapely.intersection(self.geoms[k], footprint)
            if clipped.is_empty or clipped.area / pixel_area < min_px:
                continue
            out.append((str(self.ids[k]), str(self.classes[k]), norm_box(grid, clipped)))
        return out


@dataclass
class ChipQuestions:
    """What is asked about one chip (no question when there is nothing to ask, with the reason in ``note``)."""

    questions: list[Question]
    note: str = ""


class ChipPreparer:
    """Turns chips into questions for one task (see the module docstring)."""

    def __init__(self, config: InputConfig, task: Task, vocab: LapeVocab, question: str | None = None,
                 fields: FieldLayer | None = None) -> None:
        self.config = config
        self.task = task
        self.vocab = vocab
        self.fields = fields
        self.ask_text = question or ""
        if task == "ask" and not self.ask_text.strip():
            raise InferError("--task ask needs --question TEXT")
        if task == "growth" and fields is None:
            raise InferError("--task growth needs --fields PATH: the field polygons whose stages to predict")
        self.fields_prompt = fields_question(vocab)
        # the point grid's questions are the same for every chip: rendered once
        centres = [round(float(c), 6) for c in (np.arange(config.point_grid) + 0.5) / config.point_grid]
        given = config.question_positions
        self.point_prompts = [((u, v), field_at_point_question(vocab, (u, v), given)) for v in centres
                              for u in centres] \
            if task == "fields" and config.fields_prompt == "points" else []

    def prepare(self, chip: Chip) -> ChipQuestions:
        """The chip's questions.

        Raises:
            PipelineError: the chip cannot become model input (too few usable frames, nothing to normalise);
                the caller records the chip as skipped with this message.

        """
        if self.task == "growth":
            return self._growth(chip)
        frames = chip_frames(chip, self.config)
        visual = make_visual(frames, self.config)
        if self.point_prompts:
            marked = self.config.point_marker == "square"
            return ChipQuestions([
                Question(dataclasses.replace(visual, pixels=mark_point(visual.pixels, point)) if marked else visual,
                         build_prompt(prompt.text, len(frames)), prompt.positions, {"point": list(point)})
                for point, prompt in self.point_prompts])
        if self.task == "fields":
            prompt = self.fields_prompt
            return ChipQuestions([Question(visual, build_prompt(prompt.text, len(frames)), prompt.positions)])
        # the user's words as typed (LAPE tokens such as <WIDTH-010> in them are read as tokens)
        return ChipQuestions([Question(visual, build_prompt(self.ask_text, len(frames)))])

    def _growth(self, chip: Chip) -> ChipQuestions:
        assert self.fields is not None
        in_chip = self.fields.in_chip(chip.grid, self.config.min_field_px)
        if not in_chip:
            return ChipQuestions([], f"no field with ≥ {self.config.min_field_px:g} px in the chip")
        days = to_days(chip.times)
        questions: list[Question] = []
        notes = []
        for label, start, end in season_windows(float(days.min()), float(days.max()), self.config.season_start):
            keep = (days >= start) & (days < end)
            if not keep.any():
                continue
            try:
                frames = chip_frames(sub_chip(chip, keep), self.config)
            except PipelineError as exc:
                notes.append(f"season {label}: {exc}")
                continue
            whole = make_visual(frames, self.config)

            def visual_of(box: tuple[float, float, float, float], whole: Visual = whole) -> Visual:
                if self.config.growth_focus != "box":
                    return whole
                return dataclasses.replace(whole, pixels=focus_on_box(whole.pixels, box))

            if self.config.growth_prompt == "timeline":
                # one question per field and season; its spans give the stage on every date of the season
                season_dates = chip.times[keep]
                ts = [round(float(t), 6) for t in frames.time_axis.to_norm(season_dates)]
                dates = [day_str(w) for w in season_dates]
                for field_id, cls, box in in_chip:
                    prompt = timeline_question(self.vocab, box, cls or None, self.config.question_positions)
                    info = {"field_id": field_id, "season": label, "box": [float(b) for b in box],
                            "dates": dates, "t": ts}
                    questions.append(Question(visual_of(box), build_prompt(prompt.text, len(frames)), prompt.positions,
                                              info))
                continue
            for field_id, cls, box in in_chip:
                visual = visual_of(box)
                for when, t in zip(frames.times, frames.t, strict=True):
                    prompt = stage_question(self.vocab, box, float(t), cls or None,
                                            self.config.question_positions)
                    meta: dict[str, Any] = {"field_id": field_id, "date": day_str(when), "season": label,
                                            "box": [float(b) for b in box]}
                    questions.append(Question(visual, build_prompt(prompt.text, len(frames)), prompt.positions, meta))
        return ChipQuestions(questions, "; ".join(notes))
