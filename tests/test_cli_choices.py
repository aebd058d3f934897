"""Options with a fixed set of values are choices: a wrong value is a usage error (exit 2) naming the option."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest
from typer.testing import CliRunner

from agrivlm.cli import app
from agrivlm.infer.commands import DtypeChoice, TaskChoice
from agrivlm.infer.generate import DTYPES
from agrivlm.infer.prompts import TASKS
from agrivlm.synth.commands import BandSetChoice, RegionChoice
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
])
def test_a_wrong_choice_is_a_usage_error(tmp_path: Path, args: list[str], option: str) -> None:
    res = CliRunner().invoke(app, [a.format(d=tmp_path) for a in args])
    assert res.exit_code == 2, res.output
    assert f"Invalid value for '{option}'" in res.output
    assert not any(tmp_path.iterdir()), "nothing is written on a usage error"
