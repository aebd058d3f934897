"""The journal → the run's outputs, written atomically (``agrivlm.io.atomic_path``).

Each file is written to a temporary file beside it, then renamed onto it.

``--out`` names one layer; its suffix picks the format (:data:`agrivlm.schema.PREDICTION_FORMATS`):

* ``.gpkg``: a GeoPackage layer named after the task (:data:`LAYERS`);
* ``.parquet``: GeoParquet 1.1 (``geo`` metadata with the CRS as PROJJSON, and a ``bbox`` covering column);
* ``.fgb``: FlatGeobuf with its spatial index (features come back in the index's order, not the run's);
* ``.geojson``: RFC 7946 — reprojected to EPSG:4326 lon/lat, no ``crs`` member, and a warning naming the CRS it
  was reprojected from. The other formats keep the output CRS (the first stack's).

The columns are typed in every format (:data:`COLUMN_TYPES`): scores and box corners are floats, ``cut`` a
boolean, ``n_dates`` an integer, dates datetimes (midnight of the day; GeoPackage, FlatGeobuf and GeoJSON have
no date-only type pyogrio writes), and ``task``, ``label``, ``shape``, ``kind`` and ``last_stage`` categories
(GeoParquet keeps them as dictionary columns; the OGR formats as strings). Three columns stay JSON because they
hold a variable number of items that GeoPackage, FlatGeobuf and GeoJSON have no column type for: ``stages`` and
``tokens`` of the growth layer (``{date: …}``) and ``dates`` / ``segments`` of the answers layer.

The layers:

* ``fields`` (``--task fields``): one polygon per detected field, in the output CRS (the first stack's CRS;
  features of stacks in another CRS are reprojected to it): the field's outline where the answer gives a
  polygon, its box where it gives a box (``shape``). Columns: ``field_id`` (``<chip_id>#<k>``, with ``<i>:``
  in front for the i-th INPUT when several are given), :data:`agrivlm.schema.FIELD_PREDICTION_COLUMNS`
  (``chip_id``, ``task``, ``score`` — the geometric mean of the item's position tokens' probabilities —,
  ``tokens`` — the item's position tokens as written), ``label`` (the class the answer names, e.g.
  ``grassland``), ``cut`` (the answer marks the field "partly outside the image"), ``stack`` (the INPUT),
  ``answer`` (the chip's whole answer), ``box_u1, box_v1, box_u2, box_v2`` (the box, or the polygon's
  bounding box, normalized to [0, 1] of the chip's width and height; a point is ``u, v, u, v``) and ``shape``
  (``box`` or ``polygon``). Detections of overlapping chips are merged by :func:`agrivlm.infer.nms.nms`
  (polygon IoU in map units; fields the chip shows whole rank before cut ones, then by score).
* ``growth`` (``--task growth``): one polygon per field of ``--fields`` with at least one predicted stage:
  ``field_id``, ``chip_id`` (the chips asked, comma-joined), ``task``, ``score`` (mean of its stage answers'
  scores), ``tokens`` (``{date: raw answer}`` JSON), ``stages`` (``{date: stage}`` JSON), ``n_dates``,
  ``first_date`` and ``last_date`` (the first and last day with a stage), ``last_stage`` (the stage on
  ``last_date``, an ordered category of :data:`agrivlm.schema.GROWTH_STAGES`), ``stack``.
  Beside it, ``<stem>_stages.csv``: the growth-stage table of :data:`agrivlm.schema.STAGE_COLUMNS`
  (``field_id, date, stage``; plus ``score, chip_id, season, stack, answer``), one row per field and day — where
  overlapping chips (or two acquisitions on one day) answered, the answer with the highest score wins.
  ``agrivlm eval growth --pred <stem>_stages.csv`` reads it.
* ``answers`` (``--task ask``): per answer, one polygon per box or polygon and one point per point (``kind``:
  ``box``, ``polygon``, ``point``), or — for
  an answer without positions — the chip's footprint (``kind = chip``); plus ``answer``, ``dates`` and
  ``segments`` (decoded ``TEMP`` positions as ISO days, JSON), ``first_date`` and ``last_date`` (the earliest
  and latest of them; empty without any).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from rasterio.crs import CRS

from agrivlm.infer.errors import InferError
from agrivlm.infer.journal import Journal
from agrivlm.infer.nms import nms
from agrivlm.infer.prepare import FieldLayer
from agrivlm.io import atomic_path
from agrivlm.schema import FIELD_PREDICTION_COLUMNS, GROWTH_STAGES, STAGE_COLUMNS, prediction_format_problem

log = logging.getLogger(__name__)

#: Journaled feature kinds that are field shapes (NMS-merged; the ``shape`` column of the ``fields`` layer).
SHAPES: tuple[str, ...] = ("box", "polygon")

#: GeoPackage layer of each task.
LAYERS = {"fields": "fields", "growth": "growth", "ask": "answers"}

#: The item's box (or the polygon's bounding box) in the chip: ``(u1, v1, u2, v2)``, normalized to [0, 1] of
#: the chip's width and height.
BOX_COLUMNS: tuple[str, ...] = ("box_u1", "box_v1", "box_u2", "box_v2")

#: Columns of the ``fields`` / ``answers`` layers (plus geometry).
DETECTION_COLUMNS: tuple[str, ...] = ("field_id", *FIELD_PREDICTION_COLUMNS, "label", "cut", "stack", "answer",
                                      *BOX_COLUMNS, "shape")
ASK_COLUMNS: tuple[str, ...] = (*DETECTION_COLUMNS, "kind", "dates", "segments", "first_date", "last_date")
GROWTH_COLUMNS: tuple[str, ...] = ("field_id", *FIELD_PREDICTION_COLUMNS, "stages", "n_dates", "first_date",
                                   "last_date", "last_stage", "stack")

#: The type of every layer column that is not text (the others are strings); dates are datetimes at midnight.
COLUMN_TYPES: dict[str, Any] = {
    "score": "float64", **dict.fromkeys(BOX_COLUMNS, "float64"), "cut": "bool", "n_dates": "int64",
    "first_date": "datetime64[ms]", "last_date": "datetime64[ms]",
    "task": "category", "label": "category", "shape": "category", "kind": "category",
    "last_stage": pd.CategoricalDtype(list(GROWTH_STAGES), ordered=True),
}
STAGE_TABLE_COLUMNS: tuple[str, ...] = (*STAGE_COLUMNS, "score", "chip_id", "season", "stack", "answer")


def stages_path(out: Path) -> Path:
    """The growth-stage table beside ``out``: ``<stem>_stages.csv``."""
    return out.with_name(f"{out.stem}_stages.csv")


def report_path(out: Path) -> Path:
    """The run report beside ``out``: ``<stem>_report.json``."""
    return out.with_name(f"{out.stem}_report.json")


def journal_path(out: Path) -> Path:
    """The journal beside ``out``: ``<name>.journal.jsonl``."""
    return out.with_name(f"{out.name}.journal.jsonl")


def output_crs(journal: Journal, keys: Sequence[str]) -> CRS | None:
    """The CRS of the first stack (INPUT order) the journal knows, or None."""
    for key in keys:
        info = journal.stack_info(key)
        if info is not None:
            return CRS.from_wkt(info["crs"])
    return None


def _nan(v: Any) -> float:
    return math.nan if v is None else float(v)


def typed(frame: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """``frame`` with its columns cast to :data:`COLUMN_TYPES` (columns not named there are left as they are)."""
    casts = {c: t for c, t in COLUMN_TYPES.items() if c in frame.columns}
    return frame.astype(casts) if casts else frame


def _empty(columns: Sequence[str], crs: CRS | None) -> gpd.GeoDataFrame:
    data = {c: pd.Series([], dtype=COLUMN_TYPES.get(c, object)) for c in columns}
    return gpd.GeoDataFrame(data, geometry=gpd.GeoSeries([], crs=None if crs is None else crs.to_wkt()))


def _box_columns(box: Sequence[float]) -> dict[str, float]:
    """The box columns of a journaled ``box``: ``[u1, v1, u2, v2]``, or a point's ``[u, v]`` as ``u, v, u, v``."""
    corners = list(box) * 2 if len(box) == 2 else list(box)
    return dict(zip(BOX_COLUMNS, map(float, corners), strict=True))


