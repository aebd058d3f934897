"""Issue 21: a resumed `agrivlm infer` refuses stacks and weights that changed; `agrivlm ingest` swaps its index and
summary in as one unit and cleans up after killed runs.

Infer runs the tiny model as built (``infer_model.untrained_checkpoint``: real weights, junk answers, cheap) on
a real written stack; ingest runs on a real written stack. Faults are injected at the phase boundaries.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import geopandas as gpd
import pytest
from infer_model import untrained_checkpoint
from rasters import smooth_field, write_dated_stack, write_raster
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import agrivlm.geo.ingest as ingest_module
import agrivlm.io as io_module
from agrivlm.cli import app
from agrivlm.errors import IngestError
from agrivlm.geo.index import read_chip_index
from agrivlm.geo.ingest import ingest
from agrivlm.infer.errors import InferError
from agrivlm.infer.fingerprint import describe_stack_change
from agrivlm.infer.outputs import journal_path

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()


@pytest.fixture(scope="module")
def model() -> Path:
    return untrained_checkpoint()


def infer(*args: str | Path) -> dict:
    """Run `agrivlm infer` in this process (cheap settings); raise its error; return the run's report."""
    out = Path(args[args.index("--out") + 1])
    result = runner.invoke(app, ["infer", *map(str, args), "--device", "cpu", "--no-progress", "--stride", "32",
                                 "--batch-size", "1", "--max-new-tokens", "4"])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return json.loads(out.with_name(f"{out.stem}_report.json").read_text())


def stack(folder: Path, n_dates: int = 6) -> Path:
    write_dated_stack(folder, n_dates=n_dates, height=64, width=64, bands=1)
    return folder


def outputs(out: Path) -> dict[str, bytes]:
    """The bytes of an infer run's output, journal and report."""
    return {p.name: p.read_bytes() for p in (out, journal_path(out), out.with_name(f"{out.stem}_report.json"))}


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message and "--restart" in message
    return message


# -- infer: stacks ---------------------------------------------------------------------------------------


def test_resume_after_dates_were_removed_is_refused_then_restart_works(model: Path, tmp_path: Path) -> None:
    data = stack(tmp_path / "stack")
    out = tmp_path / "pred.gpkg"
    first = infer(data, "--model", model, "--out", out)
    assert first["chips_processed"] == 4 and first["chips_resumed"] == 0
    assert infer(data, "--model", model, "--out", out)["chips_resumed"] == 4  # unchanged: resumed
    before = outputs(out)
    (data / "S2_20210311.tif").unlink()
    (data / "S2_20210321.tif").unlink()
    with pytest.raises(InferError) as exc:
        infer(data, "--model", model, "--out", out)
    message = one_line(exc)
    assert message.startswith(f"stack {data}: 2 dates removed (2021-03-11, 2021-03-21) since the journal ")
    assert message.endswith("pass --restart to start over")
    assert outputs(out) == before  # output, journal and report as they were
    again = infer(data, "--model", model, "--out", out, "--restart")
    assert again["chips_processed"] == 4 and again["chips_resumed"] == 0
    with journal_path(out).open() as fh:
        record = next(json.loads(line) for line in fh if '"type":"stack"' in line)
    assert len(record["fingerprint"]["files"]) == 4 and record["fingerprint"]["grid"]["shape"] == [64, 64]


def test_partial_run_then_a_rewritten_file_is_refused(model: Path, tmp_path: Path) -> None:
    data = stack(tmp_path / "stack")
    out = tmp_path / "pred.gpkg"
    infer(data, "--model", model, "--out", out)
    journal = journal_path(out)
    lines = journal.read_text().splitlines(keepends=True)
    assert [json.loads(x)["type"] for x in lines] == ["header", "stack", "chips", "chips", "chips", "chips",
                                                       "stack_done"]
    journal.write_text("".join(lines[:4]))  # killed after 2 of 4 chips
    before = outputs(out)
    time.sleep(0.01)
    write_raster(data / "S2_20210311.tif", smooth_field(64, 64, 1, t=0.3))  # the same pixels, written again
    with pytest.raises(InferError) as exc:
        infer(data, "--model", model, "--out", out)
    assert "1 file(s) changed (S2_20210311.tif: rewritten (modified time changed))" in one_line(exc)
    assert outputs(out) == before
    write_raster(data / "S2_20210311.tif", smooth_field(64, 64, 1, seed=7))  # other pixels
    with pytest.raises(InferError, match=r"stack .*: 1 file\(s\) changed \(S2_20210311\.tif: size \d+ → \d+ bytes"):
        infer(data, "--model", model, "--out", out)
    assert outputs(out) == before
    (data / "S2_20210311.tif").unlink()  # back to a consistent stack of 5 dates
    report = infer(data, "--model", model, "--out", out, "--restart")
    assert report["chips_processed"] == 4 and report["chips_resumed"] == 0


