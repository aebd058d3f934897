"""``--json`` prints the summary as one JSON object on standard output and nothing else there; completion is on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import geopandas as gpd

from agrivlm.default_checkpoint import default_model_path
from agrivlm.sample import SAMPLE_ROOT


def agrivlm(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agrivlm.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def _only_json(res: subprocess.CompletedProcess[str]) -> dict:
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1, res.stdout  # no table, no bar: one object
    return json.loads(lines[0])


def test_ingest_infer_and_eval_print_one_json_object(tmp_path: Path) -> None:
    summary = _only_json(agrivlm("ingest", SAMPLE_ROOT / "ndvi", "--out", tmp_path / "ing", "--chip-size", "32",
                                 "--json"))
    written = json.loads((tmp_path / "ing" / "summary.json").read_text())
    assert summary["chips_kept"] == written["chips_kept"] > 0 and summary["n_dates"] == 68

    report = _only_json(agrivlm("infer", SAMPLE_ROOT / "ndvi", "--model", default_model_path(), "--out",
                                tmp_path / "ask.gpkg", "--task", "ask", "--question", "What is in this image?",
                                "--stride", "64", "--max-new-tokens", "4", "--json"))
    assert report["chips_processed"] == report["questions"] == 9  # 100 px, 32-px chips at stride 64 (edge snapped)
    assert report["outputs"]["layer"] == str(tmp_path / "ask.gpkg")
    saved = json.loads((tmp_path / "ask_report.json").read_text())
    assert {k: v for k, v in saved.items() if k != "total_seconds"} == report

    parcels = gpd.read_file(SAMPLE_ROOT / "parcels.gpkg")
    parcels.to_file(tmp_path / "truth.gpkg")
    parcels.iloc[:40].to_file(tmp_path / "pred.gpkg")
    scores = _only_json(agrivlm("eval", "fields", "--pred", tmp_path / "pred.gpkg", "--truth", tmp_path / "truth.gpkg",
                                "--out", tmp_path / "ev", "--json"))
    assert (scores["tp"], scores["fn"], scores["precision"]) == (40, 48, 1.0)
    assert scores["report"] == str(tmp_path / "ev")
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["tp"] == 40

    stages = "field_id,date,stage\na,2021-05-01,peak\na,2021-06-01,senescence\nb,2021-05-01,dormant\n"
    (tmp_path / "truth.csv").write_text(stages)
    (tmp_path / "pred.csv").write_text(stages.replace("senescence", "peak"))
    growth = _only_json(agrivlm("eval", "growth", "--pred", tmp_path / "pred.csv", "--truth", tmp_path / "truth.csv",
                                "--out", tmp_path / "evg", "--json"))
    assert abs(growth["accuracy"] - 2 / 3) < 1e-9 and growth["report"] == str(tmp_path / "evg")


def test_shell_completion_is_offered() -> None:
    """The completion protocol of the installed console script (what ``--install-completion`` hooks into a shell)."""
    import os

    script = Path(sys.executable).with_name("agrivlm")  # the console script pip installed beside python
    env = {**os.environ, "_AGRIVLM_COMPLETE": "source_bash"}
    res = subprocess.run([str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0 and "_agrivlm_completion" in res.stdout, res.stderr
    env = {**os.environ, "_AGRIVLM_COMPLETE": "complete_bash", "COMP_WORDS": "agrivlm inf", "COMP_CWORD": "1"}
    res = subprocess.run([str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0 and res.stdout.split() == ["infer"], (res.stdout, res.stderr)
