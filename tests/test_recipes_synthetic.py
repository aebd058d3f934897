"""A full recipe on a synthetic scene with known truth: parcels in EPSG:4326, labels, known key dates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from recipes_synth import EVERY_DAYS, FIELDS, recipe_yaml, write_scene
from typer.testing import CliRunner

from agrivlm.cli.recipe import recipe_app
from agrivlm.errors import ConfigError
from agrivlm.infer.prompts import parse_timeline, stages_at
from agrivlm.recipes.build import build_recipe
from agrivlm.recipes.scan import IndexBands
from agrivlm.recipes.schema import read_records

LABELS = """
  growth_stages:
    stage_questions: 3
    tasks: [green_up_date, peak_date, senescence_date, season_segment, stage_on_date, stage_timeline]
    labels:
      stages: stage_labels.csv
      key_dates: key_date_labels.csv
"""


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scene")
    paths = write_scene(root)
    (root / "stage_labels.csv").write_text("field_id,date,stage\nD,2021-05-30,senescence\n")
    (root / "key_date_labels.csv").write_text("field_id,season,green_up,peak,senescence\nE,2021,2021-04-01,,\n")
    text = recipe_yaml(paths).replace("  growth_stages: {stage_questions: 3}\n", LABELS)
    (root / "recipe.yaml").write_text(text)
    manifest = build_recipe(root / "recipe.yaml", root / "out", progress=False)
    return {"root": root, "out": root / "out", "manifest": manifest}  # type: ignore[dict-item]


def _records(out: Path) -> list:
    return [r for p in sorted((out / "shards").glob("*.jsonl")) for r in read_records(p)]


def test_parcels_in_another_crs_are_reprojected_and_boxed_on_the_pixel_grid(scene) -> None:
    recs = _records(scene["out"])
    fields = {f.field_id: f for f in FIELDS}
    checked = 0
    for rec in recs:
        if rec.family != "field_boundaries" or rec.task not in ("outline_parcels", "largest_of_class"):
            continue
        w = rec.chip.window
        for fid, (kind, shape) in zip(rec.meta["field_ids"], rec.conversation[-1].shapes(), strict=True):
            # a listed outline of a rectangular field is the rectangle: its bounds are the box
            box = shape if kind == "box" else (min(p[0] for p in shape), min(p[1] for p in shape),
                                               max(p[0] for p in shape), max(p[1] for p in shape))
            if kind == "polygon":
                assert len(shape) == 4, (rec.sample_id, fid, shape)
            f = fields[fid]
            # the field's pixel rectangle clipped to the chip (and to the 64 px raster), normalized
            c0, c1 = max(f.cols[0], w.col_off), min(f.cols[1], w.col_off + w.width, 64)
            r0, r1 = max(f.rows[0], w.row_off), min(f.rows[1], w.row_off + w.height)
            expected = ((c0 - w.col_off) / w.width, (r0 - w.row_off) / w.height,
                        (c1 - w.col_off) / w.width, (r1 - w.row_off) / w.height)
            assert np.allclose(box, expected, atol=2e-3), (rec.sample_id, fid, box, expected)  # < 0.07 px
            checked += 1
    assert checked >= 8
    m = scene["manifest"]
    assert m["parcels"]["read"] == 6 and m["stack"]["crs"] == "EPSG:32633"


def test_key_date_answers_come_back_within_one_acquisition_of_the_truth(scene) -> None:
    """t in the records, mapped back through the frames' TimeAxis, lands on the analytic key dates."""
    fields = {f.field_id: f for f in FIELDS}
    task_key = {"green_up_date": "green_up", "peak_date": "peak", "senescence_date": "senescence"}
    seen = set()
    for rec in _records(scene["out"]):
        if rec.task not in task_key:
            continue
        fid = rec.meta["field_id"]
        axis = rec.chip.time_axis
        when = axis.from_norm(rec.conversation[-1].times[0])
        if fid == "E" and rec.task == "green_up_date":
            label = np.datetime64("2021-04-01T00:00:00")
            assert rec.meta["source"] == "label" and abs((when - label) / np.timedelta64(1, "s")) < 60
            seen.add(("E", "label"))
            continue
        truth = np.datetime64(fields[fid].truth()[task_key[rec.task]], "s")
        err_days = abs((when - truth) / np.timedelta64(1, "D"))
        # one acquisition, or the gap between the chip's clear frames around the true date
        frames = np.array(rec.chip.frame_dates, dtype="datetime64[s]")
        i = int(np.searchsorted(frames, truth))
        gap = (frames[min(i, len(frames) - 1)] - frames[max(i - 1, 0)]) / np.timedelta64(1, "D")
        assert err_days <= max(EVERY_DAYS, gap), (rec.sample_id, str(when), str(truth))
        assert rec.meta["source"] == "derived"
        seen.add((fid, rec.task))
    assert {"A", "B", "D", "E", "F"} <= {fid for fid, _ in seen} and ("E", "label") in seen
    assert "C" not in {fid for fid, _ in seen}, "the evergreen strip has no season to ask about"


