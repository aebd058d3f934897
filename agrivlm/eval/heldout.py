"""Scoring on land a model never saw, chip by chip, beside simple baselines.

The fields task asks a model about one chip at a time, so it is scored as asked: every chip of a grid is
an independent test item whose truth is the parcels **clipped to that chip** (slivers under
``min_area_px`` pixels dropped, as the recipes drop them), and whose prediction is what the model
answered for that chip, clipped to it. TP/FP/FN add up over the chips (:func:`evaluate_chipwise`, through
:func:`agrivlm.eval.boundaries.evaluate_fields` with FTW's definitions). Chips never share a truth
object, so a prediction can only match the truth of its own chip.

Baselines, scored the same way:

* :func:`whole_chip_baseline` — each chip answered as one field (what an untrained model tends to say);
* the model itself on :func:`constant_stack` — the stack with every valid pixel set to one value: what it
  answers from the prompt alone (a typical field around a point prompt). A model that found fields in the
  pixels beats it; one that learned only the shape of an average answer does not;
* :func:`segmentation_baseline` — unsupervised: Felzenszwalb's graph segmentation (scikit-image) of each
  chip's per-pixel temporal NDVI features (clear-sky medians over ``n_periods`` periods of the season),
  segments of at least ``min_area_px`` pixels vectorised to polygons;
* :func:`stage_climatology` / :func:`predict_climatology` — growth stages: the most frequent training stage
  per class and ``bin_days``-day bin of the day of year.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import numpy.typing as npt
import pandas as pd
import shapely
from rasterio.features import shapes
from rasterio.windows import Window

from agrivlm.errors import EvalError
from agrivlm.eval.boundaries import FieldEvaluation, evaluate_fields
from agrivlm.geo.chips import chip_id, chip_windows
from agrivlm.geo.rasters import RasterPath
from agrivlm.geo.stack import Stack


def chip_grid(stack: Stack, chip_size: int, stride: int | None = None) -> gpd.GeoDataFrame:
    """Footprints of a stack's chip grid: ``chip_id`` (as ``agrivlm infer`` names chips), window, geometry."""
    _, _, h, w = stack.shape
    rows = []
    for win in chip_windows(h, w, chip_size, stride):
        left, top = stack.transform * (win.col_off, win.row_off)
        right, bottom = stack.transform * (win.col_off + win.width, win.row_off + win.height)
        rows.append({"chip_id": chip_id(win), "row_off": int(win.row_off), "col_off": int(win.col_off),
                     "size": int(win.width), "geometry": shapely.box(left, bottom, right, top)})
    return gpd.GeoDataFrame(rows, geometry="geometry", crs=stack.crs)


def clip_to_chips(layer: gpd.GeoDataFrame, chips: gpd.GeoDataFrame, id_column: str, min_area_m2: float = 0.0,
                  by_chip: bool = False) -> gpd.GeoDataFrame:
    """Each object clipped to each chip it overlaps (``by_chip``: only to the chip named in its ``chip_id``).

    Returns ``chip_id``, ``object_id`` = ``<chip_id>:<id>``, geometry; pieces under ``min_area_m2`` dropped.
    """
    layer = layer.to_crs(chips.crs)
    rows = []
    tree = shapely.STRtree(layer.geometry.values)
    for chip in chips.itertuples(index=False):
        if by_chip:
            idx = np.flatnonzero((layer["chip_id"] == chip.chip_id).to_numpy())
        else:
            idx = tree.query(chip.geometry, predicate="intersects")
        for i in idx:
            piece = shapely.make_valid(layer.geometry.iloc[i]).intersection(chip.geometry)
            piece = _polygons(piece)
            if piece is None or piece.area < max(min_area_m2, 1e-6):
                continue
            rows.append({"chip_id": chip.chip_id, "object_id": f"{chip.chip_id}:{layer[id_column].iloc[i]}",
                         "geometry": piece})
    return gpd.GeoDataFrame(rows, columns=["chip_id", "object_id", "geometry"], geometry="geometry", crs=chips.crs)


def _polygons(geom: Any) -> Any:
    """The polygonal part of a geometry (a MultiPolygon of its polygons), or None."""
    if geom.is_empty:
        return None
    if geom.geom_type in ("Polygon", "MultiPolygon"):
        return geom
    parts = [g for g in getattr(geom, "geoms", []) if g.geom_type in ("Polygon", "MultiPolygon")]
    return shapely.union_all(parts) if parts else None


