"""The page's logic through Streamlit's AppTest: the real script, the real sample, real inputs and bad ones."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import geopandas as gpd
import pytest
from infer_model import trained_checkpoint, training_set
from streamlit.testing.v1 import AppTest

from agrivlm.explore.page import picked_field
from agrivlm.geo import open_stack
from agrivlm.tasks.questions import OUTLINE_FIELDS_QUESTIONS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "app" / "field_explorer.py")


def run_app(monkeypatch: pytest.MonkeyPatch, *argv: str | Path) -> AppTest:
    monkeypatch.setattr(sys, "argv", [SCRIPT, *map(str, argv)])
    at = AppTest.from_file(SCRIPT, default_timeout=90)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def deck_layers(at: AppTest) -> dict[str, dict]:
    spec = json.loads(at.get("deck_gl_json_chart")[0].proto.json)
    return {layer["id"]: layer for layer in spec["layers"]}


def sample_args(sample_root: Path) -> list[str | Path]:
    return ["--stack", sample_root / "ndvi", "--masks", sample_root / "cloud_mask",
            "--truth", sample_root / "parcels.gpkg"]


@pytest.fixture(scope="module")
def predictions(sample_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A prediction layer (3 real parcels in lon/lat, with the columns `agrivlm infer` writes) and stage tables."""
    out = tmp_path_factory.mktemp("pred")
    parcels = gpd.read_file(sample_root / "parcels.gpkg")
    pred = gpd.GeoDataFrame(
        {"chip_id": ["r000000_c000000", "r000000_c000000", "r000036_c000036"], "task": "boundary",
         "score": [0.91, 0.72, 0.55], "tokens": "<WIDTH-010><HEIGHT-020><WIDTH-040><HEIGHT-060>"},
        geometry=parcels.geometry.iloc[:3].to_numpy(), crs=parcels.crs,
    ).to_crs(4326)
    pred.to_file(out / "fields.geojson", driver="GeoJSON")
    (out / "pred_stages.csv").write_text("field_id,date,stage\n37649,2016-05-16,green-up\n37649,2016-07-25,peak\n")
    (out / "true_stages.csv").write_text("field_id,date,stage\n37649,2016-05-06,green-up\n37649,2016-08-04,peak\n")
    pred.set_crs(None, allow_override=True).to_file(out / "nocrs.gpkg")
    return {name: out / name for name in ("fields.geojson", "pred_stages.csv", "true_stages.csv", "nocrs.gpkg")}


@pytest.mark.filterwarnings("ignore:'crs' was not provided")
def test_sample_page(monkeypatch: pytest.MonkeyPatch, sample_root: Path, predictions: dict[str, Path]) -> None:
    at = run_app(monkeypatch, *sample_args(sample_root), "--predictions", predictions["fields.geojson"],
                 "--predictions", predictions["pred_stages.csv"], "--truth", predictions["true_stages.csv"])
    assert not at.error, [e.value for e in at.error]
    layers = deck_layers(at)
    assert list(layers) == ["stack-overlay", "true-outline", "predicted-outline", "true-fields", "predicted-fields"]
    assert len(layers["true-fields"]["data"]["features"]) == 88
    assert len(layers["predicted-fields"]["data"]["features"]) == 3
    date = at.sidebar.select_slider(key="date")
    assert len(date.options) == 68 and at.sidebar.radio(key="view").options == ["NDVI"]
    assert "no basemap" in at.caption[0].value and "data on 100% of the stack" in at.caption[0].value
    assert not at.text_input  # no place to type a path: the page reads only what it was started with
    first_image = layers["stack-overlay"]["image"]

    # another date: another overlay, with the clouds of that date counted
    date.set_value(20).run()
    assert deck_layers(at)["stack-overlay"]["image"] != first_image
    assert at.caption[0].value.startswith("2016-06-05 10:06 · NDVI") and "clouds on 25% of it" in at.caption[0].value

    # chip grid on demand
    at.sidebar.checkbox(key="grid").check().run()
    assert len(deck_layers(at)["chip-grid"]["data"]["features"]) == 16  # the package's 32-px chip grid

    # a true field: its curve, its predicted and true stages side by side, its outline highlighted
    at.sidebar.selectbox(key="field").set_value("true:37649").run()
    assert not at.error and not at.exception
    assert at.subheader[0].value == "Field 37649 (true) · grassland"
    assert len(at.get("vega_lite_chart")) == 1
    stages = at.dataframe[0].value
    assert list(stages.columns) == ["date", "predicted", "true"]
    assert stages.set_index("date").loc["2016-07-25", "predicted"] == "peak"
    assert stages.set_index("date").loc["2016-08-04", "true"] == "peak"
    assert "selected-field" in deck_layers(at)
    assert "clear enough" in at.caption[1].value

    # a predicted field: its score, chip and its position tokens decoded, the box drawn on the map
    at.sidebar.selectbox(key="field").set_value("predicted:r000000_c000000#1").run()
    assert at.subheader[0].value == "Field r000000_c000000#1 (predicted) · boundary · score 0.72"
    table = at.dataframe[0].value
    assert list(table["label"]) == ["P1", "P2"]
    assert list(table["tokens"]) == ["<WIDTH-010><HEIGHT-020>", "<WIDTH-040><HEIGHT-060>"]
    assert table["u"].tolist() == pytest.approx([10.5 / 150, 40.5 / 150])
    layers = deck_layers(at)
    assert {"answer-boxes", "answer-path", "answer-points"} <= set(layers)
    assert len(layers["answer-boxes"]["data"]["features"]) == 1


