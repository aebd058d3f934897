"""Non-maximum suppression of polygons in map units: one detection per field across overlapping chips.

Neighbouring chips overlap (stride < chip size), so a field is usually detected in several of them. The
detections are polygons in one CRS (the stack's); :func:`nms` keeps, greedily in rank order, every polygon
whose IoU with each polygon kept before it is at most the threshold. IoU is area-based, so it is the same in
any projected CRS up to the projection's scale distortion (negligible within a stack).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import shapely

IntArray = npt.NDArray[np.int64]


def overlapping_iou(geoms: npt.ArrayLike) -> tuple[IntArray, IntArray, npt.NDArray[np.float64]]:
    """IoU of every pair ``i < j`` of polygons whose interiors overlap.

    Args:
        geoms: ``(N,)`` shapely polygons in one CRS.

    Returns:
        ``(i, j, iou)``, each ``(K,)``, for the K pairs with a positive intersection area.

    """
    g = np.asarray(geoms, dtype=object)
    if g.size < 2:
        empty = np.zeros(0, np.int64)
        return empty, empty.copy(), np.zeros(0, np.float64)
    a, b = shapely.STRtree(g).query(g, predicate="intersects")
    keep = a < b
    a, b = a[keep].astype(np.int64), b[keep].astype(np.int64)
    inter = shapely.area(shapely.intersection(g[a], g[b]))
    areas = shapely.area(g)
    union = areas[a] + areas[b] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    pos = inter > 0
    return a[pos], b[pos], np.clip(iou[pos], 0.0, 1.0)


def nms(
    geoms: npt.ArrayLike,
    scores: npt.ArrayLike,
    iou_threshold: float = 0.5,
    priority: npt.ArrayLike | None = None,
) -> IntArray:
    """Greedy non-maximum suppression of polygons.

    Polygons are ranked by ``priority`` (higher first), then ``score`` (higher first; NaN lowest), then
    input order. Walking the ranking, a polygon is kept unless its IoU with an already kept polygon is
    strictly greater than ``iou_threshold`` (the evaluators' "IoU > t" convention). So the kept polygons
    overlap each other by at most the threshold, and every dropped one overlaps a better-ranked kept one by
    more.

    Args:
        geoms: ``(N,)`` shapely polygons in one CRS (map units).
        scores: ``(N,)`` confidence of each polygon.
        iou_threshold: in ``[0, 1]``; 1 keeps everything.
        priority: ``(N,)`` integer rank classes applied before the score (e.g. 1 for a field the chip shows
            whole, 0 for one its edge cuts); None: all equal.

    Returns:
        Indices of the kept polygons, ascending.

    """
    g = np.asarray(geoms, dtype=object)
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != g.shape:
        raise ValueError(f"{s.size} scores for {g.size} polygons")
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
    p = np.zeros(g.size, np.int64) if priority is None else np.asarray(priority, dtype=np.int64)
    ranked_scores = np.where(np.isnan(s), -np.inf, s)
    order = np.lexsort((np.arange(g.size), -ranked_scores, -p))
    i, j, iou = overlapping_iou(g)
    over = iou > iou_threshold
    neighbours: list[list[int]] = [[] for _ in range(g.size)]
    for a, b in zip(i[over].tolist(), j[over].tolist(), strict=True):
        neighbours[a].append(b)
        neighbours[b].append(a)
    suppressed = np.zeros(g.size, dtype=bool)
    kept = []
    for k in order.tolist():
        if suppressed[k]:
            continue
        kept.append(k)
        suppressed[neighbours[k]] = True
    return np.sort(np.asarray(kept, dtype=np.int64))
