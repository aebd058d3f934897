"""CLI conventions: fixed-value options are choices (a wrong value is a usage error, exit 2); -q is quiet."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest
from typer.testing import CliRunner

from agrivlm.cli import app
from agrivlm.cli.infer import DtypeChoice, TaskChoice
from agrivlm.cli.synth import BandSetChoice, RegionChoice
from agrivlm.infer.generate import DTYPES
from agrivlm.infer.prompts import TASKS
from agrivlm.synth.regions import REGIONS
from agrivlm.synth.scene import BAND_SETS


def test_the_cli_choices_are_the_library_values() -> None:
    assert get_args(TaskChoice) == TASKS
    assert get_args(DtypeChoice) == tuple(DTYPES)
    assert get_args(RegionChoice) == tuple(REGIONS)
    assert get_args(BandSetChoice) == BAND_SETS


@pytest.mark.parametrize("args, option", [
    (["infer", "{d}", "--model", "default", "--out", "{d}/x.gpkg", "--task", "bogus"], "--task"),
    (["infer", "{d}", "--model", "default", "--out", "{d}/x.gpkg", "--dtype", "float8"], "--dtype"),
    (["ingest", "{d}", "--out", "{d}/i.gpkg", "--same-day", "bogus"], "--same-day"),
    (["ingest", "{d}", "--out", "{d}/i.gpkg", "--edge", "wrap"], "--edge"),
    (["ingest", "{d}", "--out", "{d}/i.gpkg", "--format", "shp"], "--format"),
    (["synth", "--out", "{d}/s", "--region", "sahel"], "--region"),
    (["synth", "--out", "{d}/s", "--bands", "rgb"], "--bands"),
    (["quickstart", "--out", "{d}/q", "--start", "midway"], "--start"),
    # numbers out of their range are usage errors too (the library's own checks stay for Python callers)
    (["infer", "{d}", "--model", "default", "--out", "{d}/x.gpkg", "--batch-size", "0"], "--batch-size"),
    (["infer", "{d}", "--model", "default", "--out", "{d}/x.gpkg", "--max-batch", "0"], "--max-batch"),
    (["infer", "{d}", "--model", "default", "--out", "{d}/x.gpkg", "--nms-iou", "1.5"], "--nms-iou"),
    (["infer", "{d}", "--model", "default", "--out", "{d}/x.gpkg", "--chips-per-task", "0"], "--chips-per-task"),
    (["infer", "{d}", "--model", "default", "--out", "{d}/x.gpkg", "--stride", "-16"], "--stride"),
    (["ingest", "{d}", "--out", "{d}/i.gpkg", "--chip-size", "0"], "--chip-size"),
    (["ingest", "{d}", "--out", "{d}/i.gpkg", "--workers", "0"], "--workers"),
    (["eval", "fields", "--pred", "{d}/p.gpkg", "--truth", "{d}/t.gpkg", "--out", "{d}/e", "--iou-threshold", "2"],
     "--iou-threshold"),
    (["explore", "{d}", "--port", "70000"], "--port"),
    (["explore", "{d}", "--stride", "0"], "--stride"),
    (["quickstart", "--out", "{d}/q", "--steps", "0"], "--steps"),
    (["train", "default", "--out", "{d}/t", "--threads", "0"], "--threads"),
    (["train", "default", "--out", "{d}/t", "--fields-steps", "-1"], "--fields-steps"),
    (["recipe", "show", "{d}/x.jsonl", "--n", "0"], "--n"),
])
def test_a_wrong_choice_is_a_usage_error(tmp_path: Path, args: list[str], option: str) -> None:
    res = CliRunner().invoke(app, [a.format(d=tmp_path) for a in args])
    assert res.exit_code == 2, res.output
    assert f"Invalid value for '{option}'" in res.output
    assert not any(tmp_path.iterdir()), "nothing is written on a usage error"


def test_quiet_prints_nothing_but_errors(tmp_path: Path) -> None:
    """``-q``: no progress bar, no summary; an error is still its one line on standard error."""
    import subprocess
    import sys

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "agrivlm.cli", *args], capture_output=True, text=True,
                              timeout=120)

    loud = run("synth", "--out", str(tmp_path / "a"), "--area-km2", "0.05")
    assert loud.returncode == 0 and "dates" in loud.stdout and "%" in loud.stderr
    quiet = run("-q", "synth", "--out", str(tmp_path / "b"), "--area-km2", "0.05")
    assert quiet.returncode == 0 and (quiet.stdout, quiet.stderr) == ("", "")
    assert (tmp_path / "b" / "scene.json").is_file()
    failed = run("-q", "synth", "--out", str(tmp_path / "b"), "--area-km2", "0.05")
    assert failed.returncode == 1 and failed.stdout == ""
    assert failed.stderr.strip().splitlines() == [f"error: {tmp_path / 'b'}: already exists; pass --overwrite to "
                                                  "replace it"]


@pytest.mark.parametrize("option", ["--truth", "--parcels"])
def test_one_name_for_the_truth_layer_the_older_one_kept(tmp_path: Path, option: str) -> None:
    """The quickstart names its truth layer as eval and explore do (``--truth``); ``--parcels`` still works."""
    res = CliRunner().invoke(app, ["quickstart", "--out", str(tmp_path / "q"), option, str(tmp_path / "f.gpkg")])
    assert res.exit_code == 2, res.output
    assert "--stack and --truth go together" in res.output
    assert not any(tmp_path.iterdir())
