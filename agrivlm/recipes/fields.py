"""Field boundaries: outlines (polygons or boxes), traced polygons, the largest parcel of a class, counts, edge cuts.

Parcels are clipped to the chip; a parcel the chip's edge cuts is answered with the outline (or box) of its
visible part and marked ``(partly outside the image)`` in outline answers and ``cut`` in ``meta``. Visible
parts under ``min_area_px`` pixels are slivers: never asked about, counted in ``meta.n_slivers``.

``field_at_point`` asks for the field under one point of the chip (``{point:0}``, drawn uniformly, never within
``point_edge_px`` of a parcel edge): the answer is that field's outline as a listing item (``"grassland
<polygon>."``, the cut mark after it when the chip's edge cuts it) or :data:`NO_FIELD_AT_POINT` on a road, a
margin or a parcel of another class. It is the point prompt of ``agrivlm infer --task fields`` with
``fields_prompt: points``: one short answer per point instead of one listing of every field of the chip. With
``points_per_record`` > 1, that many of a chip's points are asked in one conversation (one question and answer
after another, every answer supervised in training): the chip's frames are read and encoded once for them all;
``meta`` then holds ``point_u``, ``point_v`` and ``field_ids`` per point (``""``: no field there).

The listings (``outline_fields``, ``outline_parcels``) answer each parcel as ``outline_as`` says: a polygon
of at most ``outline_vertices`` points (:func:`~agrivlm.recipes.context.norm_ring`, the simplification of
``trace_outline``; rendered as points joined by the codec's polygon separator) or a box. A parcel whose
outline simplifies to fewer than 3 points is listed with its box, so a listing may mix both; the decoder
tells them apart (two points: a box, three or more: a polygon).
"""

from __future__ import annotations

import numpy as np
import shapely

from agrivlm.recipes.config import FieldBoundariesConfig
from agrivlm.recipes.context import ChipContext, ParcelInChip, assistant, norm_ring, pick, rng_for, user
from agrivlm.recipes.schema import Record
from agrivlm.recipes.state import BuildState
from agrivlm.tasks.questions import (
    CUT_MARK,
    FIELD_AT_POINT_QUESTIONS,
    NO_FIELD_AT_POINT,
    NO_FIELDS_ANSWER,
    OUTLINE_FIELDS_QUESTIONS,
    UNKNOWN_CLASS,
    parcel_name,
)
from agrivlm.tasks.turns import Turn

FAMILY = "field_boundaries"

_Q_FIELDS = OUTLINE_FIELDS_QUESTIONS
_Q_PARCELS = (
    "Outline every land parcel in this image.",
    "Give a box for each parcel you can see.",
    "Where are the land-use parcels in this image?",
)
#: The listings' questions when they answer polygons (no "box" in the wording; the first ones are shared).
_Q_FIELDS_POLYGON = (
    _Q_FIELDS[0],
    "Trace the boundary of each field.",
    "Where are the fields in this image?",
    "Find all agricultural fields and give their outlines.",
)
_Q_PARCELS_POLYGON = (
    _Q_PARCELS[0],
    "Trace the boundary of each parcel you can see.",
    "Where are the land-use parcels in this image?",
)
_Q_LARGEST = ("Where is the largest {cls} parcel?", "Find the largest {cls} parcel in this image.")
_Q_TRACE = ("Trace the boundary of the {name} at {{box:0}}.", "Give the outline of the {name} at {{box:0}} as points.")
_Q_COUNT = ("How many fields are in this image?", "Count the fields in this image.")
_Q_EDGE = ("Which fields are cut by the edge of the image?", "Which fields extend beyond the image?")

def _listing(parcels: list[ParcelInChip], noun: str) -> str:
    """``"2 fields: grassland {box:0}; forest {box:1} (partly outside the image)."``."""
    return _listing_of(parcels, noun, [f"{{box:{i}}}" for i in range(len(parcels))])


def _listing_of(parcels: list[ParcelInChip], noun: str, refs: list[str]) -> str:
    items = []
    for p, ref in zip(parcels, refs, strict=True):
        label = "parcel" if p.cls == UNKNOWN_CLASS else p.cls
        items.append(f"{label} {ref}" + (CUT_MARK if p.cut else ""))
    body = items[0] if len(items) == 1 else "; ".join(items)
    n = len(parcels)
    return f"{n} {noun}{'s' if n != 1 else ''}: {body}."


def outline_answer(chip: ChipContext, parcels: list[ParcelInChip], noun: str, cfg: FieldBoundariesConfig
                   ) -> tuple[str, dict[str, list]]:
    """A listing's answer text and its positions (``boxes=``/``polygons=`` of the turn), per ``cfg.outline_as``.

    With ``polygon``, each parcel is its outline as at most ``cfg.outline_vertices`` normalized points
    (clockwise on the image, not closed); a parcel whose outline has fewer than 3 points is its box.
    """
    if cfg.outline_as == "box":
        return _listing(parcels, noun), {"boxes": [p.box for p in parcels]}
    boxes: list[tuple[float, float, float, float]] = []
    polygons: list[list[tuple[float, float]]] = []
    refs = []
    for p in parcels:
        ring = norm_ring(chip.grid, p.geom, cfg.outline_vertices, chip.pixel_size)
        if len(ring) >= 3:
            refs.append(f"{{polygon:{len(polygons)}}}")
            polygons.append(ring)
        else:
            refs.append(f"{{box:{len(boxes)}}}")
            boxes.append(p.box)
    return _listing_of(parcels, noun, refs), {"boxes": boxes, "polygons": polygons}


