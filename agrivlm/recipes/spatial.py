"""Spatial reasoning between parcels, computed from their clipped geometry; answers carry boxes.

Relations are in the image frame (``u`` right, ``v`` down), as the model sees the chip:
``A`` is left of ``B`` when A's box ends before B's begins (no overlap in ``u``), above when the same
holds in ``v``; only such unambiguous pairs are asked. "Nearest" compares centroid distances and
"largest" visible areas, and is asked only when the winner beats the runner-up by ``unique_margin``.
"Adjacent" means the clipped polygons are within ``adjacency_tolerance_m`` (register polygons rarely
share exact edges).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from agrivlm.recipes.config import SpatialReasoningConfig
from agrivlm.recipes.context import ChipContext, ParcelInChip, assistant, pick, rng_for, user
from agrivlm.recipes.schema import Record
from agrivlm.recipes.state import BuildState
from agrivlm.tasks.questions import parcel_name

FAMILY = "spatial_reasoning"

_Q_LEFT = ("Is the {a} at {{box:0}} to the {rel} of the {b} at {{box:1}}?",)
_Q_ABOVE = ("Is the {a} at {{box:0}} {rel} the {b} at {{box:1}}?",)
_Q_NEAREST = ("Which parcel is closest to the {a} at {{box:0}}?", "What is the nearest parcel to the {a} at {{box:0}}?")
_Q_LARGEST = ("Which is the largest parcel in this image?", "Point out the biggest parcel in this image.")
_Q_ADJ = ("Which parcels border the {a} at {{box:0}}?", "List the neighbours of the {a} at {{box:0}}.")


def _pairs(parcels: list[ParcelInChip], axis: int) -> list[tuple[int, int]]:
    """Index pairs ``(i, j)`` whose boxes do not overlap along ``axis`` (0 = u, 1 = v); ``i`` comes first."""
    out = []
    for i, a in enumerate(parcels):
        for j, b in enumerate(parcels):
            if i != j and a.box[axis + 2] <= b.box[axis]:
                out.append((i, j))
    return out


def _names(p: ParcelInChip) -> str:
    return parcel_name(p.cls)


def _rng(state: BuildState, chip: ChipContext, task: str, subject: str = "") -> np.random.Generator:
    """The generator of one task (and subject) of one chip: draws never depend on what else is asked."""
    return rng_for(state.seed, FAMILY, chip.chip_id, task, subject)


def build_spatial_reasoning(state: BuildState, chip: ChipContext, cfg: SpatialReasoningConfig) -> list[Record]:
    """The spatial-reasoning records of one chip (frames: the chip's clear dates over the whole stack)."""
    frames = state.frames_all.get(chip.chip_id)
    if not frames:
        return []
    f = state.factory
    ps = [p for p in chip.parcels if p.area_px >= cfg.min_area_px]
    if len(ps) < 2:
        return []
    out: list[Record] = []
    out.extend(_relation_records(state, chip, frames, ps, cfg))

    areas = np.array([p.area_px for p in ps])
    if "largest" in cfg.tasks:
        order = np.argsort(-areas, kind="stable")
        if areas[order[0]] >= cfg.unique_margin * areas[order[1]]:
            top = ps[int(order[0])]
            out.append(f.record(chip, frames, FAMILY, "largest", "all", [
                user(pick(_rng(state, chip, "largest"), _Q_LARGEST)),
                assistant(f"The {_names(top)} at {{box:0}}.", boxes=[top.box]),
            ], {"field_ids": [top.field_id], "area_px": round(top.area_px, 3)}))

    r = _rng(state, chip, "subjects")
    n_subj = min(cfg.subjects_per_chip, len(ps))
    subjects = sorted(int(i) for i in r.choice(len(ps), size=n_subj, replace=False)) if n_subj else []
    centroids = np.array([[p.geom.centroid.x, p.geom.centroid.y] for p in ps])
    for s in subjects:
        nearest = _nearest_record(state, chip, frames, ps, s, centroids, cfg) if "nearest" in cfg.tasks else None
        adjacent = _adjacent_record(state, chip, frames, ps, s, cfg) if "adjacent" in cfg.tasks else None
        out.extend(rec for rec in (nearest, adjacent) if rec is not None)
    return out


def _relation_records(
    state: BuildState, chip: ChipContext, frames: list[int], ps: list[ParcelInChip], cfg: SpatialReasoningConfig
) -> list[Record]:
    """``left_right`` and ``above_below``: up to ``pairs_per_chip`` yes/no questions on pairs apart along an axis."""
    f = state.factory
    out: list[Record] = []
    for task, axis, words, questions in (
        ("left_right", 0, ("left", "right"), _Q_LEFT),
        ("above_below", 1, ("above", "below"), _Q_ABOVE),
    ):
        if task not in cfg.tasks:
            continue
        pairs = _pairs(ps, axis)
        r = _rng(state, chip, task)
        k = min(cfg.pairs_per_chip, len(pairs))
        for n, idx in enumerate(sorted(r.choice(len(pairs), size=k, replace=False)) if k else []):
            first, second = pairs[int(idx)]  # ps[first] is left of / above ps[second]
            swap = bool(r.integers(2))
            a, b = (ps[second], ps[first]) if swap else (ps[first], ps[second])
            word = words[int(r.integers(2))]
            # truth: "a is <words[0]> b" holds iff not swapped
            yes = (word == words[0]) != swap
            out.append(f.record(chip, frames, FAMILY, task, f"{a.field_id}:{b.field_id}:{word}", [
                user(pick(r, questions).format(a=_names(a), b=_names(b), rel=word), boxes=[a.box, b.box]),
                assistant("Yes." if yes else "No."),
            ], {"field_ids": [a.field_id, b.field_id], "relation": word, "answer": yes, "n": n}))
    return out


def _nearest_record(
    state: BuildState, chip: ChipContext, frames: list[int], ps: list[ParcelInChip], s: int,
    centroids: npt.NDArray[np.float64], cfg: SpatialReasoningConfig,
) -> Record | None:
    """``nearest``: the parcel closest to subject ``ps[s]`` by centroid, when it wins by ``unique_margin``."""
    a = ps[s]
    d = np.hypot(*(centroids - centroids[s]).T)
    d[s] = np.inf
    order = np.argsort(d, kind="stable")
    if not (len(ps) == 2 or d[order[1]] >= cfg.unique_margin * d[order[0]]):
        return None
    b = ps[int(order[0])]
    return state.factory.record(chip, frames, FAMILY, "nearest", a.field_id, [
        user(pick(_rng(state, chip, "nearest", a.field_id), _Q_NEAREST).format(a=_names(a)), boxes=[a.box]),
        assistant(f"The {_names(b)} at {{box:0}}.", boxes=[b.box]),
    ], {"field_ids": [a.field_id, b.field_id], "distance_m": round(float(d[order[0]]), 3)})


def _adjacent_record(
    state: BuildState, chip: ChipContext, frames: list[int], ps: list[ParcelInChip], s: int,
    cfg: SpatialReasoningConfig,
) -> Record | None:
    """``adjacent``: the parcels within ``adjacency_tolerance_m`` of subject ``ps[s]`` (if at most ``max_objects``)."""
    a = ps[s]
    nbrs = [p for j, p in enumerate(ps) if j != s and a.geom.distance(p.geom) <= cfg.adjacency_tolerance_m]
    if len(nbrs) > cfg.max_objects:
        return None
    if nbrs:
        items = [f"the {_names(p)} at {{box:{i}}}" for i, p in enumerate(nbrs)]
        text = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
        answer = text[0].upper() + text[1:] + "."
    else:
        answer = "None; it borders no other parcel in this image."
    return state.factory.record(chip, frames, FAMILY, "adjacent", a.field_id, [
        user(pick(_rng(state, chip, "adjacent", a.field_id), _Q_ADJ).format(a=_names(a)), boxes=[a.box]),
        assistant(answer, boxes=[p.box for p in nbrs]),
    ], {"field_ids": [a.field_id] + [p.field_id for p in nbrs]})