def evaluate_chipwise(pred: gpd.GeoDataFrame, truth: gpd.GeoDataFrame, chips: gpd.GeoDataFrame,
                      truth_id: str = "field_id", min_area_px: float = 4.0, pixel_m: float = 10.0,
                      pred_by_chip: bool = True, extent: str | RasterPath | None = None,
                      boxes: bool = False) -> FieldEvaluation:
    """Object scores summed over chips: truth clipped per chip vs each chip's own predictions clipped to it.

    Args:
        pred: predictions with a ``chip_id`` column (``agrivlm infer`` output) unless ``pred_by_chip`` is False.
        truth: true field polygons.
        truth_id: their id column.
        chips: :func:`chip_grid` of the chips that were asked.
        min_area_px: truth pieces under this many pixels are slivers, left out (the recipes' ``min_area_px``).
        pixel_m: pixel size in metres (for ``min_area_px``).
        pred_by_chip: each prediction belongs to the chip of its ``chip_id`` (False: to every chip it overlaps).
        extent: a GeoTIFF of the scene's grid, for the pixel-level scores (pixels outside the chips are
            no field in both layers, so they only add true negatives).
        boxes: score the bounding boxes of both (a model trained to answer boxes; ``evaluate_fields(boxes=)``).

    """
    if pred_by_chip and "chip_id" not in pred.columns:
        raise EvalError("predictions have no chip_id column; pass agrivlm infer's output")
    t = clip_to_chips(truth, chips, truth_id, min_area_m2=min_area_px * pixel_m**2)
    p = clip_to_chips(pred.assign(_pid=np.arange(len(pred))), chips, "_pid", by_chip=pred_by_chip)
    empty_pred = gpd.GeoDataFrame({"object_id": [], "geometry": []}, geometry="geometry", crs=chips.crs)
    return evaluate_fields(p if len(p) else empty_pred, t, pred_id="object_id", truth_id="object_id", extent=extent,
                           boxes=boxes)