def _date_range(days: Sequence[str], segments: Sequence[Sequence[str]]) -> dict[str, Any]:
    """``first_date`` / ``last_date``: the earliest and latest ISO day of an answer (None without any)."""
    every = sorted([*days, *(d for seg in segments for d in seg)])
    return {"first_date": every[0] if every else None, "last_date": every[-1] if every else None}


def _to_crs(frame: gpd.GeoDataFrame, crs: CRS) -> gpd.GeoDataFrame:
    return frame if CRS.from_user_input(frame.crs) == crs else frame.to_crs(crs.to_wkt())


def detection_frame(journal: Journal, keys: Sequence[str], names: Sequence[str], task: str) -> gpd.GeoDataFrame:
    """Every journaled feature of the ``fields``/``ask`` task, before NMS, in the output CRS.

    Rows are ordered by INPUT, chip (row-major index), answer and feature, whatever order the journal has.
    """
    crs = output_crs(journal, keys)
    columns = ASK_COLUMNS if task == "ask" else DETECTION_COLUMNS
    frames = []
    prefix = len(keys) > 1
    for i, (key, name) in enumerate(zip(keys, names, strict=True)):
        info = journal.stack_info(key)
        if info is None:
            continue
        rows: list[dict[str, Any]] = []
        geoms = []
        chips = sorted((r for r in journal.chips(key) if r["status"] == "ok"), key=lambda r: int(r["index"]))
        for rec in chips:
            cid = rec["chip_id"]
            k = 0
            for a, ans in enumerate(rec["answers"]):
                for feat in ans["features"]:
                    fid = f"{cid}#{k}" if task == "fields" else f"{cid}#{a}.{k}"
                    row = {
                        "field_id": f"{i}:{fid}" if prefix else fid, "chip_id": cid, "task": task,
                        "score": _nan(feat["score"]), "tokens": feat["tokens"], "label": feat["label"],
                        "cut": bool(feat["cut"]), "stack": name, "answer": ans["text"], **_box_columns(feat["box"]),
                        "shape": feat["kind"] if feat["kind"] in SHAPES else "",
                    }
                    if task == "ask":
                        days, segments = ans.get("dates", []), ans.get("segments", [])
                        row.update(kind=feat["kind"], dates=json.dumps(days), segments=json.dumps(segments),
                                   **_date_range(days, segments))
                    rows.append(row)
                    geoms.append(feat["geometry"])
                    k += 1
        if not rows:
            continue
        frame = gpd.GeoDataFrame(rows, geometry=gpd.GeoSeries(shapely.from_wkb(geoms), crs=info["crs"]))
        frames.append(_to_crs(frame, crs) if crs is not None else frame)
    if not frames:
        return _empty(columns, crs)
    out = gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), geometry="geometry",
                           crs=frames[0].crs if crs is None else crs.to_wkt())
    return typed(out[[*columns, "geometry"]])


