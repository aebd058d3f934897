"""Growth-stage evaluator: a tiny hand table whose scores are worked out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shapely.geometry import Point

from agrivlm.errors import EvalError
from agrivlm.eval import date_cells, evaluate_growth, evaluate_key_dates, evaluate_stages, interval_iou
from agrivlm.eval.growth import write_growth_report
from agrivlm.schema import GROWTH_STAGES

# Field A: 5 dates 10 days apart (days 0..40). Field B: days 0, 20, 30 in truth; its prediction misses day 30
# and adds 2021-06-01 (day 61), which is not in the truth.
TRUTH = pd.DataFrame({
    "field_id": ["A"] * 5 + ["B"] * 3,
    "date": ["2021-04-01", "2021-04-11", "2021-04-21", "2021-05-01", "2021-05-11", "2021-04-01", "2021-04-21",
             "2021-05-01"],
    "stage": ["dormant", "green-up", "green-up", "peak", "peak", "green-up", "peak", "senescence"],
})
PRED = pd.DataFrame({
    "field_id": ["A"] * 5 + ["B"] * 3,
    "date": ["2021-04-01", "2021-04-11", "2021-04-21", "2021-05-01", "2021-05-11", "2021-04-01", "2021-04-21",
             "2021-06-01"],
    "stage": ["dormant", "Dormant", "green-up", "peak", "senescence", "green-up", "peak", "harvested"],
})


def test_stage_accuracy_macro_f1_and_confusion_by_hand() -> None:
    s = evaluate_stages(PRED, TRUTH)
    assert (s.n_pairs, s.n_correct, s.n_missing, s.n_extra) == (8, 5, 1, 1)
    assert s.accuracy == pytest.approx(5 / 8)
    # dormant: TP1 FP1 FN0; green-up: TP2 FP0 FN1; peak: TP2 FP0 FN1; senescence: TP0 FP1 FN1 (missing);
    # harvested: only predicted on a date the truth lacks, so no support.
    assert s.f1_per_stage == pytest.approx({"dormant": 2 / 3, "green-up": 4 / 5, "peak": 4 / 5, "senescence": 0.0})
    assert s.macro_f1 == pytest.approx(17 / 30)
    expected = np.zeros((5, 6), dtype=int)
    d, g, p, se, m = 0, 1, 2, 3, 5
    expected[d, d], expected[g, d], expected[g, g], expected[p, p], expected[p, se], expected[se, m] = 1, 1, 2, 2, 1, 1
    np.testing.assert_array_equal(s.confusion, expected)
    per_field = s.per_field.set_index("field_id")
    assert per_field.loc["A", "accuracy"] == pytest.approx(3 / 5) and per_field.loc["B", "n_missing"] == 1


def test_temporal_iou_by_hand() -> None:
    s = evaluate_stages(PRED, TRUTH)
    # A, cells [-5,5] [5,15] [15,25] [25,35] [35,45]: dormant 10/20, green-up 10/20, peak 10/20, senescence 0.
    # B, truth cells [-10,10] [10,25] [25,35]; pred cells (days 0, 20, 61) [-10,10] [10,40.5] [40.5,81.5]:
    # green-up 1, peak 15/30.5, senescence 0, harvested 0.
    field_a, field_b = [0.5, 0.5, 0.5, 0.0], [1.0, 15 / 30.5, 0.0, 0.0]
    assert s.temporal_iou == pytest.approx(np.mean(field_a + field_b))
    assert s.temporal_iou_per_stage == pytest.approx(
        {"dormant": 0.5, "green-up": 0.75, "peak": (0.5 + 15 / 30.5) / 2, "senescence": 0.0, "harvested": 0.0})
    per_field = s.per_field.set_index("field_id")
    assert per_field.loc["A", "temporal_iou"] == pytest.approx(0.375)
    assert per_field.loc["B", "temporal_iou"] == pytest.approx(np.mean(field_b))
    perfect = evaluate_stages(TRUTH.assign(date=TRUTH.date + "T10:30:00"), TRUTH)  # times are dropped: same day
    assert perfect.accuracy == perfect.macro_f1 == perfect.temporal_iou == 1.0


def test_date_cells_and_interval_iou() -> None:
    np.testing.assert_allclose(date_cells([0, 10, 30]), [[-5, 5], [5, 20], [20, 40]])
    np.testing.assert_allclose(date_cells([7]), [[6.5, 7.5]])
    assert interval_iou([[0, 10]], [[5, 15]]) == pytest.approx(5 / 15)
    assert interval_iou([[0, 2], [4, 6]], [[1, 5]]) == pytest.approx(2 / 6)
    assert np.isnan(interval_iou(np.zeros((0, 2)), np.zeros((0, 2))))


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 400), min_size=1, max_size=12, unique=True),
       st.lists(st.tuples(st.floats(-50, 450), st.floats(0, 60)), min_size=0, max_size=4),
       st.lists(st.tuples(st.floats(-50, 450), st.floats(0, 60)), min_size=0, max_size=4))
def test_cells_tile_the_axis_and_iou_is_bounded_and_symmetric(days: list[int], a: list, b: list) -> None:
    cells = date_cells(sorted(days))
    assert np.all(cells[:, 1] > cells[:, 0])
    np.testing.assert_allclose(cells[1:, 0], cells[:-1, 1])  # no gaps, no overlaps
    ia = np.array([[s, s + w] for s, w in a]).reshape(-1, 2)
    ib = np.array([[s, s + w] for s, w in b]).reshape(-1, 2)
    iou = interval_iou(ia, ib)
    if not np.isnan(iou):
        assert 0.0 <= iou <= 1.0 + 1e-12
        assert iou == pytest.approx(interval_iou(ib, ia))
    if (ia[:, 1] - ia[:, 0]).sum() > 0:
        assert interval_iou(ia, ia) == pytest.approx(1.0)


KEY_TRUTH = pd.DataFrame({
    "field_id": ["A", "B", "C"], "season": ["2021"] * 3,
    "green_up": ["2021-04-11", "2021-04-01", "2021-04-05"], "peak": ["2021-05-01", "2021-04-21", ""],
    "senescence": ["", "2021-05-01", ""],
})
KEY_PRED = pd.DataFrame({
    "field_id": ["A", "B", "D"], "season": ["2021"] * 3,
    "green_up": ["2021-04-21", "2021-03-30", "2021-04-01"], "peak": ["2021-04-28", "", ""],
    "senescence": ["2021-06-01", "2021-05-11", ""],
})


def test_key_date_errors_by_hand() -> None:
    k = evaluate_key_dates(KEY_PRED, KEY_TRUTH).per_key
    assert k["green_up"] == pytest.approx({"n_truth": 3, "n_compared": 2, "n_missing": 1, "n_extra": 1,
                                           "mean_abs_days": 6.0, "median_abs_days": 6.0, "max_abs_days": 10.0})
    assert k["peak"] == pytest.approx({"n_truth": 2, "n_compared": 1, "n_missing": 1, "n_extra": 0,
                                       "mean_abs_days": 3.0, "median_abs_days": 3.0, "max_abs_days": 3.0})
    assert k["senescence"] == pytest.approx({"n_truth": 1, "n_compared": 1, "n_missing": 0, "n_extra": 1,
                                             "mean_abs_days": 10.0, "median_abs_days": 10.0, "max_abs_days": 10.0})


def test_files_in_three_formats_and_the_report(tmp_path: Path) -> None:
    TRUTH.to_csv(tmp_path / "truth.csv", index=False)
    pred = gpd.GeoDataFrame(PRED, geometry=[Point(0, 0)] * len(PRED), crs="EPSG:4326")  # geometry is ignored
    pred.to_file(tmp_path / "pred.gpkg")
    pred.to_file(tmp_path / "pred.geojson")
    KEY_TRUTH.to_csv(tmp_path / "kt.csv", index=False)
    KEY_PRED.to_csv(tmp_path / "kp.csv", index=False)
    for name in ("pred.gpkg", "pred.geojson"):
        res = evaluate_growth(tmp_path / name, tmp_path / "truth.csv", pred_key_dates=tmp_path / "kp.csv",
                              truth_key_dates=tmp_path / "kt.csv")
        assert res.stages is not None and res.stages.accuracy == pytest.approx(5 / 8)
    paths = write_growth_report(res, tmp_path / "r")
    summary = json.loads(paths["summary.json"].read_text())
    assert summary["accuracy"] == pytest.approx(5 / 8) and summary["macro_f1"] == pytest.approx(17 / 30)
    assert summary["confusion"]["rows_truth"] == list(GROWTH_STAGES)
    assert summary["key_dates"]["green_up"]["mean_abs_days"] == 6.0
    assert any("1 truth (field, date) pair(s) have no prediction" in n for n in summary["notes"])
    assert paths["confusion_matrix.png"].read_bytes()[:4] == b"\x89PNG"
    assert "green_up_abs_days" in paths["key_dates.csv"].read_text().splitlines()[0]
    with pytest.raises(EvalError, match="already exists; pass --overwrite"):
        write_growth_report(res, tmp_path / "r")


def test_bad_tables_name_the_file_and_the_fix(tmp_path: Path) -> None:
    bad = TRUTH.assign(stage=["dormant", "greenup", "peak", "peak", "peak", "ripe", "peak", "peak"])
    bad.to_csv(tmp_path / "words.csv", index=False)
    with pytest.raises(EvalError, match=r"words\.csv: unknown stage word\(s\) \['greenup', 'ripe'\] \(rows \[2, 6\]\)"):
        evaluate_stages(PRED, tmp_path / "words.csv")
    TRUTH.drop(columns="date").to_csv(tmp_path / "cols.csv", index=False)
    with pytest.raises(EvalError, match=r"cols\.csv: the truth table lacks column\(s\) \['date'\]"):
        evaluate_stages(PRED, tmp_path / "cols.csv")
    with pytest.raises(EvalError, match=r"nope\.csv: no such prediction file"):
        evaluate_stages(tmp_path / "nope.csv", TRUTH)
    TRUTH.assign(date=["2021-13-01"] + list(TRUTH.date[1:])).to_csv(tmp_path / "date.csv", index=False)
    with pytest.raises(EvalError, match=r"date\.csv: row 1: date='2021-13-01' is not an ISO date"):
        evaluate_stages(PRED, tmp_path / "date.csv")
    clash = pd.concat([TRUTH, TRUTH.iloc[[0]].assign(stage="peak")])
    with pytest.raises(EvalError, match="field 'A' has several stages on 2021-04-01"):
        evaluate_stages(PRED, clash)
    with pytest.raises(EvalError, match="needs both --pred and --truth"):
        evaluate_growth(PRED, None)


def test_empty_predictions_score_zero_and_are_counted_missing() -> None:
    s = evaluate_stages(PRED.iloc[:0], TRUTH)
    assert (s.accuracy, s.macro_f1, s.temporal_iou, s.n_missing, s.n_extra) == (0.0, 0.0, 0.0, 8, 0)
    assert evaluate_growth(PRED.iloc[:0], TRUTH).notes == [
        "8 truth (field, date) pair(s) have no prediction and count as wrong"]
    k = evaluate_key_dates(KEY_PRED.iloc[:0], KEY_TRUTH).per_key["green_up"]
    assert (k["n_compared"], k["n_missing"]) == (0, 3) and np.isnan(k["mean_abs_days"])


def test_key_dates_read_off_a_stage_table() -> None:
    import pandas as pd

    from agrivlm.eval import key_dates_from_stages

    rows = [("a", "2016-01-10", "dormant"), ("a", "2016-03-01", "green-up"), ("a", "2016-03-20", "green-up"),
            ("a", "2016-06-01", "peak"), ("a", "2016-09-01", "senescence"), ("a", "2017-02-01", "dormant"),
            ("a", "2017-04-01", "green-up"), ("b", "2016-05-05", "peak")]
    table = pd.DataFrame(rows, columns=["field_id", "date", "stage"])
    got = key_dates_from_stages(table)
    assert got.to_dict("records") == [
        {"field_id": "a", "season": "2016", "green_up": "2016-03-01", "peak": "2016-06-01", "senescence": "2016-09-01"},
        {"field_id": "a", "season": "2017", "green_up": "2017-04-01", "peak": "", "senescence": ""},
        {"field_id": "b", "season": "2016", "green_up": "", "peak": "2016-05-05", "senescence": ""},
    ]
    # a season starting on 10-01 puts 2016-01-10 and 2016-03-01 into the season of 2015
    shifted = key_dates_from_stages(table, "10-01")
    assert shifted.iloc[0].to_dict() == {"field_id": "a", "season": "2015", "green_up": "2016-03-01",
                                         "peak": "2016-06-01", "senescence": "2016-09-01"}