def test_changed_weights_and_an_old_journal_are_refused(model: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(model, ckpt)
    data = stack(tmp_path / "stack", n_dates=4)
    out = tmp_path / "pred.gpkg"
    infer(data, "--model", ckpt, "--out", out)
    os.utime(ckpt / "model.safetensors")  # a touch is not a change: the weights are hashed
    assert infer(data, "--model", ckpt, "--out", out)["chips_resumed"] == 4
    weights = load_file(ckpt / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1.0
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    before = outputs(out)
    with pytest.raises(InferError) as exc:
        infer(data, "--model", ckpt, "--out", out)
    assert "model weights changed (model.safetensors)" in one_line(exc)
    assert outputs(out) == before
    assert infer(data, "--model", ckpt, "--out", out, "--restart")["chips_processed"] == 4
    # a journal written before fingerprints (version 1) cannot be checked: refused, not resumed
    journal = journal_path(out)
    lines = journal.read_text().splitlines(keepends=True)
    header = json.loads(lines[0])
    header["version"] = 1
    journal.write_text(json.dumps(header) + "\n" + "".join(lines[1:]))
    with pytest.raises(InferError) as exc:
        infer(data, "--model", ckpt, "--out", out)
    assert "predates content fingerprints" in one_line(exc)
    assert infer(data, "--model", ckpt, "--out", out, "--restart")["chips_resumed"] == 0


def test_describe_stack_change_names_masks_dates_and_grid() -> None:
    grid = {"crs": "W", "transform": [10.0, 0.0, 0.0, 0.0, -10.0, 0.0], "shape": [64, 64]}
    old = {"files": [["/s/a.tif", 10, 1, "2021-03-01T00:00:00"], ["/s/b.tif", 10, 1, "2021-03-11T00:00:00"]],
           "masks": [["/m/a.tif", 5, 1, "2021-03-01T00:00:00"]], "grid": grid}
    assert describe_stack_change(old, json.loads(json.dumps(old))) is None
    new = {"files": [["/s/a.tif", 10, 1, "2021-03-01T00:00:00"], ["/s/c.tif", 10, 1, "2021-03-21T00:00:00"]],
           "masks": [["/m/a.tif", 6, 1, "2021-03-01T00:00:00"]], "grid": {**grid, "shape": [64, 65]}}
    assert describe_stack_change(old, new) == (
        "1 dates removed (2021-03-11), 1 dates added (2021-03-21), "
        "1 mask file(s) changed (a.tif: size 5 → 6 bytes), grid changed (shape)"
    )


# -- ingest: index and summary as one unit ----------------------------------------------------------------


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def state(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_failure_before_the_swap_leaves_the_old_index_and_summary(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    data, out = stack(tmp_path / "stack"), tmp_path / "out"
    first = ingest(data, out, chip_size=32, progress=False)
    assert first["chips_kept"] == 4
    before = state(out)

    def boom(path: Path, summary: dict) -> None:
        raise RuntimeError("killed while writing the summary")

    monkeypatch.setattr(ingest_module, "write_summary", boom)
    with pytest.raises(RuntimeError):
        ingest(data, out, chip_size=16, overwrite=True, progress=False)
    assert state(out) == before and hidden(out) == []


def test_a_kill_inside_the_swap_is_finished_by_the_next_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, out = stack(tmp_path / "stack"), tmp_path / "out"
    ingest(data, out, chip_size=32, progress=False)
    installed = []

    def kill_after_one(source: Path, target: Path) -> None:
        if installed:
            raise KeyboardInterrupt  # as a kill -9 between the two renames: nothing after this runs
        installed.append(target.name)
        os.replace(source, target)

    monkeypatch.setattr(io_module, "_install_file", kill_after_one)
    with pytest.raises(KeyboardInterrupt):
        ingest(data, out, chip_size=16, overwrite=True, progress=False)
    monkeypatch.undo()
    assert installed == ["chips.gpkg"] and len(read_chip_index(out / "chips.gpkg")) == 16
    assert json.loads((out / "summary.json").read_text())["chips_kept"] == 4  # the mix a kill leaves…
    assert [h.split("-")[0] for h in hidden(out)] == [".unit.commit"]
    # …is finished first by the next run, which then finds a complete result and refuses to overwrite it
    with pytest.raises(IngestError, match="summary.json: already exists; pass --overwrite"):
        ingest(data, out, chip_size=8, progress=False)
    kept = json.loads((out / "summary.json").read_text())["chips_kept"]
    assert kept == 16 == len(read_chip_index(out / "chips.gpkg")) and hidden(out) == []


def test_a_rerun_in_a_folder_a_killed_run_left_completes_and_removes_stale_temporaries(tmp_path: Path) -> None:
    data, out = stack(tmp_path / "stack"), tmp_path / "out"
    ingest(data, tmp_path / "other", chip_size=32, progress=False)
    out.mkdir()
    shutil.copy(tmp_path / "other" / "chips.gpkg", out / "chips.gpkg")  # an index without its summary
    stale = [out / ".chips.ab12cd34.gpkg", out / ".chips.ab12cd34.gpkg-journal", out / ".summary.x9y8z7w6.json"]
    for p in stale:
        p.write_bytes(b"x" * 100)
    (out / ".unit.tmp-k3j4h5g6").mkdir()
    (out / ".unit.tmp-k3j4h5g6" / "chips.gpkg").write_bytes(b"partial")
    past = time.time() - 3600
    for p in [*stale, out / ".unit.tmp-k3j4h5g6"]:
        os.utime(p, (past, past))
    concurrent = out / ".chips.zz99zz99.gpkg"  # another run's, started after this one: left alone
    concurrent.write_bytes(b"y")
    future = time.time() + 3600
    os.utime(concurrent, (future, future))
    summary = ingest(data, out, chip_size=16, progress=False)  # no --overwrite needed: nothing complete was there
    assert summary["chips_kept"] == 16 == len(read_chip_index(out / "chips.gpkg"))
    assert json.loads((out / "summary.json").read_text())["chips_kept"] == 16
    assert hidden(out) == [concurrent.name]
    assert len(gpd.read_file(out / "chips.gpkg")) == 16