def whole_chip_baseline(chips: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """Each chip answered as one field covering it."""
    return chips[["chip_id", "geometry"]].copy()


def constant_stack(stack_dir: str | Path, out: str | Path) -> Path:
    """A copy of a folder of GeoTIFFs (one per date) with every valid pixel set to their median.

    Same grid, dates, tags, nodata and file names: the model sees the same chips and dates with nothing
    in them. Used as a control: the model's score on it is what it answers without looking.
    """
    import rasterio

    src_dir, dst = Path(stack_dir), Path(out)
    files = sorted(src_dir.glob("*.tif"))
    if not files:
        raise EvalError(f"{src_dir}: no .tif files to copy")
    dst.mkdir(parents=True, exist_ok=True)

    def valid(data: npt.NDArray[Any], nodata: float | None) -> npt.NDArray[np.bool_]:
        return np.isfinite(data) & (data != nodata) if nodata is not None else np.isfinite(data)

    values = []
    for f in files:  # first pass: the median of every valid value of every date
        with rasterio.open(f) as src:
            data = src.read()
            values.append(data[valid(data, src.nodata)])
    median = float(np.median(np.concatenate(values)))
    for f in files:
        with rasterio.open(f) as src:
            profile, data, tags, desc = src.profile, src.read(), src.tags(), src.descriptions
        data[valid(data, src.nodata)] = median
        with rasterio.open(dst / f.name, "w", **profile) as out_file:
            out_file.write(data)
            out_file.update_tags(**tags)
            out_file.descriptions = desc
    return dst


def temporal_features(stack: Stack, window: Window, n_periods: int = 6) -> npt.NDArray[np.float32]:
    """``(n_periods, h, w)`` clear-sky median of the first band in equal-time periods; NaN-free (filled)."""
    data, _nodata, clouds = stack.read_window(window)
    values = data[:, 0].astype(np.float32)
    if clouds is not None:
        values = np.where(clouds, np.nan, values)
    days = (stack.times - stack.times[0]).astype("timedelta64[D]").astype(np.int64)
    edges = np.linspace(days.min(), days.max() + 1, n_periods + 1)
    feats = []
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        sel = (days >= a) & (days < b)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-cloud pixels: NaN, filled below
            f = np.nanmedian(values[sel], axis=0) if sel.any() else np.full(values.shape[1:], np.nan)
        feats.append(f)
    out = np.stack(feats).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a period with no clear pixel at all: filled with 0
        fill = np.nanmean(out, axis=(1, 2), keepdims=True)
    out = np.where(np.isfinite(out), out, np.nan_to_num(fill, nan=0.0))
    return out


def segmentation_baseline(stack: Stack, chips: gpd.GeoDataFrame, n_periods: int = 6, scale: float = 2.0,
                          sigma: float = 0.5, min_area_px: int = 9) -> gpd.GeoDataFrame:
    """Felzenszwalb segments of each chip's temporal NDVI features, vectorised (see the module docstring).

    Raises:
        EvalError: scikit-image is not installed (``pip install scikit-image``; it is in the ``bench`` extra).

    """
    try:
        from skimage.segmentation import felzenszwalb
    except ImportError as exc:
        raise EvalError("the segmentation baseline needs scikit-image: pip install -e '.[bench]'") from exc
    rows = []
    stack.open()
    for chip in chips.itertuples(index=False):
        win = Window(chip.col_off, chip.row_off, chip.size, chip.size)
        feats = temporal_features(stack, win, n_periods)
        img = np.moveaxis(feats, 0, -1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "image with third dimension of 6": intended
            labels = felzenszwalb(img, scale=scale, sigma=sigma, min_size=min_area_px, channel_axis=-1)
        transform = stack.transform * stack.transform.translation(chip.col_off, chip.row_off)
        for geom, value in shapes(labels.astype(np.int32), transform=transform):
            poly = shapely.geometry.shape(geom)
            if poly.area >= min_area_px * abs(stack.transform.a * stack.transform.e):
                rows.append({"chip_id": chip.chip_id, "segment": int(value), "geometry": poly})
    return gpd.GeoDataFrame(rows, columns=["chip_id", "segment", "geometry"], geometry="geometry", crs=stack.crs)


def stage_climatology(tables: Iterable[pd.DataFrame], classes: dict[str, str] | None = None,
                      bin_days: int = 10) -> pd.DataFrame:
    """The most frequent stage per (class, day-of-year bin) over training stage tables.

    Args:
        tables: stage tables (``field_id, date, stage``), optionally with a ``class`` column.
        classes: ``{field_id: class}`` where the tables have no class column (else all ``"any"``).
        bin_days: width of the day-of-year bins.

    Returns ``class, bin, stage`` rows, plus class ``"any"`` over all classes.
    """
    frames = []
    for t in tables:
        t = t.copy()
        if "class" not in t.columns:
            t["class"] = t["field_id"].map(classes or {}).fillna("any") if classes else "any"
        frames.append(t[["field_id", "date", "stage", "class"]])
    if not frames:
        raise EvalError("no training stage table for the climatology")
    all_rows = pd.concat(frames, ignore_index=True)
    all_rows["bin"] = (pd.to_datetime(all_rows["date"]).dt.day_of_year - 1) // bin_days
    both = pd.concat([all_rows, all_rows.assign(**{"class": "any"})], ignore_index=True)
    mode = both.groupby(["class", "bin"])["stage"].agg(lambda s: s.value_counts().index[0]).reset_index()
    return mode


def predict_climatology(pairs: pd.DataFrame, climatology: pd.DataFrame, bin_days: int = 10,
                        classes: dict[str, str] | None = None) -> pd.DataFrame:
    """Stages of ``pairs`` (``field_id, date``) by the climatology of their class (``"any"`` where unknown)."""
    out = pairs[["field_id", "date"]].copy()
    out["class"] = out["field_id"].map(classes or {}).fillna("any") if classes else "any"
    out["bin"] = (pd.to_datetime(out["date"]).dt.day_of_year - 1) // bin_days
    table = {(c, b): s for c, b, s in climatology[["class", "bin", "stage"]].itertuples(index=False)}
    out["stage"] = [table.get((c, b), table.get(("any", b), "dormant"))
                    for c, b in zip(out["class"], out["bin"], strict=True)]
    return out[["field_id", "date", "stage"]]


def read_stage_tables(paths: Sequence[str | Path]) -> list[pd.DataFrame]:
    """Stage CSVs (``field_id, date, stage``) as string frames."""
    return [pd.read_csv(p, dtype=str, keep_default_na=False) for p in paths]
