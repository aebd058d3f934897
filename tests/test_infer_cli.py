"""`agrivlm infer` end to end: a tiny model trained on real parcels → the real sample stack → GPKG → `agrivlm eval`.

The checkpoint (``infer_model.trained_checkpoint``) was trained on inputs made by the inference code, so on
the chips it was trained on the CLI must give back the trained answers: that checks that prompts, frames,
bands and decoding at inference are those of training, and that the boxes land where the parcels are.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
import torch
from infer_model import (
    INPUTS,
    boxes_iou,
    field_layer,
    stage_truth,
    training_set,
    untrained_checkpoint,
)
from rasters import smooth_field, truncate, write_dated_stack, write_raster
from typer.testing import CliRunner

from agrivlm.cli import app
from agrivlm.geo import open_stack
from agrivlm.infer.batch import count_journal
from agrivlm.infer.errors import InferError
from agrivlm.infer.journal import Journal
from agrivlm.infer.nms import overlapping_iou
from agrivlm.infer.outputs import journal_path
from agrivlm.schema import FIELD_PREDICTION_COLUMNS, GROWTH_STAGES, STAGE_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
BOX = re.compile(r"^<WIDTH-\d{3}><HEIGHT-\d{3}><WIDTH-\d{3}><HEIGHT-\d{3}>$")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ckpt(infer_ckpt: Path) -> Path:
    return infer_ckpt


def infer(*args: str | Path) -> object:
    result = runner.invoke(app, ["infer", *map(str, args), "--device", "cpu", "--no-progress"])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_fields_on_the_sample_stack_then_eval(fields_run: tuple[Path, list[str]], sample_root: Path,
                                              tmp_path: Path) -> None:
    out, _ = fields_run
    stack = open_stack(sample_root / "ndvi")
    pred = gpd.read_file(out, layer="fields")
    assert pred.crs == stack.crs
    assert set(FIELD_PREDICTION_COLUMNS) <= set(pred.columns) and (pred["task"] == "fields").all()
    assert len(pred) >= 4
    assert pred.geometry.within(stack.grid.footprint().buffer(1e-6)).all()
    assert pred["score"].between(0, 1).all() and pred["tokens"].str.match(BOX).all()
    assert pred["field_id"].is_unique and set(pred["label"]) <= {"grassland", "cultivated land"}
    i, j, iou = overlapping_iou(pred.geometry.to_numpy())
    assert (iou <= 0.5).all()  # NMS: no two kept detections overlap by more than the threshold
    report = json.loads(out.with_name("pred_report.json").read_text())
    assert report["chips_processed"] == 36 and report["questions"] == 36 and report["features"] == len(pred)
    assert report["features_before_nms"] > report["features"]  # overlapping chips see the same fields

    # on the chips it was trained on, the CLI gives back the trained boxes
    _, answers, positions, chip_ids = training_set()
    with Journal.open(journal_path(out), _settings(journal_path(out))) as journal:
        by_chip = {rec["chip_id"]: rec for rec in journal.chips()}
    ious = []
    for answer, target, cid in zip(answers, positions, chip_ids, strict=True):
        if answer.startswith("1 field"):
            feats = by_chip[cid]["answers"][0]["features"]
            ious.append(boxes_iou(feats[0]["box"], target) if feats else 0.0)
    assert sum(x > 0.8 for x in ious) >= 3, ious

    res = runner.invoke(app, ["eval", "fields", "--pred", str(out), "--truth", str(sample_root / "parcels.gpkg"),
                              "--out", str(tmp_path / "eval"), "--boxes"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["n_pred"] == len(pred) and summary["n_truth"] == 88
    per_pred = pd.read_csv(tmp_path / "eval" / "fields.csv").query("kind == 'pred'")
    # the boxes are of the parts of parcels a chip shows, so they overlap true parcels (rarely by IoU > 0.5)
    assert (per_pred["best_iou"] > 0).all() and per_pred["best_iou"].max() > 0.3, per_pred["best_iou"].tolist()


def _settings(path: Path) -> dict:
    return json.loads(path.read_text().splitlines()[0])["settings"]


def _chip_lines(journal: Path) -> list[dict]:
    if not journal.exists():
        return []
    lines = journal.read_bytes().split(b"\n")[:-1]  # a line without its newline is still being written
    return [e for e in map(json.loads, lines) if e["type"] == "chips"]


def test_killed_and_restarted_it_redoes_no_chip_and_writes_the_same_output(
    fields_run: tuple[Path, list[str]], tmp_path: Path
) -> None:
    ref_out, args = fields_run
    out = tmp_path / "pred.gpkg"
    journal = journal_path(out)
    cmd = [sys.executable, "-m", "agrivlm.cli", "infer", *args, "--out", str(out), "--device", "cpu",
           "--threads", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while len(_chip_lines(journal)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()  # nothing half-written: the output is written once, at the end
    killed = [rec["chip_id"] for e in _chip_lines(journal) for rec in e["chips"]]
    assert 4 <= len(killed) < 36

    threads = torch.get_num_threads()
    try:  # the restart runs in this process (the kill needed a process of its own, the restart does not)
        res = infer(*args, "--out", out)
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "pred_report.json").read_text())
    assert report["chips_resumed"] == len(killed)
    assert report["chips_processed"] + report["chips_skipped"] == 36 - len(killed)
    with Journal.open(journal, _settings(journal)) as j:
        counts = count_journal(j)
        resumed = {rec["chip_id"]: rec for rec in j.chips()}
    assert len(counts) == 36 and set(counts.values()) == {1}  # every chip exactly once
    with Journal.open(journal_path(ref_out), _settings(journal_path(ref_out))) as j:
        reference = {rec["chip_id"]: rec for rec in j.chips()}
    assert resumed == reference  # the same answers, scores and geometries, to the bit
    got, want = gpd.read_file(out, layer="fields"), gpd.read_file(ref_out, layer="fields")
    assert got.drop(columns="geometry").equals(want.drop(columns="geometry"))
    assert list(got.geometry.to_wkb()) == list(want.geometry.to_wkb())
    # the GeoPackage itself, byte for byte: its last_change is the stack's newest date, not the clock
    assert out.read_bytes() == ref_out.read_bytes()


def test_junk_answers_of_an_untrained_model_are_counted_and_kept(sample_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "junk.gpkg"
    res = infer(sample_root / "ndvi", "--model", untrained_checkpoint(), "--out", out, "--stride", "64",
                "--batch-size", "9", "--max-new-tokens", "6")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "junk_report.json").read_text())
    with Journal.open(journal_path(out), _settings(journal_path(out))) as j:
        answers = [a for rec in j.chips() for a in rec["answers"]]
    assert len(answers) == report["questions"] == 9
    assert report["unparsed_answers"] == sum(a["unparsed"] for a in answers) >= 1
    assert all(a["text"] and not a["finished"] for a in answers if a["unparsed"])  # the raw answer is kept
    assert len(gpd.read_file(out)) == report["features"]


def test_growth_stages_table_reads_in_eval(ckpt: Path, sample_root: Path, tmp_path: Path) -> None:
    # the fields of the chip the growth questions were trained on
    questions, answers, _, _ = training_set()
    trained = {(q.meta["field_id"], q.meta["date"]): a for q, a in zip(questions, answers, strict=True) if q.meta}
    layer = gpd.read_file(sample_root / "parcels.gpkg")
    asked = layer[layer["index"].astype(str).isin({f for f, _ in trained})]
    fields = tmp_path / "fields.gpkg"
    asked.to_file(fields)
    out = tmp_path / "growth.gpkg"
    res = infer(sample_root / "ndvi", "--masks", sample_root / "cloud_mask", "--model", ckpt, "--out", out, "--task",
                "growth", "--fields", fields, "--field-id", "index", "--field-class", "LULC_NAME", "--batch-size", "16")
    assert res.exit_code == 0, res.output
    table = pd.read_csv(tmp_path / "growth_stages.csv", dtype=str)
    assert list(table.columns[:3]) == list(STAGE_COLUMNS)
    assert set(table["stage"]) <= set(GROWTH_STAGES) and not table.duplicated(["field_id", "date"]).any()
    got = table.set_index(["field_id", "date"])["stage"]
    hits = [got.get(key) == stage for key, stage in trained.items()]
    assert sum(hits) >= 6, (hits, trained)  # the trained questions are asked again, word for word
    g = gpd.read_file(out, layer="growth")
    assert set(g["field_id"]) == set(table["field_id"]) and g.crs == open_stack(sample_root / "ndvi").crs
    assert all(json.loads(s) for s in g["stages"])

    truth = tmp_path / "truth_stages.csv"
    true_stages = stage_truth()
    true_stages[true_stages["field_id"].isin(set(table["field_id"]))].to_csv(truth, index=False)
    res = runner.invoke(app, ["eval", "growth", "--pred", str(tmp_path / "growth_stages.csv"), "--truth",
                              str(truth), "--out", str(tmp_path / "eval")])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["n_pairs"] > 0 and 0 < summary["accuracy"] <= 1, summary


def test_a_bad_stack_is_named_and_skipped_the_others_go_on(ckpt: Path, sample_root: Path, tmp_path: Path) -> None:
    nocrs = tmp_path / "nocrs"
    write_dated_stack(nocrs, n_dates=4, height=40, width=40, bands=1)
    write_raster(nocrs / "S2_20210401.tif", smooth_field(40, 40), crs=None)
    damaged = tmp_path / "damaged"
    write_dated_stack(damaged, n_dates=4, height=64, width=64, bands=1)
    noise = np.random.default_rng(0).random((1, 64, 64), dtype="float32")  # incompressible: truncation hits blocks
    truncate(write_raster(damaged / "S2_20210401.tif", noise, tiled=True, blocksize=16), 0.5)
    out = tmp_path / "pred.gpkg"
    args = [nocrs, sample_root / "ndvi", damaged, "--model", ckpt, "--out", out, "--stride", "64"]
    res = infer(*args)
    assert res.exit_code == 1
    assert "S2_20210401.tif: no CRS" in res.output and "stack " + str(nocrs) in res.output
    assert re.search(r"damaged.S2_20210401\.tif: damaged block", res.output)
    report = json.loads((tmp_path / "pred_report.json").read_text())
    assert [s["ok"] for s in report["stacks"]] == [False, True, False] and report["chips_processed"] == 9
    pred = gpd.read_file(out)
    assert len(pred) >= 1 and (pred["stack"] == str(sample_root / "ndvi")).all()
    assert pred["field_id"].str.startswith("1:").all()  # several INPUTS: ids say which one

    # run again: the good stack comes from the journal, the bad ones are tried again and fail again
    res = infer(*args)
    assert res.exit_code == 1
    report = json.loads((tmp_path / "pred_report.json").read_text())
    assert report["chips_processed"] == 0 and report["chips_resumed"] == 9
    assert gpd.read_file(out).equals(pred)
    # --restart on stacks that all fail: an error, and the good output of before stays as it was
    before = out.read_bytes()
    with pytest.raises(InferError, match=rf"no stack could be read \(.*\); {re.escape(str(out))} left as it was"):
        infer(nocrs, damaged, "--model", ckpt, "--out", out, "--stride", "64", "--restart")
    assert out.read_bytes() == before
    with pytest.raises(InferError, match="2 --masks for 1 INPUTS"):
        infer(*args[:1], "--model", ckpt, "--out", tmp_path / "x.gpkg", "--masks", "a", "--masks", "b")


def test_ask_answers_become_features_on_the_map(ckpt: Path, sample_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "ask.geojson"
    res = infer(sample_root / "ndvi", "--model", ckpt, "--out", out, "--task", "ask", "--question",
                "Where is the largest grassland parcel?", "--stride", "64", "--batch-size", "9",
                "--max-new-tokens", "12")
    assert res.exit_code == 0, res.output
    ans = gpd.read_file(out)
    grid = open_stack(sample_root / "ndvi").grid
    assert ans.crs.to_epsg() == 4326  # RFC 7946 GeoJSON: lon/lat, reprojected from the stack's UTM
    ans = ans.to_crs(grid.crs.to_wkt())
    # every one of the 9 chips was asked; NMS in map units may merge boxes of the overlapping chips (64 and 68)
    report = json.loads((tmp_path / "ask_report.json").read_text())
    assert report["chips_processed"] == 9 and report["features_before_nms"] >= 9
    ids = {f"r{r:06d}_c{c:06d}" for r in (0, 64, 69) for c in (0, 64, 68)}
    assert set(ans["kind"]) <= {"box", "polygon", "point", "chip"}
    assert 0 < len(set(ans["chip_id"])) and set(ans["chip_id"]) <= ids
    assert ans.geometry.within(grid.footprint().buffer(0.05)).all()  # RFC 7946 keeps 7 decimals of degrees: ~1 cm
    # GDAL's GeoJSON reader turns the JSON list columns back into lists
    assert all(isinstance(d if isinstance(d, list) else json.loads(d), list) for d in ans["dates"])
    chips = ans[ans["kind"] == "chip"]
    chip_area = abs(grid.transform.a * grid.transform.e) * 32 * 32  # answers without positions: the chip
    assert all(shapely.area(g) == pytest.approx(chip_area, rel=1e-3) for g in chips.geometry)
    assert INPUTS.chip_size == 32 and field_layer().ids.size == 88 and np.isfinite(ans["score"]).all()
