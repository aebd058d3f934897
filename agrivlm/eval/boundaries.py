"""Field-boundary evaluation: one-to-one IoU matching of predicted and true field polygons.

What the numbers mean (``summary.json`` keys; every area in m² of the common metric CRS):

* **Matching** (:func:`match_pairs`): a (truth, prediction) pair is a *candidate* at threshold ``t`` when
  their IoU is strictly greater than ``t`` (Fields of The World counts a true positive at ``IoU > 0.5``).
  Candidates are matched one-to-one by the Hungarian algorithm (``scipy.optimize.linear_sum_assignment``),
  which maximises the number of matches and, among maximum matchings, the summed IoU. Unmatched
  predictions are false positives (a duplicate of a matched prediction is one), unmatched truths false
  negatives.
* ``precision = TP / n_pred``, ``recall = TP / n_truth``, ``f1 = 2·TP / (2·TP + FP + FN)`` at the main
  threshold (0.5 by default): FTW's object-level precision and recall. ``precision`` is undefined (JSON
  ``null``) when there are no predictions, ``recall`` when there is no truth — as in FTW; ``f1`` is defined
  whenever either layer has a feature (0 when one of them is empty).
* ``map_50_95``: the mean over ``t ∈ {0.50, 0.55, …, 0.95}`` of ``TP_t / (TP_t + FP_t + FN_t)``, each
  with its own Hungarian matching. This is the instance-segmentation "average precision" of the 2018
  Data Science Bowl (also StarDist's ``accuracy``), used because field predictions carry no calibrated
  confidence to rank by; it is **not** COCO's ranked, interpolated AP. ``f1_50_95`` is the mean F1 over
  the same thresholds; ``thresholds`` lists TP/FP/FN, precision, recall, F1 and AP at each.
* ``mean_iou``: mean IoU of the pairs matched at the main threshold (``null`` when none).
* ``pixel_iou``, ``pixel_precision``, ``pixel_recall``: with an extent raster, both layers are rasterised
  on its grid (a pixel is "field" when its centre lies in a polygon: ``rasterio.features.rasterize``
  without ``all_touched``) and the field class is scored over the raster's valid pixels (its GDAL dataset
  mask; nodata pixels are ignored, like FTW's ignore index) — FTW's pixel-level IoU/precision/recall.

CRS: both layers are reprojected to the truth's CRS when it is projected in metres, else to the local UTM
zone of the truth (``GeoDataFrame.estimate_utm_crs``). Invalid polygons are repaired with
``shapely.make_valid`` (polygonal parts kept) and counted; empty or null geometries are dropped and counted.
With ``boxes=True`` every polygon is replaced by its bounding box in the metric CRS before scoring.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import numpy.typing as npt
import pandas as pd
import pyproj
import rasterio
import rasterio.features
import shapely
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from agrivlm.errors import EvalError
from agrivlm.eval.common import FIELD_REPORT_FILES, check_outputs, json_safe, ratio
from agrivlm.geo.coords import GeoGrid
from agrivlm.geo.rasters import RasterPath, raster_path
from agrivlm.io import atomic_path, field_ids, read_vector, require_crs, write_json

#: IoU thresholds of ``map_50_95`` / ``f1_50_95``: 0.50, 0.55, …, 0.95 (COCO's grid).
THRESHOLDS: tuple[float, ...] = tuple(round(0.50 + 0.05 * k, 2) for k in range(10))

#: Column names looked up, in order, for feature ids when none is given (else the row number is the id).

_POLYGONAL = ("Polygon", "MultiPolygon")

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
GeomArray = npt.NDArray[np.object_]


# ------------------------------------------------------------------------------------------ pure math
def pairwise_iou(truth: GeomArray, pred: GeomArray) -> tuple[IntArray, IntArray, FloatArray]:
    """IoU of every (truth, prediction) pair whose areas overlap, vectorised over an STRtree.

    Args:
        truth: ``(N,)`` shapely polygons in a metric CRS.
        pred: ``(M,)`` shapely polygons in the same CRS.

    Returns:
        ``(ti, pj, iou)``: ``(K,)`` truth indices, ``(K,)`` prediction indices and ``(K,)`` IoU in ``(0, 1]``
        for the K pairs with a positive intersection area, sorted by ``(ti, pj)``.

    """
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64))
    truth, pred = np.asarray(truth, dtype=object), np.asarray(pred, dtype=object)
    if truth.size == 0 or pred.size == 0:
        return empty
    ti, pj = shapely.STRtree(pred).query(truth, predicate="intersects")
    if ti.size == 0:
        return empty
    inter = shapely.area(shapely.intersection(truth[ti], pred[pj]))
    union = shapely.area(truth)[ti] + shapely.area(pred)[pj] - inter
    iou = np.clip(np.divide(inter, union, out=np.zeros_like(inter), where=union > 0), 0.0, 1.0)
    keep = iou > 0.0
    ti, pj, iou = ti[keep].astype(np.int64), pj[keep].astype(np.int64), iou[keep]
    order = np.lexsort((pj, ti))
    return ti[order], pj[order], iou[order]


def match_pairs(
    ti: IntArray, pj: IntArray, iou: FloatArray, threshold: float
) -> tuple[IntArray, IntArray, FloatArray]:
    """Optimal one-to-one matching of the candidate pairs with ``iou > threshold`` (Hungarian).

    Maximises the number of matches, then the summed IoU among maximum matchings. The candidate graph is
    split into connected components and each is solved densely, so thousands of fields stay cheap.

    Args:
        ti: ``(K,)`` truth indices of the pairs (as returned by :func:`pairwise_iou`).
        pj: ``(K,)`` prediction indices of the pairs.
        iou: ``(K,)`` IoU of the pairs.
        threshold: a pair is a candidate when its IoU is strictly greater than this.

    Returns:
        ``(ti, pj, iou)`` of the matched pairs, sorted by truth index.

    """
    keep = np.asarray(iou) > threshold
    ti, pj, iou = np.asarray(ti)[keep], np.asarray(pj)[keep], np.asarray(iou, dtype=np.float64)[keep]
    if ti.size == 0:
        return ti.astype(np.int64), pj.astype(np.int64), iou
    t_nodes, t_local = np.unique(ti, return_inverse=True)
    p_nodes, p_local = np.unique(pj, return_inverse=True)
    nt, n_nodes = len(t_nodes), len(t_nodes) + len(p_nodes)
    graph = coo_matrix((np.ones(ti.size), (t_local, nt + p_local)), shape=(n_nodes, n_nodes))
    _, labels = connected_components(graph, directed=False)
    comp = labels[t_local]
    size = np.bincount(comp)
    alone = size[comp] == 1  # a component with one edge: that edge is the matching
    out_t, out_p, out_iou = [ti[alone]], [pj[alone]], [iou[alone]]
    rest = np.flatnonzero(~alone)
    rest = rest[np.argsort(comp[rest], kind="stable")]
    for idx in np.split(rest, np.flatnonzero(np.diff(comp[rest])) + 1) if rest.size else []:
        rows, r_loc = np.unique(ti[idx], return_inverse=True)
        cols, c_loc = np.unique(pj[idx], return_inverse=True)
        weight = np.zeros((len(rows), len(cols)))
        ious = np.zeros_like(weight)
        # A bonus larger than any IoU sum makes one more match always worth more than any IoU gain.
        weight[r_loc, c_loc] = min(weight.shape) + 1.0 + iou[idx]
        ious[r_loc, c_loc] = iou[idx]
        r, c = linear_sum_assignment(weight, maximize=True)
        ok = weight[r, c] > 0
        out_t.append(rows[r[ok]])
        out_p.append(cols[c[ok]])
        out_iou.append(ious[r[ok], c[ok]])
    mt, mp, mi = np.concatenate(out_t), np.concatenate(out_p), np.concatenate(out_iou)
    order = np.argsort(mt, kind="stable")
    return mt[order].astype(np.int64), mp[order].astype(np.int64), mi[order]



@dataclass(frozen=True)
class ThresholdScores:
    """Object counts and scores at one IoU threshold (a match needs ``IoU > threshold``)."""

    threshold: float
    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float:
        """``TP / (TP + FP)`` = TP / number of predictions; NaN without predictions."""
        return ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        """``TP / (TP + FN)`` = TP / number of true fields; NaN without true fields."""
        return ratio(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> float:
        """``2·TP / (2·TP + FP + FN)`` (the harmonic mean of precision and recall where both exist)."""
        return ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def ap(self) -> float:
        """``TP / (TP + FP + FN)``: the Data Science Bowl 2018 "average precision" at this threshold."""
        return ratio(self.tp, self.tp + self.fp + self.fn)

    def to_dict(self) -> dict[str, Any]:
        """Counts and scores as plain JSON values (NaN → ``None``)."""
        return json_safe(
            {"threshold": self.threshold, "tp": self.tp, "fp": self.fp, "fn": self.fn, "precision": self.precision,
             "recall": self.recall, "f1": self.f1, "ap": self.ap}
        )


@dataclass(frozen=True)
class PixelScores:
    """Pixel-level scores of the field class on a raster grid (FTW's pixel metrics)."""

    iou: float
    precision: float
    recall: float
    #: Valid pixels scored; field pixels in truth, in prediction, and in both.
    n_valid: int
    n_truth: int
    n_pred: int
    n_both: int
    #: The raster whose grid defined the pixels.
    extent: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Scores and counts as plain JSON values (NaN → ``None``)."""
        return json_safe(dict(self.__dict__))


def pixel_scores(
    truth: npt.ArrayLike, pred: npt.ArrayLike, valid: npt.ArrayLike | None = None, extent: str = ""
) -> PixelScores:
    """IoU, precision and recall of the field class from two boolean masks.

    Args:
        truth: ``(H, W)`` bool, True where a true field covers the pixel.
        pred: ``(H, W)`` bool, True where a predicted field covers the pixel.
        valid: ``(H, W)`` bool, pixels to score (default: all).
        extent: name of the raster the grid came from (recorded only).

    Returns:
        IoU = |T∧P| / |T∨P|, precision = |T∧P| / |P|, recall = |T∧P| / |T| (NaN where a denominator is 0).

    """
    t, p = np.asarray(truth, dtype=bool), np.asarray(pred, dtype=bool)
    v = np.ones_like(t) if valid is None else np.asarray(valid, dtype=bool)
    t, p = t & v, p & v
    both, n_t, n_p = int((t & p).sum()), int(t.sum()), int(p.sum())
    return PixelScores(
        iou=ratio(both, n_t + n_p - both), precision=ratio(both, n_p), recall=ratio(both, n_t),
        n_valid=int(v.sum()), n_truth=n_t, n_pred=n_p, n_both=both, extent=extent,
    )



# ------------------------------------------------------------------------------------------ layers
@dataclass(frozen=True)
class Layer:
    """A field layer ready to score: ids, polygons in the metric CRS, areas, and what was fixed."""

    #: Feature ids as strings, ``(N,)``.
    ids: npt.NDArray[np.str_]
    #: Polygons in the metric CRS, ``(N,)``.
    geoms: GeomArray
    #: Areas in m², ``(N,)``.
    areas: FloatArray
    #: Where the layer came from (a path, or "<GeoDataFrame>").
    source: str
    #: Its CRS as read.
    source_crs: str
    n_repaired: int
    n_dropped_empty: int


def read_field_layer(src: str | Path | gpd.GeoDataFrame, role: str) -> tuple[gpd.GeoDataFrame, str]:
    """Read a polygon layer (any OGR format, or GeoParquet) and check it has a CRS.

    Returns:
        ``(frame, source)``: the layer in its own CRS and a name for messages.

    Raises:
        EvalError: missing or unreadable file, no CRS.

    """
    if isinstance(src, gpd.GeoDataFrame):
        frame, source = src, f"<{role} GeoDataFrame>"
    else:
        source = str(src)
        frame = read_vector(src, f"{role} layer", EvalError,
                            hint="; pass an existing GeoPackage, GeoJSON or GeoParquet")
    require_crs(frame, source, f"{role} layer", EvalError)
    return frame, source


def metric_crs(truth: gpd.GeoDataFrame, pred: gpd.GeoDataFrame) -> pyproj.CRS:
    """The common metric CRS: the truth's if projected in metres, else the UTM zone of the truth's centre."""
    ref = truth if len(truth) and truth.geometry.notna().any() else pred
    crs = pyproj.CRS.from_user_input(ref.crs)
    if crs.is_projected and all(axis.unit_name in ("metre", "meter") for axis in crs.axis_info):
        return crs
    valid = ref[ref.geometry.notna() & ~ref.geometry.is_empty]
    if len(valid) == 0:
        return pyproj.CRS.from_epsg(3857) if not crs.is_projected else crs
    try:
        return pyproj.CRS.from_user_input(valid.estimate_utm_crs())
    except RuntimeError as exc:  # coordinates outside the CRS's area: usually a wrong CRS on the layer
        raise EvalError(
            f"no UTM zone fits the layer's bounds {valid.total_bounds.round(3).tolist()} in {crs.to_string()}: "
            "its CRS is probably wrong (GeoJSON is always lon/lat); fix the CRS of the truth layer"
        ) from exc


def _polygonal(geom: Any) -> Any:
    """The polygonal part of a geometry (an empty Polygon if none)."""
    if geom is None:
        return shapely.Polygon()
    if geom.geom_type in _POLYGONAL:
        return geom
    parts = [g for g in shapely.get_parts(geom) if g.geom_type in _POLYGONAL]
    return shapely.union_all(parts) if parts else shapely.Polygon()


def prepare_layer(
    frame: gpd.GeoDataFrame, source: str, role: str, crs: pyproj.CRS, id_column: str | None = None,
    boxes: bool = False,
) -> Layer:
    """Ids, repaired polygons in ``crs`` (bounding boxes if ``boxes``), and areas in m².

    Raises:
        EvalError: unknown id column, non-polygon features.

    """
    option = "--pred-id" if role == "prediction" else "--truth-id"
    ids = field_ids(frame, source, id_column, EvalError, option)[0].to_numpy()
    source_crs = pyproj.CRS.from_user_input(frame.crs).to_string()
    geoms = np.asarray(frame.geometry.to_crs(crs).values, dtype=object)
    present = ~(shapely.is_missing(geoms) | shapely.is_empty(geoms))
    kinds = shapely.get_type_id(geoms[present])
    bad = ~np.isin(kinds, [3, 6, 7])  # Polygon, MultiPolygon, GeometryCollection (checked below)
    if bad.any():
        names = sorted({g.geom_type for g in geoms[present][bad]})
        raise EvalError(
            f"{source}: {int(bad.sum())} {role} feature(s) are not polygons ({', '.join(names)}); "
            "field layers must hold polygons or boxes"
        )
    invalid = present & ~shapely.is_valid(geoms)
    if invalid.any():
        fixed = shapely.make_valid(geoms[invalid], method="structure", keep_collapsed=False)
        geoms[invalid] = [_polygonal(g) for g in fixed]
    geoms[present] = [_polygonal(g) for g in geoms[present]]
    keep = present & ~shapely.is_empty(geoms) & (shapely.area(geoms) > 0)
    geoms, ids = geoms[keep], ids[keep]
    if boxes:
        geoms = shapely.envelope(geoms)
    return Layer(
        ids=ids, geoms=geoms, areas=shapely.area(geoms).astype(np.float64), source=source, source_crs=source_crs,
        n_repaired=int(invalid.sum()), n_dropped_empty=int(len(frame) - keep.sum()),
    )


def read_extent(path: str | RasterPath) -> tuple[GeoGrid, npt.NDArray[np.bool_]]:
    """The pixel grid of a GeoTIFF (local or remote) and its valid-pixel mask ``(H, W)`` (GDAL dataset mask > 0)."""
    path = raster_path(path)
    if isinstance(path, Path) and not path.exists():
        raise EvalError(f"{path}: no such extent raster; pass a GeoTIFF whose grid defines the pixels (--extent)")
    try:
        with rasterio.open(path) as ds:
            if ds.crs is None:
                raise EvalError(f"{path}: the extent raster has no CRS; pass a georeferenced GeoTIFF")
            grid = GeoGrid(ds.transform, ds.crs, ds.width, ds.height)
            valid = ds.dataset_mask() > 0
    except rasterio.errors.RasterioIOError as exc:
        raise EvalError(f"{path}: cannot read the extent raster ({exc}); pass a GeoTIFF") from exc
    return grid, valid


def rasterize_layer(geoms: GeomArray, crs: pyproj.CRS, grid: GeoGrid) -> npt.NDArray[np.bool_]:
    """``(H, W)`` bool: pixels of ``grid`` whose centre lies in one of ``geoms`` (given in ``crs``)."""
    if len(geoms) == 0:
        return np.zeros((grid.height, grid.width), dtype=bool)
    in_grid = gpd.GeoSeries(geoms, crs=crs).to_crs(grid.crs)
    burned = rasterio.features.rasterize(
        [(g, 1) for g in in_grid.values], out_shape=(grid.height, grid.width), transform=grid.transform, fill=0,
        dtype="uint8", all_touched=False,
    )
    return burned.astype(bool)


# ------------------------------------------------------------------------------------------ evaluation
@dataclass
class FieldEvaluation:
    """Scores of a field-boundary prediction layer against a truth layer (see the module docstring)."""

    precision: float
    recall: float
    f1: float
    map_50_95: float
    f1_50_95: float
    mean_iou: float
    iou_threshold: float
    tp: int
    fp: int
    fn: int
    n_truth: int
    n_pred: int
    thresholds: list[ThresholdScores]
    pixel: PixelScores | None
    metric_crs: str
    boxes: bool
    truth_source: str
    pred_source: str
    repaired: dict[str, int]
    dropped_empty: dict[str, int]
    notes: list[str]
    #: One row per true field (``kind="truth"``), then one per unmatched prediction (``kind="pred"``):
    #: ``kind, truth_id, pred_id, matched, iou, best_iou, truth_area_m2, pred_area_m2``.
    per_field: pd.DataFrame = field(repr=False)

    @property
    def pixel_iou(self) -> float:
        """Pixel IoU of the field class (NaN without an extent)."""
        return self.pixel.iou if self.pixel else math.nan

    def to_dict(self) -> dict[str, Any]:
        """The ``summary.json`` content: plain JSON values, NaN → ``None`` (undefined)."""
        pixel = self.pixel
        return json_safe({
            "precision": self.precision, "recall": self.recall, "f1": self.f1, "map_50_95": self.map_50_95,
            "mean_iou": self.mean_iou, "pixel_iou": self.pixel_iou,
            "pixel_precision": pixel.precision if pixel else math.nan,
            "pixel_recall": pixel.recall if pixel else math.nan,
            "f1_50_95": self.f1_50_95, "iou_threshold": self.iou_threshold,
            "tp": self.tp, "fp": self.fp, "fn": self.fn, "n_truth": self.n_truth, "n_pred": self.n_pred,
            "thresholds": [t.to_dict() for t in self.thresholds],
            "pixel": pixel.to_dict() if pixel else None,
            "metric_crs": self.metric_crs, "boxes": self.boxes,
            "truth": self.truth_source, "pred": self.pred_source,
            "repaired_invalid": self.repaired, "dropped_empty": self.dropped_empty, "notes": self.notes,
            "definitions": DEFINITIONS,
        })


#: Short definitions written into every summary.json, so the numbers explain themselves.
DEFINITIONS: dict[str, str] = {
    "match": "one-to-one Hungarian matching of (truth, pred) pairs with IoU > threshold, maximising the number "
    "of matches, then summed IoU",
    "precision": "TP / number of predictions at iou_threshold (null when there are no predictions)",
    "recall": "TP / number of true fields at iou_threshold (null when there is no truth)",
    "f1": "2TP / (2TP + FP + FN) at iou_threshold",
    "map_50_95": "mean over IoU thresholds 0.50:0.05:0.95 of TP/(TP+FP+FN) (Data Science Bowl 2018 AP, "
    "no confidence ranking; not COCO AP)",
    "f1_50_95": "mean over IoU thresholds 0.50:0.05:0.95 of F1",
    "mean_iou": "mean IoU of the pairs matched at iou_threshold",
    "pixel_iou": "IoU of the field class on the extent raster's valid pixels (pixel centre in polygon)",
}


def check_layers_meet(truth: Layer, pred: Layer) -> None:
    """Refuse layers that lie apart by more than their own size: a wrong CRS label, not a model's miss.

    Scoring them would give zeros that look like a model's result; both layers are in the metric CRS here.

    Raises:
        EvalError: naming both sources, their CRSs as read and the gap.

    """
    if not len(truth.geoms) or not len(pred.geoms):
        return
    t = shapely.total_bounds(truth.geoms)
    p = shapely.total_bounds(pred.geoms)
    gap = float(np.hypot(max(t[0] - p[2], p[0] - t[2], 0.0), max(t[1] - p[3], p[1] - t[3], 0.0)))
    size = max(float(np.hypot(t[2] - t[0], t[3] - t[1])), float(np.hypot(p[2] - p[0], p[3] - p[1])), 1.0)
    if gap > size:
        raise EvalError(
            f"{pred.source} ({pred.source_crs}) and {truth.source} ({truth.source_crs}) do not overlap: "
            f"{gap / 1000:.1f} km apart, more than either layer's extent; check that each file's CRS is the one "
            "its coordinates are in"
        )


def evaluate_fields(
    pred: str | Path | gpd.GeoDataFrame,
    truth: str | Path | gpd.GeoDataFrame,
    *,
    iou_threshold: float = 0.5,
    boxes: bool = False,
    extent: str | RasterPath | None = None,
    pred_id: str | None = None,
    truth_id: str | None = None,
    thresholds: Sequence[float] = THRESHOLDS,
) -> FieldEvaluation:
    """Score predicted field polygons (or boxes) against true ones; in-process or from files.

    Args:
        pred: prediction layer (path or GeoDataFrame), any CRS.
        truth: truth layer (path or GeoDataFrame), any CRS.
        iou_threshold: a match needs IoU strictly above this (FTW: 0.5).
        boxes: compare the bounding boxes (in the metric CRS) of both layers instead of the polygons.
        extent: a GeoTIFF whose grid defines the pixels of the pixel-level scores (None: no pixel scores).
        pred_id: id column of the predictions (default: ``field_id`` or ``id`` if present, else the row number).
        truth_id: id column of the truth (same default).
        thresholds: IoU thresholds averaged into ``map_50_95`` and ``f1_50_95``.

    Raises:
        EvalError: unreadable inputs (the message names the file and what to fix).

    """
    if not 0.0 <= iou_threshold < 1.0:
        raise EvalError(f"iou_threshold={iou_threshold}: must be in [0, 1)")
    truth_frame, truth_src = read_field_layer(truth, "truth")
    pred_frame, pred_src = read_field_layer(pred, "prediction")
    crs = metric_crs(truth_frame, pred_frame)
    t_layer = prepare_layer(truth_frame, truth_src, "truth", crs, truth_id, boxes)
    p_layer = prepare_layer(pred_frame, pred_src, "prediction", crs, pred_id, boxes)

    check_layers_meet(t_layer, p_layer)
    ti, pj, iou = pairwise_iou(t_layer.geoms, p_layer.geoms)
    n_t, n_p = len(t_layer.geoms), len(p_layer.geoms)
    per_t = _scores_per_threshold(ti, pj, iou, n_t, n_p, thresholds)
    mt, mp, miou = match_pairs(ti, pj, iou, iou_threshold)
    main = ThresholdScores(float(iou_threshold), len(mt), n_p - len(mt), n_t - len(mt))
    notes = _evaluation_notes(t_layer, p_layer)
    pixel = None if extent is None else _extent_pixel_scores(t_layer, p_layer, crs, extent)
    return FieldEvaluation(
        precision=main.precision, recall=main.recall, f1=main.f1,
        map_50_95=float(np.mean([s.ap for s in per_t])) if n_t + n_p else math.nan,
        f1_50_95=float(np.mean([s.f1 for s in per_t])) if n_t + n_p else math.nan,
        mean_iou=float(miou.mean()) if miou.size else math.nan,
        iou_threshold=float(iou_threshold), tp=main.tp, fp=main.fp, fn=main.fn, n_truth=n_t, n_pred=n_p,
        thresholds=per_t, pixel=pixel, metric_crs=crs.to_string(), boxes=boxes,
        truth_source=truth_src, pred_source=pred_src,
        repaired={"truth": t_layer.n_repaired, "pred": p_layer.n_repaired},
        dropped_empty={"truth": t_layer.n_dropped_empty, "pred": p_layer.n_dropped_empty},
        notes=notes, per_field=_per_field_table(t_layer, p_layer, ti, pj, iou, mt, mp, miou),
    )


def _scores_per_threshold(
    ti: IntArray, pj: IntArray, iou: FloatArray, n_t: int, n_p: int, thresholds: Sequence[float]
) -> list[ThresholdScores]:
    """TP/FP/FN at each IoU threshold, each with its own one-to-one matching."""
    per_t = []
    for t in thresholds:
        tp = len(match_pairs(ti, pj, iou, t)[0])
        per_t.append(ThresholdScores(float(t), tp, n_p - tp, n_t - tp))
    return per_t


def _evaluation_notes(t_layer: Layer, p_layer: Layer) -> list[str]:
    """What the reader of the scores should know: undefined scores, repaired and dropped geometries."""
    n_t, n_p = len(t_layer.geoms), len(p_layer.geoms)
    notes = []
    if n_p == 0:
        notes.append("no predictions: precision is undefined (null); recall and F1 are 0")
    if n_t == 0:
        notes.append("no true fields: recall is undefined (null)")
    for layer, role in ((t_layer, "truth"), (p_layer, "prediction")):
        if layer.n_repaired:
            notes.append(f"{layer.n_repaired} invalid {role} polygon(s) repaired with make_valid")
        if layer.n_dropped_empty:
            notes.append(f"{layer.n_dropped_empty} empty or null {role} geometries dropped")
    return notes


def _extent_pixel_scores(t_layer: Layer, p_layer: Layer, crs: pyproj.CRS, extent: str | RasterPath) -> PixelScores:
    """Both layers rasterised on the extent raster's grid, scored over its valid pixels."""
    grid, valid = read_extent(extent)
    return pixel_scores(
        rasterize_layer(t_layer.geoms, crs, grid), rasterize_layer(p_layer.geoms, crs, grid), valid, str(extent)
    )


def _per_field_table(
    t: Layer, p: Layer, ti: IntArray, pj: IntArray, iou: FloatArray, mt: IntArray, mp: IntArray, miou: FloatArray
) -> pd.DataFrame:
    n_t, n_p = len(t.geoms), len(p.geoms)
    best_t, best_p = np.zeros(n_t), np.zeros(n_p)
    np.maximum.at(best_t, ti, iou)
    np.maximum.at(best_p, pj, iou)
    match_of_t = np.full(n_t, -1)
    match_of_t[mt] = mp
    iou_of_t = np.full(n_t, np.nan)
    iou_of_t[mt] = miou
    matched = match_of_t >= 0
    pred_ids = np.where(matched, p.ids[np.clip(match_of_t, 0, None)] if n_p else "", "")
    pred_area = np.where(matched, p.areas[np.clip(match_of_t, 0, None)] if n_p else np.nan, np.nan)
    truth_rows = pd.DataFrame({
        "kind": "truth", "truth_id": t.ids, "pred_id": pred_ids, "matched": matched, "iou": iou_of_t,
        "best_iou": best_t, "truth_area_m2": t.areas, "pred_area_m2": pred_area,
    })
    unmatched_p = np.setdiff1d(np.arange(n_p), mp)
    pred_rows = pd.DataFrame({
        "kind": "pred", "truth_id": "", "pred_id": p.ids[unmatched_p], "matched": False, "iou": np.nan,
        "best_iou": best_p[unmatched_p], "truth_area_m2": np.nan, "pred_area_m2": p.areas[unmatched_p],
    })
    frames = [f for f in (truth_rows, pred_rows) if len(f)]
    if not frames:
        return truth_rows
    return pd.concat(frames, ignore_index=True)


# ------------------------------------------------------------------------------------------ report
def write_field_report(result: FieldEvaluation, out: str | Path, overwrite: bool = False) -> dict[str, Path]:
    """Write ``summary.json``, ``fields.csv`` (per field) and ``fields.png`` (scores vs IoU threshold) to ``out``.

    Returns:
        The written paths by name.

    """
    out = Path(out)
    check_outputs(out, FIELD_REPORT_FILES, overwrite)
    paths = {name: out / name for name in FIELD_REPORT_FILES}
    with atomic_path(paths["fields.csv"]) as tmp:
        result.per_field.to_csv(tmp, index=False, float_format="%.8g")
    _plot_thresholds(result, paths["fields.png"])
    write_json(paths["summary.json"], result.to_dict(), strict=True)
    return paths


def _plot_thresholds(result: FieldEvaluation, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ts = [s.threshold for s in result.thresholds]
    for name, label in (("precision", "precision"), ("recall", "recall"), ("f1", "F1"), ("ap", "TP/(TP+FP+FN)")):
        ax1.plot(ts, [getattr(s, name) for s in result.thresholds], marker="o", label=label)
    ax1.set(xlabel="IoU threshold (match: IoU > t)", ylabel="score", ylim=(0, 1.02),
            title=f"objects: {result.n_truth} true, {result.n_pred} predicted")
    ax1.legend()
    best = result.per_field.loc[result.per_field["kind"] == "truth", "best_iou"].to_numpy(dtype=float)
    ax2.hist(best, bins=np.linspace(0, 1, 21), color="tab:green", edgecolor="white")
    ax2.axvline(result.iou_threshold, color="k", ls="--", lw=1)
    ax2.set(xlabel="best IoU of each true field with any prediction", ylabel="true fields",
            title=f"F1@{result.iou_threshold:g} = {result.f1:.3f}, map_50_95 = {result.map_50_95:.3f}")
    fig.tight_layout()
    with atomic_path(target) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
