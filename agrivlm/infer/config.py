"""How a checkpoint wants its inputs: chip grid, frames, bands — ``agrivlm_inputs.yaml`` beside the weights.

A model only answers well on inputs like those it was trained on, so the chip size, the frame selection and
the band normalisation travel with the checkpoint in ``CKPT_DIR/agrivlm_inputs.yaml`` (:class:`InputConfig`,
strict: unknown keys are errors). The same settings live in the processor's ``processor_config.json``
(``inputs``, :meth:`~agrivlm.pipeline.processor.AgriVLMProcessor.set_checkpoint_inputs`), the source the file is
written from, so a ``save_pretrained`` → ``from_pretrained`` → ``save_pretrained`` round trip keeps them. A
trainer writes both (``agrivlm.train.final.save_final``); ``agrivlm infer`` reads them with
:func:`load_input_config` (the file first, else the processor's) and lets flags override single values. Without
either the defaults below apply; they are the recipes' defaults (``agrivlm.recipes.config``), i.e. the inputs the
training records describe:

* chips of 32 px, stride 16, the last row/column snapped to the raster's edge;
* frames: the chip's dates that are more than 60 % clear (data, no cloud; cloudy pixels become no data),
  at most 16 evenly spread over them (``sample_frames`` with ``uniform``/``index``, ``empty="drop"``);
  chips with fewer than 4 such dates are skipped (``min_frames``);
* growth questions: one season per calendar year starting on ``season_start`` (01-01), frames chosen within
  the season; a field is asked about where at least 9 of its pixels lie in the chip;
* bands: a sensor preset of :data:`agrivlm.pipeline.bands.PRESETS` (none by default: pass ``--preset`` or
  write it here), normalised to [0, 1] with fixed per-channel ``low``/``high`` or, without them, each chip's
  own 2nd–98th percentiles over all its frames.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, model_validator

from agrivlm.config import StrictModel, load_config, parse_config
from agrivlm.lape.tokens import QuestionPositions
from agrivlm.pipeline.focus import GrowthFocus, PointMarker
from agrivlm.pipeline.frames import FrameSamplingConfig
from agrivlm.pipeline.processor import AnyResConfig, ScaleFactors, check_item_layout
from agrivlm.recipes.config import ChipConfig, GrowthStagesConfig, PhenologyConfig

#: The file beside a checkpoint's weights that says how its inputs are made.
INPUT_CONFIG_FILE = "agrivlm_inputs.yaml"

_CHIPS = ChipConfig()


def default_frames() -> FrameSamplingConfig:
    """The recipes' frame choice: clear dates (> ``min_clear``), at most ``max_frames``, evenly spread."""
    return FrameSamplingConfig(
        sampler="uniform", uniform_by="index", max_frames=_CHIPS.max_frames, empty="drop", clouds_as_nodata=True,
        min_valid_fraction=_CHIPS.min_clear,
    )


class BandConfig(StrictModel):
    """Band preset and normalisation (:func:`agrivlm.pipeline.bands.prepare_bands`)."""

    #: A key of ``agrivlm.pipeline.bands.PRESETS`` (``ndvi``, ``sentinel2_l2a``, …); required to run.
    preset: str | None = None
    #: A false-colour composite (``COMPOSITES`` key) giving 3 channels; None: every band of the preset.
    composite: str | None = None
    #: Fixed value mapped to 0, per channel (dataset-wide statistics); None: each chip's own percentiles.
    low: list[float] | None = None
    #: Fixed value mapped to 1, per channel.
    high: list[float] | None = None
    #: Percentiles of the per-chip statistics when ``low``/``high`` are not given.
    percentiles: tuple[float, float] = (2.0, 98.0)


class InputConfig(StrictModel):
    """Chip grid, frames and bands of a checkpoint (see the module docstring for the defaults)."""

    chip_size: Annotated[int, Field(gt=0)] = _CHIPS.size
    stride: Annotated[int, Field(gt=0)] | None = _CHIPS.stride
    edge: Literal["snap", "drop"] = _CHIPS.edge
    frames: FrameSamplingConfig = Field(default_factory=default_frames)
    #: Chips (or, for growth, seasons of a chip) with fewer usable frames are skipped.
    min_frames: Annotated[int, Field(gt=0)] = _CHIPS.min_frames
    #: Start of each growth season, ``MM-DD``.
    season_start: str = PhenologyConfig().season_start
    #: Growth: fields with fewer pixels (area) in a chip are not asked about there.
    min_field_px: Annotated[float, Field(ge=0)] = GrowthStagesConfig().min_field_px
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
    #: (:meth:`~agrivlm.pipeline.processor.AgriVLMProcessor.from_frames`), as the model was trained
    #: (``data.anyres``); None: one item.
    anyres: AnyResConfig | None = None
    #: Multi-scale: one item per scale factor (``data.scales``); None: one scale.
    scales: ScaleFactors | None = None
    #: Points per side of the ``points`` prompt grid.
    point_grid: Annotated[int, Field(gt=0)] = 6

    @model_validator(mode="after")
    def _one_layout(self) -> InputConfig:
        check_item_layout(self.anyres, self.scales)
        return self


def load_input_config(folder: str | os.PathLike[str]) -> tuple[InputConfig, bool]:
    """``(config, found)``: the checkpoint's input settings, or the defaults (``found`` False) when it has none.

    From its :data:`INPUT_CONFIG_FILE`, else the ``inputs`` its ``processor_config.json`` carries.

    Raises:
        ConfigError: the file or the processor's ``inputs`` have an unknown key or a bad value (naming the file
            and key).

    """
    from transformers.utils import PROCESSOR_NAME

    from agrivlm.pipeline.processor import saved_processor_config  # transformers: loaded only when needed

    path = Path(folder) / INPUT_CONFIG_FILE
    if path.is_file():
        return load_config(InputConfig, path), True
    saved = saved_processor_config(folder)
    if saved is None or saved.get("inputs") is None:
        return InputConfig(), False
    return parse_config(InputConfig, saved["inputs"], f"{Path(folder) / PROCESSOR_NAME}: inputs"), True


def save_input_config(config: InputConfig, folder: str | os.PathLike[str]) -> Path:
    """Write ``config`` as :data:`INPUT_CONFIG_FILE` into a checkpoint folder; returns the path."""
    path = Path(folder) / INPUT_CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    data = config.model_dump(mode="json")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
