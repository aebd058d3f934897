"""Instruction records: one JSON object per line, validated on write and on read.

A record ties one chip of a stack (its window, transform, CRS and the dates used as frames) to a
conversation about it: turns (:class:`~agrivlm.tasks.turns.Turn`) whose positions are normalized floats,
never token strings, named in the text by placeholders (:mod:`agrivlm.tasks.turns`). The visual placeholder
(``<video>``/``<image>``) is *not* in the text: the processor inserts it.

Records are written with sorted keys, no spaces, normalized values rounded to :data:`~agrivlm.tasks.turns.NORM_DECIMALS`
decimals and everything else as Python's shortest float repr, so the same inputs give the same bytes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agrivlm.errors import RecordError
from agrivlm.geo.coords import TimeAxis
from agrivlm.tasks.turns import (
    POSITION_FIELDS,
    BoxFormatter,
    PointFormatter,
    SegmentFormatter,
    TimeFormatter,
    Turn,
    render_text,
)

#: Version of the record layout; readers refuse records of another version.
SCHEMA_VERSION: Literal[1] = 1


#: Task families (one recipe each).
Family = Literal["field_boundaries", "growth_stages", "general_rs", "spatial_reasoning"]
FAMILIES: tuple[str, ...] = ("field_boundaries", "growth_stages", "general_rs", "spatial_reasoning")

#: Splits, by geography (see :mod:`agrivlm.recipes.splits`).
Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Window(_Model):
    """A pixel window on the stack's reference grid (rasterio ``Window`` fields)."""

    col_off: int = Field(ge=0)
    row_off: int = Field(ge=0)
    width: int = Field(gt=0)
    height: int = Field(gt=0)


class StackRef(_Model):
    """Which stack, and which of its files are the record's frames.

    ``data`` / ``masks`` are the recipe's source specs: ``sample:<folder>`` (the embedded sample, resolved
    through :mod:`agrivlm.sample`) or an absolute path; see :func:`agrivlm.sample.resolve_spec`.
    """

    #: Data source spec (folder or glob of GeoTIFFs).
    data: str
    #: Mask source spec, or ``None`` when the stack has no masks.
    masks: str | None = None
    #: File name(s) of each frame, relative to ``data`` (``+``-joined for same-day mosaics).
    frame_files: list[str]
    #: Mask file name of each frame (``None`` for a date without a mask).
    frame_mask_files: list[str | None] = Field(default_factory=list)
    #: Names of the stack's bands, in file order.
    bands: list[str] = Field(default_factory=list)
    #: A STAC stack's assets (the bands) and its masks' assets and mask values; left out of records otherwise.
    assets: list[str] | None = None
    mask_assets: list[str] | None = None
    mask_values: list[int] | None = None

    def open(self, same_day: str = "keep") -> Any:  # noqa: ANN401 — agrivlm.geo.stack.Stack (lazy import)
        """The stack these specs name (:func:`~agrivlm.geo.stack.open_stack`, specs resolved)."""
        from agrivlm.geo.stack import open_stack
        from agrivlm.sample import resolve_spec

        return open_stack(resolve_spec(self.data), masks=resolve_spec(self.masks) if self.masks else None,
                          same_day=same_day, assets=self.assets, mask_assets=self.mask_assets,  # type: ignore[arg-type]
                          mask_values=self.mask_values)


class ChipRef(_Model):
    """The chip: window, own georeference, and the dates used as frames."""

    #: ``r{row_off:06d}_c{col_off:06d}`` (:func:`agrivlm.geo.chips.chip_id`).
    chip_id: str
    window: Window
    #: Affine of the chip's pixel edges → CRS, ``(a, b, c, d, e, f)`` as in rasterio.
    transform: tuple[float, float, float, float, float, float]
    #: ``EPSG:xxxx`` when the CRS has a code, else its WKT.
    crs: str
    #: Acquisition times of the frames, ISO ``YYYY-MM-DDTHH:MM:SS``, increasing.
    frame_dates: list[str] = Field(min_length=1)
    #: Index of each frame in the stack's time axis (sorted by time, as ``open_stack`` orders it).
    frame_indices: list[int] = Field(min_length=1)
    #: The time axis the frames' and the answers' ``t`` are measured on, ISO start and end: the season windows
    #: the frames fall in (:func:`agrivlm.pipeline.frames.frame_time_positions`). ``None`` in records written
    #: before it: their answers are on the range of ``frame_dates``, which is then the axis.
    time_range: tuple[str, str] | None = None

    @property
    def time_axis(self) -> TimeAxis:
        """The axis the record's ``t`` are on: ``time_range`` (else the range of ``frame_dates``)."""
        return TimeAxis.from_dates(np.asarray(self.time_range or self.frame_dates, dtype="datetime64[s]"))

    @model_validator(mode="after")
    def _frames_consistent(self) -> ChipRef:
        if len(self.frame_dates) != len(self.frame_indices):
            raise ValueError(f"{len(self.frame_dates)} frame_dates but {len(self.frame_indices)} frame_indices")
        if list(self.frame_dates) != sorted(self.frame_dates) or len(set(self.frame_indices)) != len(
            self.frame_indices
        ):
            raise ValueError("frames must be distinct and in increasing time order")
        if self.time_range is not None and not (
            self.time_range[0] <= self.frame_dates[0] and self.frame_dates[-1] <= self.time_range[1]
        ):
            raise ValueError(f"frames {self.frame_dates[0]} … {self.frame_dates[-1]} are outside the time_range "
                             f"{self.time_range[0]} … {self.time_range[1]}")
        return self


