"""Growth stages: key dates (TEMP positions), the growing season, the stage on a date, the stage timeline.

The growing season is a segment; the stage timeline gives every stage of the season as ``<TEMP>`` spans in one
answer.

Every question points to its field by the box of the field's visible part in the chip. A record's
frames are the chip's clear dates within one season, and ``t`` runs over that season's window (the record's
``time_range``), so a ``TEMP`` bin names the same days of the season on every chip; a key date outside the
window is not asked. A labelled field is answered from its labels only, never from
derived stages or dates (see :class:`~agrivlm.recipes.phenology.GrowthTruth`); ``meta.source`` says which
one an answer came from. The growing-season segment (SOS → EOS) is asked only of derived seasons.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from agrivlm.geo.dates import day_str, iso_day
from agrivlm.recipes.config import GrowthStagesConfig
from agrivlm.recipes.context import ChipContext, ParcelInChip, assistant, pick, rng_for, user
from agrivlm.recipes.schema import Record
from agrivlm.recipes.state import BuildState
from agrivlm.tasks.questions import (
    STAGE_AT_TIME_QUESTIONS,
    STAGE_ON_DATE_QUESTIONS,
    STAGE_TIMELINE_QUESTIONS,
    TIMELINE_SEP,
    parcel_name,
)

FAMILY = "growth_stages"

#: Key date → (task, questions, answer).
_KEY_DATES = {
    "green_up": ("green_up_date", (
        "When did green-up start in the {name} at {{box:0}}?",
        "When did the {name} at {{box:0}} start to green up?",
        "At which time did the growing season begin in the {name} at {{box:0}}?",
    ), "Green-up started at {time:0}."),
    "peak": ("peak_date", (
        "When did the {name} at {{box:0}} reach its peak?",
        "When was vegetation at its maximum in the {name} at {{box:0}}?",
    ), "The peak was at {time:0}."),
    "senescence": ("senescence_date", (
        "When did senescence begin in the {name} at {{box:0}}?",
        "When did the {name} at {{box:0}} start to senesce?",
    ), "Senescence began at {time:0}."),
}
_Q_SEGMENT = (
    "Over which period was the {name} at {{box:0}} growing?",
    "Give the growing season of the {name} at {{box:0}}.",
)
_Q_STAGE_TOKEN = STAGE_AT_TIME_QUESTIONS
_Q_STAGE_DATE = STAGE_ON_DATE_QUESTIONS
_Q_TIMELINE = STAGE_TIMELINE_QUESTIONS


def _clear_dates(state: BuildState, row: int, frames: list[int]) -> list[int]:
    """Frames on which at least ``min_clear_fraction`` of the parcel is clear."""
    px = max(int(state.scan.parcel_px[row]), 1)
    frac = state.scan.parcel_clear[:, row] / px
    return [i for i in frames if frac[i] >= state.phenology.min_clear_fraction]


def stage_runs(stages: list[tuple[float, str]]) -> list[tuple[str, float, float]]:
    """``(stage, t_first, t_last)`` of each run of one stage over time-sorted ``(t, stage)`` pairs.

    A stage that comes back (dormant before and after the season, a second crop) gives one run each time.
    """
    runs: list[tuple[str, float, float]] = []
    for t, stage in sorted(stages):
        if runs and runs[-1][0] == stage:
            runs[-1] = (stage, runs[-1][1], t)
        else:
            runs.append((stage, t, t))
    return runs


def _timeline_record(state: BuildState, chip: ChipContext, p: ParcelInChip, season: str, frames: list[int],
                     base_meta: dict[str, object], dates: Literal["frames", "season"] = "frames") -> Record | None:
    """The ``stage_timeline`` record: every stage of the season as a ``<TEMP>`` span, in time order.

    Stages are those of the record's frames (the chip's clear dates of the season) or, with ``dates="season"``,
    of every acquisition of the season, whether or not the field itself is clear on them (a stage does not
    depend on the sky); a run of one stage spans its first to its last such date.
    """
    f = state.factory
    pairs = []
    sources = set()
    when = frames
    if dates == "season":
        start, end = next((s, e) for label, s, e in state.seasons if label == season)
        when = [i for i, day in enumerate(state.days) if start <= day < end]
    for i, t in zip(when, f.norm_times(frames, [f.times[i] for i in when]), strict=True):
        stage, source = state.truth.stage(p.field_id, f.times[i])
        if stage is not None and t is not None:
            pairs.append((t, stage))
            sources.add(source)
    runs = stage_runs(pairs)
    if not runs:
        return None
    r = rng_for(state.seed, FAMILY, chip.chip_id, "stage_timeline", p.field_id, season)
    answer = TIMELINE_SEP.join(f"{stage} {{segment:{k}}}" for k, (stage, _, _) in enumerate(runs)) + "."
    return f.record(chip, frames, FAMILY, "stage_timeline", f"{p.field_id}:{season}", [
        user(pick(r, _Q_TIMELINE).format(name=parcel_name(p.cls)), boxes=[p.box]),
        assistant(answer, segments=[(a, b) for _, a, b in runs]),
    ], {**base_meta, "stages": [stage for stage, _, _ in runs], "dates": len(pairs), "source": sources.pop()})


def _field_records(
    state: BuildState, chip: ChipContext, p: ParcelInChip, season: str, frames: list[int], cfg: GrowthStagesConfig
) -> list[Record]:
    """Every growth-stage record of one field in one season (frames: the chip's clear dates of that season)."""
    f = state.factory
    name = parcel_name(p.cls)
    base_meta: dict[str, object] = {"field_id": p.field_id, "class": p.cls, "season": season, "cut": p.cut}
    out = _key_date_records(state, chip, p, season, frames, cfg, base_meta)
    derived = state.truth.derived_season(p.field_id, season)
    if "season_segment" in cfg.tasks and derived is not None:
        t1, t2 = f.norm_time(frames, derived.sos), f.norm_time(frames, derived.eos)
        if t1 is not None and t2 is not None:
            r = rng_for(state.seed, FAMILY, chip.chip_id, "season_segment", p.field_id, season)
            out.append(f.record(chip, frames, FAMILY, "season_segment", f"{p.field_id}:{season}", [
                user(pick(r, _Q_SEGMENT).format(name=name), boxes=[p.box]),
                assistant("From {segment:0}.", segments=[(t1, t2)]),
            ], {**base_meta, "start": iso_day(derived.sos), "end": iso_day(derived.eos), "source": "derived"}))
    if "stage_timeline" in cfg.tasks:
        rec = _timeline_record(state, chip, p, season, frames, base_meta, cfg.timeline_dates)
        if rec is not None:
            out.append(rec)
    if "stage_on_date" in cfg.tasks and cfg.stage_questions > 0:
        out.extend(_stage_on_date_records(state, chip, p, season, frames, cfg, base_meta))
    return out


def _key_date_records(
    state: BuildState, chip: ChipContext, p: ParcelInChip, season: str, frames: list[int], cfg: GrowthStagesConfig,
    base_meta: dict[str, object],
) -> list[Record]:
    """The key-date questions (green-up, peak, senescence) of one field and season, from labels or derived dates."""
    f = state.factory
    name = parcel_name(p.cls)
    out: list[Record] = []
    cycle: str | None = season
    if p.field_id in state.truth.key_date_fields:
        # the one labelled cycle of the window (``2021`` or ``2021-2``); two (a double crop, a regrowth):
        # "when did green-up start" has two answers, so no key-date question
        cycles = state.truth.cycle_labels(p.field_id, season)
        cycle = cycles[0] if len(cycles) == 1 else None
    known = state.truth.key_dates(p.field_id, cycle) if cycle is not None else {}
    for key, (task, questions, answer) in _KEY_DATES.items():
        if task not in cfg.tasks or key not in known:
            continue
        day, source = known[key]
        t = f.norm_time(frames, float(day))
        if t is None:
            continue
        r = rng_for(state.seed, FAMILY, chip.chip_id, task, p.field_id, season)
        out.append(f.record(chip, frames, FAMILY, task, f"{p.field_id}:{season}", [
            user(pick(r, questions).format(name=name), boxes=[p.box]),
            assistant(answer, times=[t]),
        ], {**base_meta, "season": cycle, "date": iso_day(day), "source": source}))
    return out


def _stage_on_date_records(
    state: BuildState, chip: ChipContext, p: ParcelInChip, season: str, frames: list[int], cfg: GrowthStagesConfig,
    base_meta: dict[str, object],
) -> list[Record]:
    """Up to ``cfg.stage_questions`` "which stage on this date" questions, on dates the field is clear."""
    f = state.factory
    name = parcel_name(p.cls)
    out: list[Record] = []
    cands = []
    for i in _clear_dates(state, p.row, frames):
        stage, source = state.truth.stage(p.field_id, state.factory.times[i])
        if stage is not None:
            cands.append((i, stage, source))
    if cands:
        r = rng_for(state.seed, FAMILY, chip.chip_id, "stage_on_date", p.field_id, season)
        # rarer stages are drawn more often, so the answers are not mostly "dormant"
        counts: dict[str, int] = {}
        for _, stage, _ in cands:
            counts[stage] = counts.get(stage, 0) + 1
        weights = np.array([1.0 / counts[stage] for _, stage, _ in cands])
        k = min(cfg.stage_questions, len(cands))
        chosen = sorted(r.choice(len(cands), size=k, replace=False, p=weights / weights.sum()))
        for j in chosen:
            i, stage, source = cands[int(j)]
            when = state.factory.times[i]
            on = day_str(when)
            t = f.norm_time(frames, when)
            if t is None:
                continue
            if r.random() < 0.5:
                question = user(pick(r, _Q_STAGE_TOKEN).format(name=name), boxes=[p.box], times=[t])
            else:
                question = user(pick(r, _Q_STAGE_DATE).format(name=name, date=on), boxes=[p.box])
            out.append(f.record(chip, frames, FAMILY, "stage_on_date", f"{p.field_id}:{when}", [
                question, assistant(stage),
            ], {**base_meta, "date": on, "stage": stage, "source": source, "frame": frames.index(i)}))
    return out


def build_growth_stages(state: BuildState, chip: ChipContext, cfg: GrowthStagesConfig) -> list[Record]:
    """The growth-stage records of one chip: per analysed (or labelled) field in it and per season."""
    out: list[Record] = []
    for p in chip.parcels:
        if p.area_px < cfg.min_field_px or not state.truth.has_field(p.field_id):
            continue
        for label, _, _ in state.seasons:
            frames = state.frames_season.get((chip.chip_id, label))
            if frames:
                out.extend(_field_records(state, chip, p, label, frames, cfg))
    return out
