"""The grammar of a conversation turn, shared by the recipes that write records and the code that asks questions.

Positions in a turn are **normalized floats, never token strings**:

* a box is ``(u1, v1, u2, v2)``: ``u`` = fraction of the chip's width from its left edge, ``v`` =
  fraction of its height from its top edge (the chip as stored), ``u1 <= u2``, ``v1 <= v2``, all in
  ``[0, 1]`` (:mod:`agrivlm.geo.coords` conventions; LAPE ``WIDTH`` tokens are ``u``, ``HEIGHT`` are ``v``);
* a point is ``(u, v)``; a polygon is a list of points (its exterior ring, clockwise on the image,
  not closed, starting at its top-most then left-most vertex);
* a time is ``t`` ∈ [0, 1], the fraction of the record's ``chip.time_range``, the season windows its frames
  fall in (``chip.frame_dates``' range in records without it; LAPE ``TEMP`` tokens); a segment is
  ``(t1, t2)`` with ``t1 <= t2``.

**Placeholder convention.** A turn's ``text`` refers to its own position lists by placeholders
``{box:K}``, ``{point:K}``, ``{polygon:K}``, ``{time:K}`` and ``{segment:K}`` (``K`` = index into the
turn's ``boxes``, ``points``, ``polygons``, ``times``, ``segments``). Every placeholder must point to an
existing entry and every entry must be referenced at least once. :func:`render_text` replaces them with
whatever a formatter returns (LAPE tokens at training and inference time, readable numbers for a preview),
so a turn never fixes the number of position tokens.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

#: Decimals kept for normalized values (1e-6 of a chip: far below one position token).
NORM_DECIMALS = 6

#: Placeholder pattern in turn texts: ``{kind:index}``.
PLACEHOLDER = re.compile(r"\{(box|point|polygon|time|segment):(\d+)\}")

#: Which list of a turn each placeholder kind indexes.
POSITION_FIELDS = {"box": "boxes", "point": "points", "polygon": "polygons", "time": "times", "segment": "segments"}


def _unit(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"normalized value {value!r} is outside [0, 1]")
    return round(float(value), NORM_DECIMALS)


#: A normalized value in [0, 1], rounded to NORM_DECIMALS decimals.
Unit = Annotated[float, AfterValidator(_unit)]


def _ordered_box(box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    if box[0] > box[2] or box[1] > box[3]:
        raise ValueError(f"box {box} must be (u1, v1, u2, v2) with u1 <= u2 and v1 <= v2")
    return box


def _ordered_segment(seg: tuple[float, float]) -> tuple[float, float]:
    if seg[0] > seg[1]:
        raise ValueError(f"segment {seg} must be (t1, t2) with t1 <= t2")
    return seg


Box = Annotated[tuple[Unit, Unit, Unit, Unit], AfterValidator(_ordered_box)]
Point = tuple[Unit, Unit]
Segment = Annotated[tuple[Unit, Unit], AfterValidator(_ordered_segment)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Turn(_Model):
    """One message. ``text`` refers to the position lists by ``{kind:K}`` placeholders."""

    #: ``user`` asks, ``assistant`` answers.
    role: Literal["user", "assistant"]
    #: Message text with placeholders (see the module docstring).
    text: str
    #: Boxes ``(u1, v1, u2, v2)``, normalized to the chip.
    boxes: list[Box] = Field(default_factory=list)
    #: Points ``(u, v)``, normalized to the chip.
    points: list[Point] = Field(default_factory=list)
    #: Polygons: exterior rings as point lists (3+ points, not closed).
    polygons: list[Annotated[list[Point], Field(min_length=3)]] = Field(default_factory=list)
    #: Times ``t`` ∈ [0, 1] of the record's frame-date range.
    times: list[Unit] = Field(default_factory=list)
    #: Time segments ``(t1, t2)``.
    segments: list[Segment] = Field(default_factory=list)

    @model_validator(mode="after")
    def _placeholders_match(self) -> Turn:
        used: dict[str, set[int]] = {k: set() for k in POSITION_FIELDS}
        for match in PLACEHOLDER.finditer(self.text):
            kind, k = match.group(1), int(match.group(2))
            n = len(getattr(self, POSITION_FIELDS[kind]))
            if k >= n:
                raise ValueError(f"placeholder {match.group(0)} but the turn has {n} {POSITION_FIELDS[kind]}")
            used[kind].add(k)
        for kind, name in POSITION_FIELDS.items():
            n = len(getattr(self, name))
            missing = sorted(set(range(n)) - used[kind])
            if missing:
                raise ValueError(f"{name}[{missing[0]}] is never referenced by a {{{kind}:{missing[0]}}} placeholder")
        return self

    def shapes(self) -> list[tuple[str, Box | list[Point]]]:
        """The turn's boxes and polygons in the order the text names them: ``[("polygon", ring), ("box", b)]``.

        (A listing's items, aligned with ``meta.field_ids``, whichever way each is drawn.)
        """
        out: list[tuple[str, Box | list[Point]]] = []
        for match in PLACEHOLDER.finditer(self.text):
            kind, k = match.group(1), int(match.group(2))
            if kind in ("box", "polygon"):
                out.append((kind, getattr(self, POSITION_FIELDS[kind])[k]))
        return out

    @property
    def has_positions(self) -> bool:
        """Whether the turn carries any box, point, polygon, time or segment."""
        return any(getattr(self, name) for name in POSITION_FIELDS.values())


BoxFormatter = Callable[[Sequence[float]], str]
PointFormatter = Callable[[Sequence[float]], str]
TimeFormatter = Callable[[float], str]
SegmentFormatter = Callable[[Sequence[float]], str]


def render_text(
    turn: Turn,
    fmt_box: BoxFormatter,
    fmt_point: PointFormatter,
    fmt_segment: SegmentFormatter,
    fmt_time: TimeFormatter,
    polygon_sep: str = "",
) -> str:
    """The turn's text with every placeholder replaced by the formatter's string.

    A polygon is rendered as its points formatted with ``fmt_point`` and joined by ``polygon_sep``.
    """

    def repl(match: re.Match[str]) -> str:
        kind, k = match.group(1), int(match.group(2))
        if kind == "box":
            return fmt_box(turn.boxes[k])
        if kind == "point":
            return fmt_point(turn.points[k])
        if kind == "polygon":
            return polygon_sep.join(fmt_point(p) for p in turn.polygons[k])
        if kind == "time":
            return fmt_time(turn.times[k])
        return fmt_segment(turn.segments[k])

    return PLACEHOLDER.sub(repl, turn.text)