def _meta(parcels: list[ParcelInChip], n_slivers: int) -> dict[str, object]:
    return {
        "field_ids": [p.field_id for p in parcels],
        "classes": [p.cls for p in parcels],
        "cut": [p.cut for p in parcels],
        "area_px": [round(p.area_px, 3) for p in parcels],
        "n_slivers": n_slivers,
    }


def _rng(state: BuildState, chip: ChipContext, task: str, subject: str = "") -> np.random.Generator:
    """The generator of one task (and subject) of one chip: draws never depend on what else is asked."""
    return rng_for(state.seed, FAMILY, chip.chip_id, task, subject)


def build_field_boundaries(state: BuildState, chip: ChipContext, cfg: FieldBoundariesConfig) -> list[Record]:
    """The field-boundary records of one chip (frames: the chip's clear dates over the whole stack)."""
    frames = state.frames_all.get(chip.chip_id)
    if not frames:
        return []
    f = state.factory
    visible = [p for p in chip.parcels if p.area_px >= cfg.min_area_px]
    n_slivers = len(chip.parcels) - len(visible)
    fields = [p for p in visible if cfg.field_classes is None or p.cls in cfg.field_classes]
    out = _outline_records(state, chip, frames, fields, visible, n_slivers, cfg)
    if "largest_of_class" in cfg.tasks:
        out.extend(_largest_records(state, chip, frames, visible, n_slivers, cfg))
    if "trace_outline" in cfg.tasks:
        out.extend(_trace_records(state, chip, frames, visible, n_slivers, cfg))
    if "field_at_point" in cfg.tasks:
        out.extend(_field_at_point(state, chip, frames, fields, cfg))
    if "count_fields" in cfg.tasks:
        r = _rng(state, chip, "count_fields")
        n = len(fields)
        out.append(f.record(chip, frames, FAMILY, "count_fields", "all", [
            user(pick(r, _Q_COUNT)),
            assistant(f"{n} field{'s' if n != 1 else ''}." if n else "There are no fields in this image."),
        ], _meta(fields, n_slivers)))
    if "edge_fields" in cfg.tasks and fields:
        cut = [p for p in fields if p.cut]
        if len(cut) <= cfg.max_objects:
            r = _rng(state, chip, "edge_fields")
            answer = _listing(cut, "field").replace(" (partly outside the image)", "") if cut else (
                "None; every field lies fully inside the image."
            )
            out.append(f.record(chip, frames, FAMILY, "edge_fields", "all", [
                user(pick(r, _Q_EDGE)),
                assistant(answer, boxes=[p.box for p in cut]),
            ], _meta(cut, n_slivers)))
    return out


def _outline_records(
    state: BuildState, chip: ChipContext, frames: list[int], fields: list[ParcelInChip], visible: list[ParcelInChip],
    n_slivers: int, cfg: FieldBoundariesConfig,
) -> list[Record]:
    """The listings: ``outline_fields`` (every field, or none) and ``outline_parcels`` (every visible parcel)."""
    f = state.factory
    out: list[Record] = []
    as_polygon = cfg.outline_as == "polygon"
    if "outline_fields" in cfg.tasks and len(fields) <= cfg.max_objects:
        r = _rng(state, chip, "outline_fields")
        answer, positions = outline_answer(chip, fields, "field", cfg) if fields else (NO_FIELDS_ANSWER, {})
        out.append(f.record(chip, frames, FAMILY, "outline_fields", "all", [
            user(pick(r, _Q_FIELDS_POLYGON if as_polygon else _Q_FIELDS)),
            assistant(answer, **positions),
        ], {**_meta(fields, n_slivers), "outline_as": cfg.outline_as}))
    if "outline_parcels" in cfg.tasks and visible and len(visible) <= cfg.max_objects:
        r = _rng(state, chip, "outline_parcels")
        answer, positions = outline_answer(chip, visible, "parcel", cfg)
        out.append(f.record(chip, frames, FAMILY, "outline_parcels", "all", [
            user(pick(r, _Q_PARCELS_POLYGON if as_polygon else _Q_PARCELS)),
            assistant(answer, **positions),
        ], {**_meta(visible, n_slivers), "outline_as": cfg.outline_as}))
    return out