def suppress(frame: gpd.GeoDataFrame, iou_threshold: float, min_score: float = 0.0) -> gpd.GeoDataFrame:
    """Drop features scored below ``min_score``, then NMS over the fields (points and chips stay).

    Boxes and polygons alike are ranked and suppressed by the IoU of their polygons in map units.
    """
    if frame.empty:
        return frame
    frame = frame[~(frame["score"] < min_score)]
    is_box = frame["kind"].isin(SHAPES) if "kind" in frame.columns else pd.Series(True, index=frame.index)
    boxes = frame[is_box]
    keep = nms(boxes.geometry.to_numpy(), boxes["score"].to_numpy(dtype=np.float64), iou_threshold,
               priority=(~boxes["cut"].astype(bool)).astype(np.int64).to_numpy())
    kept = boxes.iloc[keep]
    out = pd.concat([kept, frame[~is_box]]).sort_index()
    return typed(gpd.GeoDataFrame(out, geometry="geometry", crs=frame.crs).reset_index(drop=True))


def stage_table(journal: Journal, keys: Sequence[str], names: Sequence[str]) -> pd.DataFrame:
    """The growth-stage table: one row per (field, day), the highest-scored answer among chips and acquisitions."""
    rows = []
    order = 0
    for key, name in zip(keys, names, strict=True):
        chips = sorted((r for r in journal.chips(key) if r["status"] == "ok"), key=lambda r: int(r["index"]))
        for rec in chips:
            for ans in rec["answers"]:
                meta = ans["meta"]
                # a timeline answer gives the stage on every date of its season, a per-date answer one
                per_date = ans.get("stages") or ({meta["date"]: ans["stage"]} if ans.get("stage") else {})
                for date, stage in per_date.items():
                    rows.append({"field_id": str(meta["field_id"]), "date": date, "stage": stage,
                                 "score": _nan(ans["score"]), "chip_id": rec["chip_id"],
                                 "season": meta.get("season", ""), "stack": name, "answer": ans["text"],
                                 "_order": order})
                    order += 1
    if not rows:
        return pd.DataFrame({c: pd.Series([], dtype=float if c == "score" else object) for c in STAGE_TABLE_COLUMNS})
    table = pd.DataFrame(rows)
    table["_rank"] = table["score"].fillna(-np.inf)
    table = table.sort_values(["field_id", "date", "_rank", "_order"], ascending=[True, True, False, True],
                              kind="stable")
    table = table.drop_duplicates(["field_id", "date"], keep="first")
    return table[list(STAGE_TABLE_COLUMNS)].reset_index(drop=True)