def test_labels_win_in_the_tables_and_the_stage_answers(scene) -> None:
    out = scene["out"]
    stages = pd.read_csv(out / "tables" / "growth_stages.csv", dtype=str)
    # 2021-05-30 is an acquisition in D's derived peak stage; the label says otherwise and wins
    assert stages[(stages.field_id == "D") & (stages.date == "2021-05-30")].stage.tolist() == ["senescence"]
    # D is labelled: its other dates are not filled with derived stages (06-09 would derive "peak")
    assert stages[stages.field_id == "D"].date.tolist() == ["2021-05-30"]
    assert stages[(stages.field_id == "A") & (stages.date == "2021-06-09")].stage.tolist() == ["peak"]
    keys = pd.read_csv(out / "tables" / "key_dates.csv", dtype=str, keep_default_na=False)
    row = keys[(keys.field_id == "E") & (keys.season == "2021")].iloc[0]
    assert (row.green_up, row.peak, row.senescence) == ("2021-04-01", "", ""), "E's key dates are its labels only"
    assert keys[(keys.field_id == "A") & (keys.season == "2021")].iloc[0].peak.startswith("2021-0")
    for rec in _records(out):
        if rec.task == "stage_on_date":
            expected = stages[(stages.field_id == rec.meta["field_id"]) & (stages.date == rec.meta["date"])]
            assert rec.conversation[-1].text == expected.stage.item()
            if (rec.meta["field_id"], rec.meta["date"]) == ("D", "2021-05-30"):
                assert rec.meta["source"] == "label"


def test_stage_timeline_spans_give_back_the_stage_of_every_frame(scene) -> None:
    """A stage_timeline answer's spans, read back by inference's rule, give each frame's stage in the table."""
    out = scene["out"]
    stages = pd.read_csv(out / "tables" / "growth_stages.csv", dtype=str)
    truth = {(r.field_id, r.date): r.stage for r in stages.itertuples()}
    checked = 0
    fields_seen = set()
    for rec in _records(out):
        if rec.task != "stage_timeline":
            continue
        answer = rec.conversation[-1]
        assert answer.text.endswith(".") and answer.text.count("{segment:") == len(answer.segments) >= 1
        spans = parse_timeline(_render(answer), answer.segments)
        assert spans is not None and [s for s, _, _ in spans] == rec.meta["stages"]
        # consecutive spans name different stages and follow each other in time
        assert all(a[0] != b[0] and a[2] < b[1] for a, b in zip(spans, spans[1:], strict=False))
        axis = rec.chip.time_axis
        dates = [str(np.datetime64(d, "D")) for d in rec.chip.frame_dates]
        got = stages_at(spans, axis.to_norm(np.array(rec.chip.frame_dates, dtype="datetime64[s]")))
        for d, stage in zip(dates, got, strict=True):
            if (rec.meta["field_id"], d) in truth:
                assert stage == truth[(rec.meta["field_id"], d)], (rec.sample_id, d)
                checked += 1
        fields_seen.add(rec.meta["field_id"])
    assert checked >= 30 and {"A", "B"} <= fields_seen


