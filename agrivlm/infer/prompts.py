r"""The questions ``agrivlm infer`` asks, worded and rendered exactly as the training records, and their answers.

Wording: the questions are the recipes' own (:data:`agrivlm.tasks.questions.OUTLINE_FIELDS_QUESTIONS`,
:data:`agrivlm.tasks.questions.STAGE_AT_TIME_QUESTIONS`), never re-typed here. Rendering: a question's
positions go through the recipes' :func:`~agrivlm.tasks.turns.render_text` with the LAPE codec as the
formatters (:func:`lape_formatters`), the rendering the recipes prescribe for training; the continuous value
of every position token is returned beside the text (:attr:`PromptText.positions`) for the processor's
``positions=`` (interpolated input embeddings, as the processor does for training).

A prompt is one user turn in the conversation format training uses
(:func:`agrivlm.pipeline.conversation.format_prompt`): ``"USER: <video>\nQUESTION\nASSISTANT: "``
(``<image>`` for one frame): :func:`build_prompt`.

Answers: :func:`parse_stage` finds the growth-stage word of a ``stage_on_date`` answer, :func:`parse_timeline`
the stage spans of a ``stage_timeline`` answer and :func:`stages_at` the stage on any date from them;
:func:`listing_details` reads the class label and the "partly outside the image" mark of each item (a box or
a polygon) of an ``outline_fields`` answer (``"2 fields: grassland <box>; cultivated land <polygon> (partly
outside the image)."``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from agrivlm.lape.tokens import POLYGON_SEP, LapeVocab, QuestionPositions, position_formatters
from agrivlm.pipeline.conversation import format_prompt, visual_placeholder
from agrivlm.schema import GROWTH_STAGES
from agrivlm.tasks.questions import (
    CUT_MARK,
    FIELD_AT_POINT_QUESTIONS,
    NO_FIELD_AT_POINT,
    NO_FIELDS_ANSWER,
    OUTLINE_FIELDS_QUESTIONS,
    STAGE_AT_TIME_QUESTIONS,
    STAGE_TIMELINE_QUESTIONS,
    UNKNOWN_CLASS,
    parcel_name,
)
from agrivlm.tasks.turns import PLACEHOLDER, Turn, render_text

#: The inference tasks: field boundaries (polygons or boxes, as the checkpoint was trained), growth stage per
#: field and date, a free question.
Task = Literal["fields", "growth", "ask"]
TASKS: tuple[str, ...] = ("fields", "growth", "ask")

#: One growth-stage word as a whole word (``green-up`` included, ``peaks`` or ``pre-peak`` not).
_STAGE_RE = re.compile(r"(?<![\w-])(" + "|".join(re.escape(s) for s in GROWTH_STAGES) + r")(?![\w-])", re.I)
#: A point as serialized by :func:`~agrivlm.lape.tokens.serialize_point` (whitespace between tokens allowed).
_POINT = r"<WIDTH-\d+>\s*<HEIGHT-\d+>"
#: One item of a listing: a box (:func:`~agrivlm.lape.tokens.serialize_box`) or a chain of points joined by
#: the polygon separator (:func:`~agrivlm.lape.tokens.serialize_polygon`; two chained points are a box too),
#: the codec's grouping of :func:`~agrivlm.lape.tokens.group_positions` in text form.
_ITEM_RE = re.compile(rf"{_POINT}\s*{_POINT}|{_POINT}(?:\s*{re.escape(POLYGON_SEP)}\s*{_POINT})+")


def lape_formatters(vocab: LapeVocab, positions_as: QuestionPositions = "bins") -> dict[str, Any]:
    """The LAPE codec as :func:`~agrivlm.tasks.turns.render_text` formatters (box → 4 tokens, time → 1)."""
    return {**position_formatters(vocab, positions_as), "polygon_sep": POLYGON_SEP}


@dataclass(frozen=True)
class PromptText:
    """A question rendered with LAPE tokens (no visual placeholder yet).

    Attributes:
        text: the question, positions as LAPE tokens.
        positions: the continuous normalized value of each position token of ``text``, in text order (the
            processor's ``positions=``); empty when the question has none.

    """

    text: str
    positions: tuple[float, ...] = field(default_factory=tuple)


def render_question(
    text: str,
    vocab: LapeVocab,
    boxes: Sequence[Sequence[float]] = (),
    points: Sequence[Sequence[float]] = (),
    times: Sequence[float] = (),
    segments: Sequence[Sequence[float]] = (),
    positions_as: QuestionPositions = "bins",
) -> PromptText:
    """Render a question with ``{box:K}``-style placeholders as the recipes do, and collect the token values.

    Values are normalized (``u``, ``v`` fractions of the chip, ``t`` of the frames' date range) and rounded
    as records round them (:class:`~agrivlm.tasks.turns.Turn` validates and rounds to 6 decimals).
    ``positions_as``: bins or ``-INPUT`` placeholders (:data:`~agrivlm.lape.tokens.QuestionPositions`), as the
    checkpoint was trained (its ``question_positions``).

    Raises:
        pydantic.ValidationError: a value outside [0, 1], or placeholders and positions that do not match.

    """
    turn = Turn.model_validate({"role": "user", "text": text, "boxes": [list(b) for b in boxes],
                                "points": [list(p) for p in points], "times": list(times),
                                "segments": [list(s) for s in segments]})
    rendered = render_text(turn, **lape_formatters(vocab, positions_as))
    values: list[float] = []
    for match in PLACEHOLDER.finditer(turn.text):
        kind, k = match.group(1), int(match.group(2))
        if kind == "box":
            values.extend(turn.boxes[k])
        elif kind == "point":
            values.extend(turn.points[k])
        elif kind == "polygon":
            values.extend(v for p in turn.polygons[k] for v in p)
        elif kind == "time":
            values.append(turn.times[k])
        else:
            values.extend(turn.segments[k])
    return PromptText(rendered, tuple(float(v) for v in values))


def build_prompt(question: str, num_frames: int) -> str:
    """The model's prompt for one question: the training conversation format with one user turn."""
    return format_prompt([("user", question)], visual_placeholder(num_frames))


def fields_question(vocab: LapeVocab) -> PromptText:
    """The ``fields`` task's question: the recipes' first ``outline_fields`` question."""
    return render_question(OUTLINE_FIELDS_QUESTIONS[0], vocab)


def field_at_point_question(vocab: LapeVocab, point: Sequence[float],
                            positions_as: QuestionPositions = "bins") -> PromptText:
    """The ``fields`` task's point prompt: the recipes' first ``field_at_point`` question about ``(u, v)``."""
    return render_question(FIELD_AT_POINT_QUESTIONS[0], vocab, points=[point], positions_as=positions_as)


def stage_question(vocab: LapeVocab, box: Sequence[float], t: float, field_class: str | None = None,
                   positions_as: QuestionPositions = "bins") -> PromptText:
    """The ``growth`` task's question about the field at ``box`` at time ``t`` (the recipes' ``stage_on_date``).

    Args:
        vocab: the model's LAPE vocabulary.
        box: the field's visible part in the chip, ``(u1, v1, u2, v2)`` normalized.
        t: the date asked about on the frames' time axis (``Frames.t`` of that frame), as a ``<TEMP>`` token.
        field_class: the field's land-use class (``"grassland"``); None → "parcel".
        positions_as: the box and time as bins or ``-INPUT`` placeholders (the checkpoint's ``question_positions``).

    """
    name = parcel_name(field_class or UNKNOWN_CLASS)
    text = STAGE_AT_TIME_QUESTIONS[0].format(name=name)
    return render_question(text, vocab, boxes=[box], times=[t], positions_as=positions_as)


def timeline_question(vocab: LapeVocab, box: Sequence[float], field_class: str | None = None,
                      positions_as: QuestionPositions = "bins") -> PromptText:
    """The ``growth`` task's question when the checkpoint's ``growth_prompt`` is ``timeline``.

    Every stage of the field at ``box`` over the season, answered as ``<TEMP>`` spans (the recipes' first
    ``stage_timeline`` question).
    """
    name = parcel_name(field_class or UNKNOWN_CLASS)
    return render_question(STAGE_TIMELINE_QUESTIONS[0].format(name=name), vocab, boxes=[box],
                           positions_as=positions_as)


#: A stage word followed by a segment (two ``TEMP`` tokens) in a ``stage_timeline`` answer.
_SPAN_RE = re.compile(_STAGE_RE.pattern + r"\s*(<TEMP-\d+>)\s*(<TEMP-\d+>)", re.I)


def parse_timeline(text: str, segments: Sequence[Sequence[float]]) -> list[tuple[str, float, float]] | None:
    """``(stage, t1, t2)`` of each span of a ``stage_timeline`` answer, in text order.

    ``segments`` are the decoded ``(t1, t2)`` of the answer's segments in text order (sub-bin refined, from
    :func:`~agrivlm.infer.generate.decode_answer`); each must follow a stage word. None when the answer holds no
    span, or segments that no stage word names (the answer is then unparsed).
    """
    words = [m.group(1).lower() for m in _SPAN_RE.finditer(text)]
    if not words or len(words) != len(segments):
        return None
    return [(w, float(min(s)), float(max(s))) for w, s in zip(words, segments, strict=True)]


def stages_at(spans: Sequence[tuple[str, float, float]], ts: Sequence[float]) -> list[str]:
    """The stage at each time ``t`` of a timeline: the span holding ``t``, else the nearest span.

    Between two spans the nearer one wins (the boundary is half-way across the gap); where spans overlap, the
    one whose centre is nearest. ``spans`` must not be empty.
    """
    if not spans:
        raise ValueError("stages_at needs at least one span")
    out = []
    for t in ts:
        best = min(spans, key=lambda s: (max(s[1] - t, 0.0, t - s[2]), abs((s[1] + s[2]) / 2 - t)))
        out.append(best[0])
    return out


def parse_stage(text: str) -> str | None:
    """The growth stage an answer names, or None when it names none or several different ones."""
    found = {m.group(1).lower() for m in _STAGE_RE.finditer(text)}
    return found.pop() if len(found) == 1 else None


def says_no_fields(text: str) -> bool:
    """Whether an answer is one of the recipes' "no fields" answers (for a chip or for a point)."""
    low = text.lower()
    return any(a.lower().rstrip(".") in low for a in (NO_FIELDS_ANSWER, NO_FIELD_AT_POINT))


def listing_details(text: str, n_items: int) -> list[tuple[str, bool]]:
    """``(label, cut)`` of each item (box or polygon) of an ``outline_fields`` answer, in text order.

    The label is the text between the previous ``:``/``;`` (or the start) and the item (``"grassland"``;
    ``"parcel"`` for an unknown class); ``cut`` is True when the recipes' mark ``"(partly outside the
    image)"`` follows the item. When the text holds another number of items than ``n_items`` (the decoded
    count of boxes and polygons) every item gets ``("", False)``.
    """
    matches = list(_ITEM_RE.finditer(text))
    if len(matches) != n_items:
        return [("", False)] * n_items
    out = []
    prev_end = 0
    for m in matches:
        before = text[prev_end:m.start()]
        label = re.split(r"[:;]", before)[-1].strip(" ,.")
        cut = text[m.end():].startswith(CUT_MARK)
        out.append((label, cut))
        prev_end = m.end()
    return out
