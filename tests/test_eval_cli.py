"""``agrivlm eval`` end to end on the embedded sample's real parcels, with scores computed independently here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
from shapely.affinity import translate
from shapely.geometry import Polygon
from typer.testing import CliRunner

from agrivlm.cli import app
from agrivlm.eval import THRESHOLDS
from agrivlm.geo.coords import GeoGrid

ROOT = Path(__file__).resolve().parents[1]


def agrivlm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agrivlm.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


def perturb(truth: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """Deterministic predictions from the true parcels: every 9th dropped, every 5th (from 1) shifted by 60 % of
    its width, the rest shifted (1.5 m, -1 m); every 7th (from 3) also duplicated with another small shift;
    plus a self-intersecting polygon far from every parcel and an empty geometry."""
    rows = []
    for k, geom in enumerate(truth.geometry):
        if k % 9 == 0:
            continue
        if k % 5 == 1:
            minx, _, maxx, _ = geom.bounds
            rows.append((f"p{k}", translate(geom, 0.6 * (maxx - minx), 0.0)))
        else:
            rows.append((f"p{k}", translate(geom, 1.5, -1.0)))
        if k % 7 == 3:
            rows.append((f"p{k}dup", translate(geom, -1.0, 0.5)))
    x, y = truth.total_bounds[2] + 500.0, truth.total_bounds[3] + 500.0
    rows.append(("bowtie", Polygon([(x, y), (x + 50, y + 50), (x + 50, y), (x, y + 50)])))
    rows.append(("empty", Polygon()))
    return gpd.GeoDataFrame({"field_id": [r[0] for r in rows]}, geometry=[r[1] for r in rows], crs=truth.crs)


def test_eval_fields_on_the_sample_parcels(tmp_path: Path, sample_root: Path) -> None:
    truth_path = sample_root / "parcels.gpkg"
    truth = gpd.read_file(truth_path)
    pred = perturb(truth)
    pred.to_crs("EPSG:4326").to_file(tmp_path / "pred.geojson")  # CRS mismatch: lon/lat vs UTM 33N
    extent = sorted((sample_root / "ndvi").glob("*.tif"))[0]

    # Independent expectation: plain shapely, pair by pair, in the truth's CRS. True parcels do not overlap,
    # so for t >= 0.5 a prediction can pass t with at most one parcel and TP_t = #parcels with a prediction
    # above t (the best of them is the match).
    t_geoms, p_geoms = list(truth.geometry), [g for g in pred.geometry if not g.is_empty and g.is_valid]
    assert len(p_geoms) == len(pred) - 2
    tree = shapely.STRtree(t_geoms)
    assert all(t_geoms[i].intersection(t_geoms[j]).area < 1e-6 for i, j in zip(*tree.query(t_geoms), strict=True)
               if i != j)
    best = np.array([max(a.intersection(b).area / a.union(b).area for b in p_geoms) for a in t_geoms])
    assert np.min(np.abs(best[:, None] - np.array(THRESHOLDS)[None, :])) > 1e-6  # no IoU sits on a threshold
    n_t, n_p = len(t_geoms), len(p_geoms) + 1  # + the repaired bowtie
    tps = [int((best > t).sum()) for t in THRESHOLDS]
    tp = tps[0]

    # pixel level: pixel centres inside the union of parcels, on the NDVI grid, over valid pixels
    with rasterio.open(extent) as ds:
        grid, valid = GeoGrid(ds.transform, ds.crs, ds.width, ds.height), ds.dataset_mask() > 0
    rows, cols = np.mgrid[0 : grid.height, 0 : grid.width]
    xs, ys = grid.pixel_to_crs(cols + 0.5, rows + 0.5)
    in_t = shapely.contains_xy(shapely.union_all(t_geoms), xs, ys) & valid
    in_p = shapely.contains_xy(shapely.union_all(p_geoms), xs, ys) & valid

    out = tmp_path / "report"
    res = agrivlm("eval", "fields", "--pred", str(tmp_path / "pred.geojson"), "--truth", str(truth_path),
                  "--out", str(out), "--extent", str(extent))
    assert res.returncode == 0, res.stderr
    assert "F1 @ IoU>0.5" in res.stdout
    s = json.loads((out / "summary.json").read_text())
    assert (s["n_truth"], s["n_pred"], s["tp"], s["fp"], s["fn"]) == (n_t, n_p, tp, n_p - tp, n_t - tp)
    assert s["precision"] == pytest.approx(tp / n_p)
    assert s["recall"] == pytest.approx(tp / n_t)
    assert s["f1"] == pytest.approx(2 * tp / (n_t + n_p))
    assert s["map_50_95"] == pytest.approx(np.mean([k / (n_t + n_p - k) for k in tps]))
    assert s["mean_iou"] == pytest.approx(best[best > 0.5].mean(), abs=1e-8)
    assert [r["tp"] for r in s["thresholds"]] == tps
    assert s["metric_crs"] == "EPSG:32633" and s["repaired_invalid"] == {"truth": 0, "pred": 1}
    assert s["dropped_empty"] == {"truth": 0, "pred": 1}
    both = int((in_t & in_p).sum())
    assert s["pixel"]["n_truth"] == int(in_t.sum()) and s["pixel"]["n_pred"] == int(in_p.sum())
    assert s["pixel"]["n_both"] == both
    assert s["pixel_iou"] == pytest.approx(both / int((in_t | in_p).sum()))

    per_field = pd.read_csv(out / "fields.csv", dtype={"truth_id": str, "pred_id": str})
    truth_rows = per_field[per_field.kind == "truth"]
    assert len(truth_rows) == n_t and int(truth_rows.matched.sum()) == tp
    np.testing.assert_allclose(truth_rows.best_iou.to_numpy(), best, atol=1e-8)
    matched = truth_rows[truth_rows.matched]
    # truth ids are the sample's unique `index` column (agrivlm.io.FIELD_ID_COLUMNS); predictions are p<row>
    row_of = {str(v): k for k, v in enumerate(truth["index"])}
    assert all(pid.startswith(f"p{row_of[tid]}") for tid, pid in zip(matched.truth_id, matched.pred_id, strict=True))
    assert len(per_field[per_field.kind == "pred"]) == n_p - tp
    assert (out / "fields.png").stat().st_size > 1000

    again = agrivlm("eval", "fields", "--pred", str(tmp_path / "pred.geojson"), "--truth", str(truth_path),
                    "--out", str(out))
    assert again.returncode == 1 and "summary.json: already exists; pass --overwrite" in again.stderr
    assert "Traceback" not in again.stderr


def test_eval_growth_cli_and_a_clear_error(tmp_path: Path) -> None:
    truth = pd.DataFrame({"field_id": ["7"] * 4, "date": ["2021-04-01", "2021-04-11", "2021-04-21", "2021-05-01"],
                          "stage": ["dormant", "green-up", "peak", "senescence"]})
    truth.to_csv(tmp_path / "truth.csv", index=False)
    truth.assign(stage=["dormant", "green-up", "green-up", "senescence"]).to_csv(tmp_path / "pred.csv", index=False)
    # in-process through typer (the subprocess path is exercised by the fields test and the error below)
    res = CliRunner().invoke(app, ["eval", "growth", "--pred", str(tmp_path / "pred.csv"), "--truth",
                                   str(tmp_path / "truth.csv"), "--out", str(tmp_path / "g")])
    assert res.exit_code == 0, res.output
    assert "accuracy" in res.output and "0.7500" in res.output
    s = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert s["accuracy"] == pytest.approx(3 / 4)
    # dormant 1, green-up 2/3, peak 0, senescence 1; temporal: green-up [5,15] vs [5,25] = 1/2, peak 0/10
    assert s["macro_f1"] == pytest.approx((1 + 2 / 3 + 0 + 1) / 4)
    assert s["temporal_iou"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert (tmp_path / "g" / "confusion_matrix.png").exists() and (tmp_path / "g" / "stages.csv").exists()
    truth.assign(stage="ripe").to_csv(tmp_path / "bad.csv", index=False)
    bad = agrivlm("eval", "growth", "--pred", str(tmp_path / "bad.csv"), "--truth", str(tmp_path / "truth.csv"),
                  "--out", str(tmp_path / "g2"))
    assert bad.returncode == 1 and "bad.csv: unknown stage word(s) ['ripe']" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "g2" / "summary.json").exists()


def test_eval_fields_refuses_layers_that_do_not_meet(tmp_path: Path, sample_root: Path) -> None:
    """Predictions 100 km from the truth (here: UTM numbers labelled another zone) are a CRS mistake, not zeros."""
    truth = gpd.read_file(sample_root / "parcels.gpkg")
    truth.set_geometry(truth.geometry.translate(100_000.0, 0.0)).to_file(tmp_path / "shifted.gpkg")
    res = agrivlm("eval", "fields", "--pred", str(tmp_path / "shifted.gpkg"), "--truth",
                  str(sample_root / "parcels.gpkg"), "--out", str(tmp_path / "e"))
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 1 and len(lines) == 1, res.stderr
    assert "shifted.gpkg" in lines[0] and "parcels.gpkg" in lines[0] and "do not overlap: 97.6 km apart" in lines[0]
    assert not (tmp_path / "e").exists()
    # the same layer a little off still scores (a model's miss is a result)
    truth.set_geometry(truth.geometry.translate(300.0, 0.0)).to_file(tmp_path / "near.gpkg")
    ok = agrivlm("eval", "fields", "--pred", str(tmp_path / "near.gpkg"), "--truth",
                 str(sample_root / "parcels.gpkg"), "--out", str(tmp_path / "e2"))
    assert ok.returncode == 0, ok.stderr