def growth_frame(stages: pd.DataFrame, fields: FieldLayer | None, crs: CRS | None) -> gpd.GeoDataFrame:
    """One polygon per field with predicted stages (``--fields`` geometry in the output CRS)."""
    if stages.empty or fields is None or crs is None:
        return _empty(GROWTH_COLUMNS, crs)
    layer = fields.to_crs(crs)
    geom_of = dict(zip(layer.ids.tolist(), layer.geoms.tolist(), strict=True))
    rows, geoms = [], []
    for fid, group in stages.groupby("field_id", sort=True):
        group = group.sort_values("date")
        rows.append({
            "field_id": str(fid), "chip_id": ",".join(sorted(set(group["chip_id"]))), "task": "growth",
            "score": float(group["score"].mean()), "tokens": json.dumps(dict(zip(group["date"], group["answer"],
                                                                                 strict=True))),
            "stages": json.dumps(dict(zip(group["date"], group["stage"], strict=True))), "n_dates": len(group),
            "first_date": group["date"].iloc[0], "last_date": group["date"].iloc[-1],
            "last_stage": group["stage"].iloc[-1], "stack": ",".join(sorted(set(group["stack"]))),
        })
        geoms.append(geom_of[str(fid)])
    frame = gpd.GeoDataFrame(rows, geometry=gpd.GeoSeries(geoms, crs=crs.to_wkt()))
    return typed(frame[[*GROWTH_COLUMNS, "geometry"]])


def check_format(out: Path) -> None:
    """Raise :class:`InferError` unless ``out``'s suffix is one of :data:`agrivlm.schema.PREDICTION_FORMATS`."""
    problem = prediction_format_problem(out)
    if problem is not None:
        raise InferError(problem)


def rfc7946(frame: gpd.GeoDataFrame, out: Path) -> gpd.GeoDataFrame:
    """``frame`` in EPSG:4326 lon/lat for RFC 7946 GeoJSON, with a warning naming the CRS it was in.

    An empty frame without a CRS is labelled EPSG:4326 as it is; features without a CRS cannot be reprojected
    (:class:`InferError`).
    """
    if frame.crs is None:
        if len(frame):
            raise InferError(f"{out}: the features have no CRS, so they cannot be written as RFC 7946 GeoJSON "
                             "(EPSG:4326); write a .gpkg instead")
        return frame.set_crs("EPSG:4326")
    epsg = frame.crs.to_epsg()
    if epsg == 4326:
        return frame
    name = f"{frame.crs.name}" if epsg is None else f"EPSG:{epsg} ({frame.crs.name})"
    log.warning("%s: GeoJSON is RFC 7946 lon/lat, so the features were reprojected from the stack's CRS %s "
                "to EPSG:4326 (use .gpkg, .parquet or .fgb to keep it)", out, name)
    return frame.to_crs("EPSG:4326")


def write_layer(frame: gpd.GeoDataFrame, out: Path, layer: str, stamp: str | None = None) -> None:
    """Write ``frame`` to ``out`` atomically in the format of its suffix (see the module docstring).

    ``layer`` names the layer (the GeoPackage table, the GeoJSON and FlatGeobuf ``name``, never the temporary
    file's name). ``stamp`` (``YYYY-MM-DD``) is the GeoPackage's ``last_change`` instead of the time of writing,
    so the same answers give the same bytes (a killed and resumed run, a rerun). Raises :class:`InferError` for a
    suffix that is not a format.
    """
    import pyogrio

    check_format(out)
    suffix = out.suffix.lower()
    frame = typed(frame)
    if suffix == ".geojson":
        frame = rfc7946(frame, out)
    if stamp is not None:
        pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": f"{stamp}T00:00:00.000Z"})
    try:
        with atomic_path(out) as tmp:
            if suffix == ".parquet":
                frame.to_parquet(tmp, schema_version="1.1.0", write_covering_bbox=True)
            elif suffix == ".fgb":
                frame.to_file(tmp, driver="FlatGeobuf", engine="pyogrio", layer=layer)
            elif suffix == ".geojson":
                frame.to_file(tmp, driver="GeoJSON", engine="pyogrio", RFC7946="YES", layer=layer)
            else:
                frame.to_file(tmp, driver="GPKG", engine="pyogrio", layer=layer)
    finally:
        if stamp is not None:
            pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": None})


def write_outputs(out: Path, task: str, frame: gpd.GeoDataFrame, stages: pd.DataFrame | None,
                  stamp: str | None = None) -> dict[str, str]:
    """Write the layer (and the stage table) atomically; returns ``{what: path}`` (``stamp``: :func:`write_layer`)."""
    written = {"layer": str(out)}
    write_layer(frame, out, LAYERS[task], stamp)
    if stages is not None:
        target = stages_path(out)
        with atomic_path(target) as tmp:
            stages.to_csv(tmp, index=False)
        written["stages"] = str(target)
    return written