def _render(turn) -> str:
    """A turn's text with its segments as LAPE tokens (the codec's rendering)."""
    from agrivlm.infer.prompts import lape_formatters
    from agrivlm.lape.tokens import LapeVocab
    from agrivlm.tasks.turns import render_text

    return render_text(turn, **lape_formatters(LapeVocab()))


def test_post_season_stage_and_land_cover_from_parcel_classes(scene) -> None:
    out = scene["out"]
    details = pd.read_csv(out / "tables" / "phenology.csv", dtype=str).set_index("field_id")
    assert details.loc["A", "post_stage"] == "dormant" and details.loc["B", "post_stage"] == "harvested"
    rs = [r for r in _records(out) if r.family == "general_rs"]
    classes = {c for r in rs for c in r.meta["classes"]}
    assert classes <= {"cultivated land", "grassland", "forest", "shrubland"} and "grassland" in classes
    m = json.loads((out / "manifest.json").read_text())
    assert m["chips"]["grid"] == 9 and m["chips"]["kept"] + len(m["chips"]["excluded_buffer"]) == 9


def test_cli_show_renders_positions_readably(scene) -> None:
    shard = scene["out"] / "shards" / "train-00000.jsonl"
    res = CliRunner().invoke(recipe_app, ["show", str(shard), "--n", "2", "--task", "green_up_date"])
    assert res.exit_code == 0, res.output
    assert res.output.count("# gs:") == 2 and "Green-up started at t=0." in res.output and "[0." in res.output


def test_index_from_two_bands_and_band_names() -> None:
    spec = IndexBands.from_config(["red", "nir"], 1, ("nir", "red"))
    assert spec.pair == (1, 0) and spec.bands == (1, 0)
    data = np.array([[[[0.1]], [[0.5]]], [[[0.0]], [[0.0]]]], dtype=np.float32)  # (T=2, C=2, 1, 1)
    ndvi = spec.compute(data)
    assert ndvi[0, 0, 0] == pytest.approx((0.5 - 0.1) / 0.6) and np.isnan(ndvi[1, 0, 0])
    assert IndexBands.from_config(["a", "b"], "b", None).band == 1
    with pytest.raises(ConfigError, match="no band named 'nir'"):
        IndexBands.from_config(["a"], "nir", None)
    with pytest.raises(ConfigError, match="band 3 does not exist"):
        IndexBands.from_config(["a"], 3, None)


def test_season_timelines_give_back_the_stage_of_every_acquisition(scene, tmp_path: Path) -> None:
    """``timeline_dates: season``: the spans run over every acquisition of the season, cloudy dates included,
    so they give back the stage of dates that are not the record's frames too."""
    paths = write_scene(tmp_path / "scene")
    text = recipe_yaml(paths, name="season").replace(
        "  growth_stages: {stage_questions: 3}\n",
        "  growth_stages: {tasks: [stage_timeline], timeline_dates: season}\n")
    (tmp_path / "recipe.yaml").write_text(text)
    build_recipe(tmp_path / "recipe.yaml", tmp_path / "out", progress=False)
    stages = pd.read_csv(tmp_path / "out" / "tables" / "growth_stages.csv", dtype=str)
    truth = {(r.field_id, r.date): r.stage for r in stages.itertuples()}
    off_frames = checked = 0
    for rec in _records(tmp_path / "out"):
        if rec.task != "stage_timeline":
            continue
        answer = rec.conversation[-1]
        spans = parse_timeline(_render(answer), answer.segments)
        assert spans is not None
        axis = rec.chip.time_axis
        frames = {str(np.datetime64(d, "D")) for d in rec.chip.frame_dates}
        season = rec.meta["season"]
        for (field_id, day), stage in truth.items():
            if field_id != rec.meta["field_id"] or not day.startswith(season):
                continue
            got = stages_at(spans, axis.to_norm(np.array([day], dtype="datetime64[s]")))[0]
            assert got == stage, (rec.sample_id, day)
            checked += 1
            off_frames += day not in frames
    assert checked >= 30 and off_frames >= 10  # dates that are not the record's frames are answered too