@pytest.mark.filterwarnings("ignore:'crs' was not provided")
def test_bad_inputs_are_messages_not_tracebacks(monkeypatch: pytest.MonkeyPatch, sample_root: Path,
                                                predictions: dict[str, Path], tmp_path: Path) -> None:
    at = run_app(monkeypatch, "--stack", tmp_path / "missing")
    assert [e.value for e in at.error] == [f"{tmp_path / 'missing'}: no such file or folder"]
    (tmp_path / "empty").mkdir()
    at = run_app(monkeypatch, "--stack", tmp_path / "empty")
    assert "holds no GeoTIFF" in at.error[0].value
    at = run_app(monkeypatch)
    assert "no stack given" in at.error[0].value

    # a prediction layer without CRS and a missing truth file: messages, and the map is still drawn
    at = run_app(monkeypatch, "--stack", sample_root / "ndvi", "--predictions", predictions["nocrs.gpkg"],
                 "--truth", tmp_path / "nope.gpkg")
    messages = [e.value for e in at.error]
    assert any("nocrs.gpkg: the layer has no CRS" in m for m in messages)
    assert any("nope.gpkg: no such file (given with --truth)" in m for m in messages)
    assert list(deck_layers(at)) == ["stack-overlay"]


def test_model_box_says_a_checkpoint_is_needed(monkeypatch: pytest.MonkeyPatch, sample_root: Path,
                                               tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    at = run_app(monkeypatch, "--stack", sample_root / "ndvi", "--model", tmp_path / "ckpt", "--chip-size", "64")
    assert not at.error
    assert any(i.value.startswith("Asking needs a trained checkpoint") and "no config.json" in i.value
               for i in at.info)
    assert at.text_input(key="question").disabled
    assert at.selectbox(key="chip").options == ["r000000_c000000", "r000000_c000036", "r000037_c000000",
                                                "r000037_c000036"]


def test_the_model_answers_a_question_about_a_chip(monkeypatch: pytest.MonkeyPatch, sample_root: Path) -> None:
    """A tiny checkpoint trained on the sample (tests/infer_model.py) answers; its box lands on the map."""
    ckpt, _ = trained_checkpoint()
    _, answers, _, chip_ids = training_set()
    chip = chip_ids[answers.index(next(a for a in answers if a.startswith("1 field")))]
    at = run_app(monkeypatch, "--stack", sample_root / "ndvi", "--masks", sample_root / "cloud_mask", "--model", ckpt,
                 "--chip-size", "32")
    assert not at.error and not any(i.value.startswith("Asking needs") for i in at.info)
    at.selectbox(key="chip").set_value(chip)
    at.text_input(key="question").input(OUTLINE_FIELDS_QUESTIONS[0]).run()
    at.button(key="ask").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert re.fullmatch(r"1 field: \w[\w ]* <WIDTH-\d+><HEIGHT-\d+><WIDTH-\d+><HEIGHT-\d+>\.", at.code[0].value)
    layers = deck_layers(at)
    assert len(layers["model-answer-boxes"]["data"]["features"]) == 1
    table = at.dataframe[0].value
    assert list(table["label"]) == ["P1", "P2"]
    grid = open_stack(sample_root / "ndvi").grid
    west, south, east, north = grid.footprint().bounds
    x, y = grid.lonlat_to_crs(table["lon"].to_numpy(), table["lat"].to_numpy())
    assert ((x >= west) & (x <= east) & (y >= south) & (y <= north)).all()
    assert at.session_state["model_answer"]["chip"] == chip


def test_picked_field_reads_the_chart_selection() -> None:
    selection = {"selection": {"indices": {"true-fields": [3]},
                               "objects": {"true-fields": [{"type": "Feature",
                                                            "properties": {"field_id": "37649", "kind": "true"}}]}}}
    assert picked_field(selection) == "true:37649"
    assert picked_field({"selection": {"indices": {}, "objects": {}}}) is None
    assert picked_field(None) is None
