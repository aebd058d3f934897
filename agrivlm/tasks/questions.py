"""The questions and fixed answers of every task, worded once.

The recipes write them into training records; ``agrivlm infer`` and the explorer ask the first of each, so a
model is asked exactly as it was trained.

Placeholders (``{point:0}``, ``{box:0}``, ``{time:0}``) follow :mod:`agrivlm.tasks.turns`; ``{name}`` is a parcel's
name (:func:`parcel_name`).
"""

from __future__ import annotations

#: Class word of parcels whose class cell is empty.
UNKNOWN_CLASS = "unknown"


def parcel_name(cls: str) -> str:
    """``"grassland parcel"``, or ``"parcel"`` for an unknown class."""
    return "parcel" if cls == UNKNOWN_CLASS else f"{cls} parcel"


# -- fields ------------------------------------------------------------------------------------------------
#: Questions of the ``outline_fields`` task (``agrivlm infer --task fields`` asks the first, so inference
#: prompts are worded exactly as the training records, whichever ``outline_as`` they were built with).
OUTLINE_FIELDS_QUESTIONS: tuple[str, ...] = (
    "Outline every field in this image.",
    "Draw a box around each field.",
    "Where are the fields in this image?",
    "Find all agricultural fields and give their boxes.",
)
#: Questions of the ``field_at_point`` task (inference asks the first).
FIELD_AT_POINT_QUESTIONS: tuple[str, ...] = (
    "Outline the field at {point:0}.",
    "Trace the boundary of the field at {point:0}.",
    "Which field is at {point:0}? Give its outline.",
)
#: The ``field_at_point`` answer for a point outside every field.
NO_FIELD_AT_POINT = "There is no field at this point."
#: The ``outline_fields`` answer of a chip without fields.
NO_FIELDS_ANSWER = "There are no fields in this image."
#: Written after the box of a parcel the chip's edge cuts.
CUT_MARK = " (partly outside the image)"


# -- growth stages -----------------------------------------------------------------------------------------
#: Questions of the ``stage_timeline`` task; ``agrivlm infer --task growth`` asks the first when the checkpoint's
#: ``growth_prompt`` is ``timeline``.
STAGE_TIMELINE_QUESTIONS: tuple[str, ...] = (
    "Give the growth stages of the {name} at {{box:0}} over time.",
    "Which growth stages did the {name} at {{box:0}} go through, and when?",
)
#: Between two stage spans of a ``stage_timeline`` answer (``"dormant <TEMP-000><TEMP-011>; green-up …"``).
TIMELINE_SEP = "; "
#: Questions of the ``stage_on_date`` task that name the date in words (as
#: :func:`~agrivlm.geo.dates.day_str` writes it).
STAGE_ON_DATE_QUESTIONS: tuple[str, ...] = (
    "What growth stage is the {name} at {{box:0}} in on {date}?",
    "On {date}, which growth stage is the {name} at {{box:0}} in?",
)
#: Questions of the ``stage_on_date`` task that give the date as a ``<TEMP>`` token on the frames' time axis;
#: ``agrivlm infer --task growth`` asks the first: the token is the very embedding injected into the frame of
#: that date, while a date in words would have to be matched to frames whose dates the model never sees.
STAGE_AT_TIME_QUESTIONS: tuple[str, ...] = (
    "What growth stage is the {name} at {{box:0}} in at {{time:0}}?",
    "At {{time:0}}, which growth stage is the {name} at {{box:0}} in?",
)
