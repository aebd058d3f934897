"""Ordinary mistakes end in one line naming the file or folder, exit status 1, no traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agrivlm.default_checkpoint import default_model_path
from agrivlm.sample import SAMPLE_ROOT


def agrivlm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agrivlm.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def _one_line_error(res: subprocess.CompletedProcess[str], *names: str) -> None:
    assert res.returncode == 1, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert all(n in lines[0] for n in names), lines[0]


def test_an_output_folder_that_cannot_be_written(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way")
    _one_line_error(agrivlm("ingest", SAMPLE_ROOT / "ndvi", "--out", blocker / "ingest"), str(blocker / "ingest"))
    _one_line_error(agrivlm("infer", SAMPLE_ROOT / "ndvi", "--model", default_model_path(), "--out",
                            blocker / "sub" / "fields.gpkg"), str(blocker / "sub"))
    assert blocker.read_text() == "in the way"


@pytest.mark.parametrize("damage", ["truncated weights", "no tokenizer.json", "edited config.json"])
def test_a_damaged_checkpoint_is_named(tmp_path: Path, damage: str) -> None:
    model = tmp_path / "model"
    shutil.copytree(default_model_path(), model)
    if damage == "truncated weights":
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        named = weights
    elif damage == "no tokenizer.json":
        named = model / "tokenizer.json"
        named.unlink()
    else:
        named = model / "config.json"
        named.write_text(named.read_text()[:-40])
    out = tmp_path / "fields.gpkg"
    _one_line_error(agrivlm("infer", SAMPLE_ROOT / "ndvi", "--model", model, "--out", out), str(named))
    assert not out.exists()
