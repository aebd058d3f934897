"""Field-boundary evaluator: hand-made geometries whose scores are known exactly."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import shapely
from affine import Affine
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.crs import CRS
from rasters import write_raster
from shapely.geometry import Polygon, box

from agrivlm.errors import EvalError
from agrivlm.eval import evaluate_fields, match_pairs, pairwise_iou, pixel_scores, write_field_report

UTM = "EPSG:32633"
X0, Y0 = 500_000.0, 5_000_000.0  # on UTM 33N's central meridian (15°E, ~45°N)


def sq(x: float, y: float, size: float = 10.0) -> Polygon:
    return box(X0 + x, Y0 + y, X0 + x + size, Y0 + y + size)


def layer(geoms: list, crs: str = UTM, **cols: list) -> gpd.GeoDataFrame:
    return gpd.GeoDataFrame(dict(cols), geometry=gpd.GeoSeries(geoms, crs=UTM)).to_crs(crs)


# Four 10 m squares 50 m apart; predictions: sq0 exact, sq1 shifted 2 m (IoU 8/12), sq2 shifted 5 m (IoU 5/15),
# a near-duplicate of sq0 shifted 0.5 m (IoU 9.5/10.5: a false positive once sq0 is matched), nothing for sq3.
TRUTH = [sq(0, 0), sq(50, 0), sq(100, 0), sq(150, 0)]
PRED = [sq(0, 0), sq(52, 0), sq(105, 0), sq(0.5, 0)]


def test_two_unit_squares_offset_by_half_have_iou_one_third() -> None:
    a = np.array([box(0, 0, 1, 1)])
    b = np.array([box(0.5, 0, 1.5, 1)])
    ti, pj, iou = pairwise_iou(a, b)
    assert ti.tolist() == [0] and pj.tolist() == [0]
    assert iou[0] == pytest.approx(1 / 3, abs=1e-12)
    assert len(match_pairs(ti, pj, iou, 0.5)[0]) == 0
    assert len(match_pairs(ti, pj, iou, 0.3)[0]) == 1
    # touching squares do not overlap
    assert len(pairwise_iou(a, np.array([box(1, 0, 2, 1)]))[0]) == 0


def test_exact_scores_with_a_duplicate_and_a_miss() -> None:
    res = evaluate_fields(layer(PRED), layer(TRUTH))
    # 4 predictions (the duplicate is one of them): TP = 2 (sq0, sq1), FP = 2 (duplicate, sq2 shifted), FN = 2.
    assert (res.tp, res.fp, res.fn, res.n_truth, res.n_pred) == (2, 2, 2, 4, 4)
    assert res.precision == pytest.approx(2 / 4)
    assert res.recall == pytest.approx(2 / 4)
    assert res.f1 == pytest.approx(4 / (4 + 2 + 2))
    assert res.mean_iou == pytest.approx((1 + 8 / 12) / 2)
    # IoU 1 passes every threshold, IoU 2/3 passes 0.50, 0.55, 0.60, 0.65: TP = 2 four times, 1 six times.
    ap2, ap1 = 2 / (2 + 2 + 2), 1 / (1 + 3 + 3)
    assert res.map_50_95 == pytest.approx((4 * ap2 + 6 * ap1) / 10)
    f2, f1 = 4 / 8, 2 / (2 + 3 + 3)
    assert res.f1_50_95 == pytest.approx((4 * f2 + 6 * f1) / 10)
    assert [s.tp for s in res.thresholds] == [2, 2, 2, 2, 1, 1, 1, 1, 1, 1]
    rows = res.per_field.set_index(["kind", "pred_id"])
    truth_rows = res.per_field[res.per_field.kind == "truth"].set_index("truth_id")
    assert truth_rows.loc["0", "matched"] and truth_rows.loc["0", "iou"] == pytest.approx(1.0)
    assert truth_rows.loc["1", "pred_id"] == "1" and truth_rows.loc["1", "iou"] == pytest.approx(2 / 3)
    assert not truth_rows.loc["2", "matched"] and truth_rows.loc["2", "best_iou"] == pytest.approx(1 / 3)
    assert not truth_rows.loc["3", "matched"] and truth_rows.loc["3", "best_iou"] == 0.0
    assert truth_rows.loc["1", "truth_area_m2"] == pytest.approx(100.0)
    unmatched = res.per_field[res.per_field.kind == "pred"]
    assert sorted(unmatched.pred_id) == ["2", "3"] and len(rows) == 6
    assert unmatched.set_index("pred_id").loc["3", "best_iou"] == pytest.approx(9.5 / 10.5)  # the duplicate


def test_crs_mismatch_gives_the_same_scores() -> None:
    same = evaluate_fields(layer(PRED), layer(TRUTH)).to_dict()
    for pred_crs, truth_crs, metric in (("EPSG:4326", UTM, UTM), (UTM, "EPSG:4326", "EPSG:32633"),
                                        ("EPSG:3857", "EPSG:4326", "EPSG:32633")):
        other = evaluate_fields(layer(PRED, pred_crs), layer(TRUTH, truth_crs))
        assert other.metric_crs == metric
        d = other.to_dict()
        for key in ("precision", "recall", "f1", "map_50_95", "f1_50_95", "mean_iou", "tp", "fp", "fn"):
            assert d[key] == pytest.approx(same[key], abs=1e-7), (pred_crs, truth_crs, key)


def test_empty_predictions_and_empty_truth() -> None:
    res = evaluate_fields(layer([]), layer(TRUTH))
    assert math.isnan(res.precision) and res.recall == 0.0 and res.f1 == 0.0 and res.map_50_95 == 0.0
    assert math.isnan(res.mean_iou) and (res.tp, res.fp, res.fn) == (0, 0, 4)
    d = res.to_dict()
    assert d["precision"] is None and d["mean_iou"] is None and d["pixel_iou"] is None
    assert any("no predictions" in n for n in res.notes)
    res = evaluate_fields(layer(TRUTH), layer([]))
    assert res.precision == 0.0 and math.isnan(res.recall) and res.f1 == 0.0
    both = evaluate_fields(layer([]), layer([]))
    assert math.isnan(both.f1) and math.isnan(both.map_50_95) and len(both.per_field) == 0


def test_hungarian_beats_greedy_on_a_crafted_case() -> None:
    # Truths A=[0,10], B=[10,20]; p=[4,15] overlaps A (IoU 6/15) more than B (5/16); q=[-5,5] only A (5/15).
    truth = np.array([sq(0, 0), sq(10, 0)])
    pred = np.array([box(X0 + 4, Y0, X0 + 15, Y0 + 10), sq(-5, 0)])
    ti, pj, iou = pairwise_iou(truth, pred)
    assert dict(zip(zip(ti.tolist(), pj.tolist(), strict=True), iou.round(6).tolist(), strict=True)) == {
        (0, 0): round(6 / 15, 6), (0, 1): round(5 / 15, 6), (1, 0): round(5 / 16, 6)}
    # greedy by descending IoU (and FTW's first-found loop) pairs p with A, then q and B are left alone
    used_t, used_p, greedy = set(), set(), 0
    for k in np.argsort(-iou):
        if iou[k] > 0.3 and ti[k] not in used_t and pj[k] not in used_p:
            used_t.add(ti[k])
            used_p.add(pj[k])
            greedy += 1
    mt, mp, _ = match_pairs(ti, pj, iou, 0.3)
    assert greedy == 1
    assert sorted(zip(mt.tolist(), mp.tolist(), strict=True)) == [(0, 1), (1, 0)]
    res = evaluate_fields(layer(list(pred)), layer(list(truth)), iou_threshold=0.3)
    assert (res.tp, res.fp, res.fn) == (2, 0, 0)


def test_matching_prefers_more_matches_then_higher_iou_sum() -> None:
    mt, mp, mi = match_pairs(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]), np.array([0.9, 0.8, 0.8, 0.6]), 0.5)
    assert list(zip(mt.tolist(), mp.tolist(), strict=True)) == [(0, 1), (1, 0)] and mi.sum() == pytest.approx(1.6)
    mt, mp, _ = match_pairs(np.array([0, 0, 1]), np.array([0, 1, 0]), np.array([0.99, 0.6, 0.6]), 0.5)
    assert list(zip(mt.tolist(), mp.tolist(), strict=True)) == [(0, 1), (1, 0)]


def _brute_max_matching(n_t: int, n_p: int, cand: dict[tuple[int, int], float]) -> int:
    best = 0
    for perm in itertools.permutations(range(max(n_t, n_p)), n_t):
        best = max(best, sum((i, j) in cand for i, j in enumerate(perm)))
    return best


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.lists(st.floats(0.0, 1.0), min_size=16, max_size=16),
       st.floats(0.0, 0.9))
def test_matching_is_one_to_one_and_maximum(n_t: int, n_p: int, values: list[float], thr: float) -> None:
    ti, pj = (a.ravel() for a in np.meshgrid(np.arange(n_t), np.arange(n_p), indexing="ij"))
    iou = np.array(values[: n_t * n_p])
    mt, mp, mi = match_pairs(ti, pj, iou, thr)
    assert len(set(mt.tolist())) == len(mt) and len(set(mp.tolist())) == len(mp)
    assert np.all(mi > thr)
    cand = {(int(i), int(j)): float(v) for i, j, v in zip(ti, pj, iou, strict=True) if v > thr}
    assert all(cand[(int(i), int(j))] == v for i, j, v in zip(mt, mp, mi, strict=True))
    assert len(mt) == _brute_max_matching(n_t, n_p, cand)


def test_invalid_polygons_are_repaired_and_counted_and_boxes_compare_envelopes() -> None:
    bowtie = Polygon([(X0, Y0), (X0 + 10, Y0 + 10), (X0 + 10, Y0), (X0, Y0 + 10)])
    res = evaluate_fields(layer([bowtie]), layer([sq(0, 0)]))
    assert res.repaired == {"truth": 0, "pred": 1} and any("repaired" in n for n in res.notes)
    assert res.per_field.iloc[0]["best_iou"] == pytest.approx(0.5)  # two triangles of 25 m² each in 100 m²
    lower = Polygon([(X0, Y0), (X0 + 10, Y0), (X0, Y0 + 10)])
    upper = Polygon([(X0 + 10, Y0 + 10), (X0 + 10, Y0), (X0, Y0 + 10)])
    assert evaluate_fields(layer([upper]), layer([lower])).tp == 0
    boxed = evaluate_fields(layer([upper]), layer([lower]), boxes=True)
    assert boxed.tp == 1 and boxed.mean_iou == pytest.approx(1.0) and boxed.boxes
    with_empty = evaluate_fields(layer([sq(0, 0), Polygon(), None]), layer([sq(0, 0)]))
    assert with_empty.dropped_empty == {"truth": 0, "pred": 2} and with_empty.precision == 1.0


def test_pixel_scores_on_a_raster_grid_ignore_nodata(tmp_path: Path) -> None:
    assert pixel_scores(np.array([1, 1, 0, 0]), np.array([0, 1, 1, 0])).iou == pytest.approx(1 / 3)
    data = np.ones((1, 10, 10), dtype="float32")
    data[0, :, 0] = -9999.0  # column 0 is nodata: not scored
    extent = write_raster(tmp_path / "grid.tif", data, transform=Affine(1, 0, X0, 0, -1, Y0 + 10),
                          crs=CRS.from_string(UTM))
    truth = [box(X0, Y0, X0 + 5, Y0 + 10)]  # columns 0-4: 40 valid pixels
    pred = [box(X0 + 3, Y0, X0 + 8, Y0 + 10)]  # columns 3-7: 50 pixels, 20 shared
    res = evaluate_fields(layer(pred, "EPSG:4326"), layer(truth), extent=extent)
    assert res.pixel is not None
    assert (res.pixel.n_valid, res.pixel.n_truth, res.pixel.n_pred, res.pixel.n_both) == (90, 40, 50, 20)
    assert res.pixel_iou == pytest.approx(20 / 70)
    assert res.pixel.precision == pytest.approx(20 / 50) and res.pixel.recall == pytest.approx(20 / 40)


@pytest.mark.filterwarnings("ignore:'crs' was not provided")
def test_bad_inputs_name_the_file(tmp_path: Path) -> None:
    good = tmp_path / "good.gpkg"
    layer(TRUTH).to_file(good)
    with pytest.raises(EvalError, match=r"missing\.gpkg: no such prediction layer file"):
        evaluate_fields(tmp_path / "missing.gpkg", good)
    nocrs = tmp_path / "nocrs.gpkg"
    gpd.GeoDataFrame(geometry=[sq(0, 0)]).to_file(nocrs)
    with pytest.raises(EvalError, match=r"nocrs\.gpkg: the truth layer has no CRS"):
        evaluate_fields(good, nocrs)
    lonlat = tmp_path / "utm_as_lonlat.geojson"  # GeoJSON is lon/lat by definition: UTM numbers are nonsense
    gpd.GeoDataFrame(geometry=[sq(0, 0)]).to_file(lonlat)
    with pytest.raises(EvalError, match="no UTM zone fits the layer's bounds"):
        evaluate_fields(good, lonlat)
    points = tmp_path / "points.gpkg"
    gpd.GeoDataFrame(geometry=gpd.GeoSeries([shapely.Point(X0, Y0)], crs=UTM)).to_file(points)
    with pytest.raises(EvalError, match=r"points\.gpkg: 1 prediction feature\(s\) are not polygons \(Point\)"):
        evaluate_fields(points, good)
    with pytest.raises(EvalError, match=r"good\.gpkg: no column 'fid_x' for field ids \(--truth-id\)"):
        evaluate_fields(good, good, truth_id="fid_x")
    with pytest.raises(EvalError, match=r"nope\.tif: no such extent raster"):
        evaluate_fields(good, good, extent=tmp_path / "nope.tif")


def test_report_files_and_refusal_to_overwrite(tmp_path: Path) -> None:
    res = evaluate_fields(layer(PRED, field_id=["a", "b", "c", "d"]), layer(TRUTH))
    paths = write_field_report(res, tmp_path / "r")
    summary = json.loads(paths["summary.json"].read_text())
    assert {"precision", "recall", "f1", "map_50_95", "mean_iou", "pixel_iou"} <= set(summary)
    assert summary["pixel_iou"] is None and summary["tp"] == 2
    assert "Data Science Bowl" in summary["definitions"]["map_50_95"]
    csv = paths["fields.csv"].read_text().splitlines()
    assert csv[0] == "kind,truth_id,pred_id,matched,iou,best_iou,truth_area_m2,pred_area_m2" and len(csv) == 7
    assert csv[1] == "truth,0,a,True,1,1,100,100"
    assert paths["fields.png"].read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(EvalError, match="already exists; pass --overwrite"):
        write_field_report(res, tmp_path / "r")
    write_field_report(res, tmp_path / "r", overwrite=True)