def _largest_records(
    state: BuildState, chip: ChipContext, frames: list[int], visible: list[ParcelInChip], n_slivers: int,
    cfg: FieldBoundariesConfig,
) -> list[Record]:
    """``largest_of_class``: the box of the largest visible parcel of each class, when it wins by ``unique_margin``."""
    out: list[Record] = []
    for cls in sorted({p.cls for p in visible if p.cls != UNKNOWN_CLASS}):
        ranked = sorted((p for p in visible if p.cls == cls), key=lambda p: -p.area_px)
        if len(ranked) > 1 and ranked[0].area_px < cfg.unique_margin * ranked[1].area_px:
            continue  # no clear winner
        top = ranked[0]
        r = _rng(state, chip, "largest_of_class", cls)
        out.append(state.factory.record(chip, frames, FAMILY, "largest_of_class", cls.replace(" ", "_"), [
            user(pick(r, _Q_LARGEST).format(cls=cls)),
            assistant("{box:0}" + (" (partly outside the image)" if top.cut else ""), boxes=[top.box]),
        ], {**_meta([top], n_slivers), "class": cls, "n_of_class": len(ranked)}))
    return out


def _trace_records(
    state: BuildState, chip: ChipContext, frames: list[int], visible: list[ParcelInChip], n_slivers: int,
    cfg: FieldBoundariesConfig,
) -> list[Record]:
    """``trace_outline``: the outline of each visible parcel of at least ``trace_min_area_px`` pixels."""
    out: list[Record] = []
    for p in visible:
        if p.area_px < cfg.trace_min_area_px:
            continue
        ring = norm_ring(chip.grid, p.geom, cfg.max_vertices, chip.pixel_size)
        if len(ring) < 3:
            continue
        r = _rng(state, chip, "trace_outline", p.field_id)
        out.append(state.factory.record(chip, frames, FAMILY, "trace_outline", p.field_id, [
            user(pick(r, _Q_TRACE).format(name=parcel_name(p.cls)), boxes=[p.box]),
            assistant("{polygon:0}", polygons=[ring]),
        ], {**_meta([p], n_slivers), "n_vertices": len(ring)}))
    return out


def _field_at_point(state: BuildState, chip: ChipContext, frames: list[int], fields: list[ParcelInChip],
                    cfg: FieldBoundariesConfig) -> list[Record]:
    """``cfg.point_prompts`` records "Outline the field at <point>." of one chip (see the module docstring)."""
    if cfg.point_prompts == 0:
        return []
    r = rng_for(state.seed, FAMILY, chip.chip_id, "field_at_point")
    edges = shapely.union_all([p.geom.boundary for p in chip.parcels]) if chip.parcels else None
    tol = cfg.point_edge_px * chip.pixel_size
    field_rows = {p.row for p in fields}
    asked: list[tuple[int, list[Turn], dict[str, object]]] = []  # (k, [question, answer], meta) per point
    for k in range(cfg.point_prompts):
        for _ in range(50):  # redraw points on an edge or in a sliver
            u, v = (float(x) for x in r.uniform(0.02, 0.98, 2))
            x, y = chip.grid.norm_to_crs(u, v)
            pt = shapely.Point(float(x), float(y))
            if edges is not None and edges.distance(pt) < tol:
                continue
            under = next((p for p in chip.parcels if p.geom.contains(pt)), None)
            if under is not None and under.area_px < cfg.min_area_px:
                continue
            break
        else:
            continue
        hit = under if under is not None and under.row in field_rows else None
        question = user(pick(r, FIELD_AT_POINT_QUESTIONS), points=[(round(u, 6), round(v, 6))])
        meta: dict[str, object] = {"point": [u, v], "field_id": None if hit is None else hit.field_id}
        ring = [] if hit is None else norm_ring(chip.grid, hit.geom, cfg.outline_vertices, chip.pixel_size)
        if hit is None:
            answer = assistant(NO_FIELD_AT_POINT)
        else:
            label = "parcel" if hit.cls == UNKNOWN_CLASS else hit.cls
            cut = CUT_MARK if hit.cut else ""
            answer = (assistant(f"{label} {{polygon:0}}{cut}.", polygons=[ring]) if len(ring) >= 3
                      else assistant(f"{label} {{box:0}}{cut}.", boxes=[hit.box]))
            meta.update(cls=hit.cls, cut=hit.cut, area_px=round(hit.area_px, 3))
        asked.append((k, [question, answer], meta))
    out: list[Record] = []
    n = cfg.points_per_record
    for i in range(0, len(asked), n):
        group = asked[i:i + n]
        if n == 1:
            k, turns, meta = group[0]
            out.append(state.factory.record(chip, frames, FAMILY, "field_at_point", f"p{k}", turns, meta))
            continue
        # several points of the chip in one conversation, every answer supervised (more answers per image)
        ks = [k for k, _, _ in group]
        subject = f"p{ks[0]}" if len(ks) == 1 else f"p{ks[0]}-{ks[-1]}"
        metas = [m for _, _, m in group]
        columns: dict[str, object] = {
            "point_u": [float(m["point"][0]) for m in metas],  # type: ignore[index]
            "point_v": [float(m["point"][1]) for m in metas],  # type: ignore[index]
            "field_ids": [str(m["field_id"] or "") for m in metas],  # "": no field at that point
        }
        out.append(state.factory.record(chip, frames, FAMILY, "field_at_point", subject,
                                        [t for _, turns, _ in group for t in turns], columns))
    return out
