"""What a killed run left beside its outputs is removed (or put back) by the next run, and nothing else."""

from __future__ import annotations

import os
import time
from pathlib import Path

from typer.testing import CliRunner

from agrivlm.cli import app
from agrivlm.default_checkpoint import default_model_path
from agrivlm.io import atomic_dir, remove_stale_temporaries


def _old(path: Path) -> Path:
    t = time.time() - 60
    os.utime(path, (t, t))
    return path


def test_atomic_dir_puts_back_a_target_moved_aside_and_drops_half_built_folders(tmp_path: Path) -> None:
    target = tmp_path / "out"
    # a kill between atomic_dir's two renames: the previous output is in .out.old-*/out, out itself is gone
    aside = tmp_path / ".out.old-k1ll3d"
    (aside / "out").mkdir(parents=True)
    (aside / "out" / "manifest.json").write_text("previous")
    _old(aside)
    half = tmp_path / ".out.tmp-h4lf"
    half.mkdir()
    (half / "shard.jsonl").write_text("half")
    _old(half)
    other = tmp_path / ".another.tmp-keep"
    other.mkdir()
    _old(other)
    found = remove_stale_temporaries(target, time.time())
    assert sorted(found) == [".out.old-k1ll3d", ".out.tmp-h4lf"]
    assert (target / "manifest.json").read_text() == "previous" and other.exists()
    # the next atomic_dir of the same target finds nothing left and replaces the put-back output whole
    half.mkdir()
    _old(half)
    with atomic_dir(target) as tmp:
        (tmp / "manifest.json").write_text("new")
    assert (target / "manifest.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".another.tmp-keep", "out"]


def test_infer_removes_its_own_stale_temporaries_only(tmp_path: Path) -> None:
    out = tmp_path / "fields.gpkg"
    stale = [tmp_path / name for name in (".fields.Ab3d_f9Z.gpkg", ".fields.Ab3d_f9Z.gpkg-journal",
                                          ".fields_stages.x1Y2z3W4.csv", ".fields_report.Qq12Ww34.json")]
    for p in stale:
        p.write_text("partial")
        _old(p)
    keep = [tmp_path / ".other.Ab3d_f9Z.gpkg", tmp_path / ".fields.short.gpkg", tmp_path / "notes.txt"]
    for p in keep:
        p.write_text("mine")
        _old(p)
    res = CliRunner().invoke(app, ["infer", str(tmp_path / "no_such_stack"), "--model", str(default_model_path()),
                                   "--out", str(out)])
    assert res.exit_code != 0  # the stack is missing; the leftovers are gone all the same
    assert not any(p.exists() for p in stale) and all(p.exists() for p in keep)
    assert not out.exists()
