"""General remote sensing: land-cover questions from a class raster (or the rasterized parcel classes).

Shares are over the chip's pixels that have a class. Text-only tasks (``caption``, ``majority``,
``presence``, ``fraction``) carry no positions — the stage-1 alignment mixture keeps only those.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from agrivlm.recipes.config import GeneralRSConfig
from agrivlm.recipes.context import ChipContext, assistant, pick, rng_for, user
from agrivlm.recipes.schema import Record
from agrivlm.recipes.state import BuildState

FAMILY = "general_rs"

#: A chip is described only when at least this share of its pixels has a class.
MIN_KNOWN_SHARE = 0.5

_Q_CAPTION = ("Describe the land cover in this image.", "What does this image show?", "Summarise the land use here.")
_Q_MAJORITY = ("What covers most of this image?", "What is the main land cover in this image?")
_Q_PRESENCE = ("Is there {cls} in this image?", "Does this image contain {cls}?")
_Q_FRACTION = ("What share of this image is {cls}?", "How much of this image is covered by {cls}?")
_Q_LOCATE = ("Where is the largest patch of {cls}?", "Show the largest area of {cls} in this image.")
_Q_POINT = ("What is the land cover at {point:0}?", "What kind of land is at {point:0}?")

#: 8-connectivity for patches.
_EIGHT = np.ones((3, 3), dtype=bool)


def _caption(shares: list[tuple[str, float]], min_share: float) -> str:
    named = [(c, s) for c, s in shares if s >= min_share] or shares[:1]
    first = f"Mostly {named[0][0]} ({round(100 * named[0][1])} %)"
    rest = [f"{c} ({round(100 * s)} %)" for c, s in named[1:]]
    if not rest:
        return first + "."
    tail = rest[0] if len(rest) == 1 else ", ".join(rest[:-1]) + " and " + rest[-1]
    return f"{first}, with {tail}."


def _uniform_centres(codes: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """``(N, 2)`` ``(row, col)`` of pixels whose whole 3×3 neighbourhood has their (known) class."""
    h, w = codes.shape
    if h < 3 or w < 3:
        return np.zeros((0, 2), dtype=np.int64)
    c = codes[1:-1, 1:-1]
    same = c >= 0
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            same &= codes[1 + dr:h - 1 + dr, 1 + dc:w - 1 + dc] == c
    rows, cols = np.nonzero(same)
    return np.stack([rows + 1, cols + 1], axis=1)


def _rng(state: BuildState, chip: ChipContext, task: str, subject: str = "") -> np.random.Generator:
    """The generator of one task (and subject) of one chip: draws never depend on what else is asked."""
    return rng_for(state.seed, FAMILY, chip.chip_id, task, subject)


def build_general_rs(state: BuildState, chip: ChipContext, cfg: GeneralRSConfig) -> list[Record]:
    """The land-cover records of one chip (frames: the chip's clear dates over the whole stack)."""
    frames = state.frames_all.get(chip.chip_id)
    if not frames or chip.classes is None:
        return []
    codes = chip.classes
    known = codes >= 0
    if known.mean() < MIN_KNOWN_SHARE:
        return []
    f = state.factory
    names = chip.class_names
    total = int(known.sum())
    counts = {int(k): int((codes == k).sum()) for k in names}
    shares = sorted(((names[k], n / total) for k, n in counts.items() if n > 0), key=lambda cs: (-cs[1], cs[0]))
    share_of = dict(shares)
    meta: dict[str, object] = {"classes": [c for c, _ in shares], "shares": [round(s, 4) for _, s in shares]}
    out: list[Record] = []

    def rng(task: str, subject: str = "") -> np.random.Generator:
        return _rng(state, chip, task, subject)

    if "caption" in cfg.tasks:
        out.append(f.record(chip, frames, FAMILY, "caption", "all", [
            user(pick(rng("caption"), _Q_CAPTION)), assistant(_caption(shares, cfg.caption_min_share)),
        ], meta))
    if "majority" in cfg.tasks and (len(shares) == 1 or shares[0][1] - shares[1][1] >= 0.05):
        out.append(f.record(chip, frames, FAMILY, "majority", "all", [
            user(pick(rng("majority"), _Q_MAJORITY)), assistant(shares[0][0]),
        ], meta))
    present = sorted(names[k] for k, n in counts.items() if n >= cfg.min_presence_px)
    absent = sorted(names[k] for k, n in counts.items() if n == 0)
    out.extend(_presence_records(state, chip, frames, cfg, present, absent, counts, meta))
    if "fraction" in cfg.tasks and present:
        cls = pick(rng("fraction"), present)
        share = share_of[cls]
        out.append(f.record(chip, frames, FAMILY, "fraction", cls.replace(" ", "_"), [
            user(pick(rng("fraction", "q"), _Q_FRACTION).format(cls=cls)),
            assistant(f"About {_percent(share)} %."),
        ], {**meta, "class": cls, "share": round(share, 4)}))
    if "locate_class" in cfg.tasks:
        out.extend(_locate_records(state, chip, frames, codes, present, meta))
    if "point_class" in cfg.tasks and cfg.point_questions > 0:
        out.extend(_point_records(state, chip, frames, codes, cfg.point_questions, meta))
    return out


def _presence_records(
    state: BuildState, chip: ChipContext, frames: list[int], cfg: GeneralRSConfig, present: list[str],
    absent: list[str], counts: dict[int, int], meta: dict[str, object],
) -> list[Record]:
    """``presence``: one class drawn of those present (answer yes) and one of those absent (answer no)."""
    f, names = state.factory, chip.class_names
    out: list[Record] = []
    r = _rng(state, chip, "presence")
    asked: list[tuple[str, bool]] = []
    if present:
        asked.append((pick(r, present), True))
    if absent:
        asked.append((pick(r, absent), False))
    if "presence" in cfg.tasks:
        for cls, yes in asked:
            out.append(f.record(chip, frames, FAMILY, "presence", cls.replace(" ", "_"), [
                user(pick(r, _Q_PRESENCE).format(cls=cls)), assistant("Yes." if yes else "No."),
            ], {**meta, "class": cls, "present": yes, "pixels": counts[_code(names, cls)]}))
    return out


def _locate_records(
    state: BuildState, chip: ChipContext, frames: list[int], codes: npt.NDArray[np.int64], present: list[str],
    meta: dict[str, object],
) -> list[Record]:
    """``locate_class``: the box of the largest patch of each present class that has a clear largest patch."""
    f, names = state.factory, chip.class_names
    out: list[Record] = []
    for cls in present:
        labels, n = ndimage.label(codes == _code(names, cls), structure=_EIGHT)
        sizes = np.bincount(labels.ravel())[1:]
        order = np.argsort(-sizes, kind="stable")
        if n > 1 and sizes[order[0]] < 1.2 * sizes[order[1]]:
            continue  # two patches of about the same size: no single answer
        rows, cols = np.nonzero(labels == order[0] + 1)
        u1, v1 = chip.grid.pixel_to_norm(cols.min(), rows.min())
        u2, v2 = chip.grid.pixel_to_norm(cols.max() + 1, rows.max() + 1)
        out.append(f.record(chip, frames, FAMILY, "locate_class", cls.replace(" ", "_"), [
            user(pick(_rng(state, chip, "locate_class", cls), _Q_LOCATE).format(cls=cls)),
            assistant("{box:0}", boxes=[(float(u1), float(v1), float(u2), float(v2))]),
        ], {**meta, "class": cls, "patch_px": int(sizes[order[0]])}))
    return out


def _point_records(
    state: BuildState, chip: ChipContext, frames: list[int], codes: npt.NDArray[np.int64], point_questions: int,
    meta: dict[str, object],
) -> list[Record]:
    """``point_class``: the class at ``point_questions`` points, each inside a uniform 3×3 neighbourhood."""
    f, names = state.factory, chip.class_names
    out: list[Record] = []
    centres = _uniform_centres(codes)
    if len(centres):
        r = _rng(state, chip, "point_class")
        # balance over classes: pick a class first, then a pixel of it
        by_class: dict[int, npt.NDArray[np.int64]] = {}
        for k in sorted(set(codes[centres[:, 0], centres[:, 1]].tolist())):
            by_class[k] = centres[codes[centres[:, 0], centres[:, 1]] == k]
        keys = sorted(by_class)
        for q in range(point_questions):
            k = keys[int(r.integers(len(keys)))]
            row, col = by_class[k][int(r.integers(len(by_class[k])))]
            u, v = chip.grid.pixel_to_norm(col + 0.5, row + 0.5)
            out.append(f.record(chip, frames, FAMILY, "point_class", f"{q}", [
                user(pick(r, _Q_POINT), points=[(float(u), float(v))]), assistant(names[k]),
            ], {**meta, "class": names[k], "pixel": [int(row), int(col)]}))
    return out


def _percent(share: float) -> int:
    """A share as a percentage: to 1 % below 10 %, to 5 % above (a precision an image supports)."""
    pct = 100.0 * share
    return max(int(round(pct)), 1) if pct < 10 else int(5 * round(pct / 5))


def _code(names: dict[int, str], cls: str) -> int:
    return next(k for k, v in names.items() if v == cls)