MetaValue = str | int | float | bool | None | list[str] | list[int] | list[float] | list[bool]


class Record(_Model):
    """One instruction sample: a chip reference and a conversation about it."""

    schema_version: Literal[1] = SCHEMA_VERSION
    #: Stable id: the same recipe and inputs give the same id (family, chip, task, subject).
    sample_id: str = Field(min_length=1)
    #: Name of the recipe that made it.
    recipe: str
    family: Family
    #: The question kind within the family (e.g. ``green_up_date``, ``outline_fields``).
    task: str
    split: Split
    stack: StackRef
    chip: ChipRef
    conversation: list[Turn] = Field(min_length=2)
    #: Facts behind the answer, for evaluators and tests (field ids, classes, flags, ISO dates).
    meta: dict[str, MetaValue] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _frames_match_files(self) -> Record:
        if len(self.stack.frame_files) != len(self.chip.frame_indices):
            raise ValueError(
                f"stack.frame_files has {len(self.stack.frame_files)} entries, chip has "
                f"{len(self.chip.frame_indices)} frames"
            )
        if self.stack.frame_mask_files and len(self.stack.frame_mask_files) != len(self.chip.frame_indices):
            raise ValueError("stack.frame_mask_files must have one entry per frame (or be empty)")
        if self.conversation[0].role != "user" or self.conversation[-1].role != "assistant":
            raise ValueError("a conversation starts with a user turn and ends with an assistant turn")
        return self

    @property
    def has_positions(self) -> bool:
        """Whether any turn carries positions (stage-1 alignment data has none)."""
        return any(t.has_positions for t in self.conversation)


# -- serialization ---------------------------------------------------------------------------------------
def dump_record(record: Record) -> str:
    """One JSON line (no newline): sorted keys, compact separators, empty position lists left out."""
    data = record.model_dump(mode="json", exclude_defaults=False)
    for turn in data["conversation"]:
        for name in POSITION_FIELDS.values():
            if not turn[name]:
                del turn[name]
    if not data["stack"]["frame_mask_files"]:
        del data["stack"]["frame_mask_files"]
    for key in ("assets", "mask_assets", "mask_values"):
        if data["stack"][key] is None:
            del data["stack"][key]
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _error_text(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(record)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def parse_record(line: str, source: str = "<record>") -> Record:
    """Parse and validate one JSON line; :class:`RecordError` naming ``source`` otherwise."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RecordError(f"{source}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(data, dict):
        raise RecordError(f"{source}: a record is a JSON object, not {type(data).__name__}")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise RecordError(f"{source}: schema_version {version!r}; this agrivlm reads version {SCHEMA_VERSION}")
    try:
        return Record.model_validate(data)
    except ValidationError as exc:
        raise RecordError(f"{source}: {_error_text(exc)}") from exc


def write_records(path: str | os.PathLike[str], records: Iterable[Record]) -> int:
    """Write records as JSONL to ``path`` (validating each again); returns the count.

    The caller makes the write atomic (``build`` writes into a temporary folder that replaces the old one).

    Raises:
        RecordError: naming the file and the line of the first invalid record.

    """
    path = Path(path)
    n = 0
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for n, record in enumerate(records, start=1):
            line = dump_record(record)
            parse_record(line, f"{path}:{n}")  # a record that would not read back is never written
            fh.write(line + "\n")
    return n


def iter_records(path: str | os.PathLike[str]) -> Iterator[Record]:
    """Read and validate a JSONL shard record by record.

    Raises:
        RecordError: ``FILE:LINE: what is wrong`` at the first invalid line (blank lines too).

    """
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: no such shard")
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                raise RecordError(f"{path}:{lineno}: blank line; a shard has one record per line")
            yield parse_record(line, f"{path}:{lineno}")


def read_records(path: str | os.PathLike[str]) -> list[Record]:
    """All records of a shard (see :func:`iter_records`)."""
    return list(iter_records(path))


def render_conversation(
    record: Record,
    fmt_box: BoxFormatter,
    fmt_point: PointFormatter,
    fmt_segment: SegmentFormatter,
    fmt_time: TimeFormatter,
    polygon_sep: str = "",
) -> list[tuple[str, str]]:
    """``[(role, text), ...]`` with positions serialized by the given formatters.

    At training time pass the LAPE codec's functions (e.g. a box → ``<WIDTH-a><HEIGHT-b><WIDTH-c><HEIGHT-d>``,
    a time → ``<TEMP-k>``); :func:`plain_formatters` gives readable numbers for previews.
    """
    return [
        (t.role, render_text(t, fmt_box, fmt_point, fmt_segment, fmt_time, polygon_sep)) for t in record.conversation
    ]


def plain_formatters(decimals: int = 3) -> dict[str, Any]:
    """Readable formatters for previews: ``[u1, v1, u2, v2]``, ``(u, v)``, ``t=0.25``, ``[t1–t2]``."""
    f = f"{{:.{decimals}f}}"
    return {
        "fmt_box": lambda b: "[" + ", ".join(f.format(x) for x in b) + "]",
        "fmt_point": lambda p: "(" + ", ".join(f.format(x) for x in p) + ")",
        "fmt_segment": lambda s: "[t=" + f.format(s[0]) + "–" + f.format(s[1]) + "]",
        "fmt_time": lambda t: "t=" + f.format(t),
        "polygon_sep": " ",
    }
