"""kill -9 at every phase boundary of ``agrivlm ingest`` and ``agrivlm recipe build``, triggered by a file-system poll.

Each case runs the real command in a subprocess over a folder that already holds a complete earlier result, watches
the folder for the boundary (what the run writes there: its hidden temporary, the files inside it, the commit
point), or kills it while it starts (nothing written yet), and sends SIGKILL as soon as it sees it. Then:

* the folder holds the earlier result byte for byte (a kill before the commit point), or, once what the next run
  does first has run (``recover_folder``: a committed unit is completed), the new result complete; never a mix;
* the rerun of the killed command completes, leaves no hidden temporary, and gives what a clean run gives.

Training and inference are killed mid-run by their own tests (``test_train_curriculum.py``: a resumed stage gives
the same weights to the bit; ``test_infer_cli.py`` / ``test_infer_distributed.py``: no chip lost or doubled).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from recipes_synth import recipe_yaml, write_scene

from agrivlm.geo.index import read_chip_index
from agrivlm.io import recover_folder

#: How often the trigger is polled (the phases watched last from tens of milliseconds to seconds).
POLL_S = 0.002


def kill_when(args: list[str], trigger: Callable[[], bool], timeout: float = 600) -> bool:
    """Run ``args``; SIGKILL it the moment ``trigger()`` holds. True when it was killed, False if it ended first."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    start = time.monotonic()
    try:
        while proc.poll() is None:
            if trigger():
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
                return True
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"{args} ran past {timeout} s")
            time.sleep(POLL_S)
        assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
        return False
    finally:
        if proc.poll() is None:
            proc.kill()


def after(seconds: float) -> Callable[[], bool]:
    """A trigger that holds ``seconds`` after it is made: the run is importing, nothing written yet.

    Later phases that write nothing (opening, validating, scanning) last under a second on a quiet machine, a
    time cannot find them (a 2-s trigger once fired after the run had swapped its result in and was exiting).
    """
    at = time.monotonic() + seconds
    return lambda: time.monotonic() >= at


def temporary(where: Path, pattern: str, holding: str | None = None) -> Callable[[], bool]:
    """A trigger: a folder matching ``where/pattern`` exists (and holds a file matching ``holding``)."""
    return lambda: any(holding is None or any(p.glob(holding)) for p in where.glob(pattern))


def hidden(folder: Path) -> list[Path]:
    """Hidden temporaries in or beside ``folder``."""
    found = [p for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]
    if folder.is_dir():
        found += [p for p in folder.rglob(".*")]
    return found


def files(folder: Path) -> dict[str, bytes]:
    """Every visible file under ``folder`` by relative path."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "agrivlm.cli", *args]


def prepare(root: Path, command: list[str], earlier: list[str], new: list[str],
            result: Callable[[Path], object]) -> dict[str, object]:
    """A case: the earlier complete result (``command + earlier``) and a clean run of the killed command."""
    subprocess.run(cli(*command, *earlier, "--out", str(root / "earlier")), check=True, capture_output=True)
    subprocess.run(cli(*command, *new, "--out", str(root / "clean")), check=True, capture_output=True)
    case = {"root": root, "args": [*command, *new], "result": result, "earlier": result(root / "earlier"),
            "earlier_files": files(root / "earlier"), "clean": result(root / "clean")}
    assert case["earlier"] != case["clean"]
    return case


def kill_then_rerun(case: dict, trigger: Callable[[Path], Callable[[], bool]], tmp_path: Path,
                    committed: bool = False) -> None:
    """Kill the case's command (over a copy of the earlier result) at ``trigger``; check the folder; rerun it.

    ``committed``: the trigger lies past the commit point, where the earlier files may be partly replaced until the
    next run's recovery (``recover_folder``) completes the new result.
    """
    import shutil

    out = tmp_path / "out"
    shutil.copytree(case["root"] / "earlier", out)
    args = cli(*case["args"], "--out", str(out))
    killed = kill_when(args, trigger(out))
    if committed and not killed:
        pytest.skip("the run passed its commit point and finished within one poll (no kill landed there)")
    assert killed, "the run finished before the boundary"
    if not committed:  # before the commit point: the earlier result, byte for byte
        assert files(out) == case["earlier_files"]
    # what any next run does first: a unit past its commit point is completed, one before it removed; so the
    # folder then holds one whole result, never a mix
    recover_folder(out, time.time())
    assert case["result"](out) in (case["earlier"], case["clean"])
    subprocess.run(args, check=True, capture_output=True)  # the rerun removes the killed run's temporaries
    assert case["result"](out) == case["clean"] and hidden(out) == []


# -- ingest ------------------------------------------------------------------------------------------------------------

def _ingest_result(out: Path) -> tuple[dict, list]:
    summary = json.loads((out / "summary.json").read_text())
    for volatile in ("seconds", "created", "index"):
        summary.pop(volatile, None)
    index = read_chip_index(out / "chips.gpkg")
    return summary, [(r.chip_id, r.geometry.wkb) for r in index.itertuples()]


INGEST_BOUNDARIES: dict[str, Callable[[Path], Callable[[], bool]]] = {
    "started (nothing written yet)": lambda out: after(0.3),
    "the unit's temporary made": lambda out: temporary(out, ".unit.tmp-*"),
    "the chip index written into it": lambda out: temporary(out, ".unit.tmp-*", "chips.gpkg"),
    "the commit point passed": lambda out: lambda: any(out.glob(".unit.commit-*")),
}


@pytest.fixture(scope="module")
def ingest_case(tmp_path_factory: pytest.TempPathFactory, sample_root: Path) -> dict[str, object]:
    """The earlier result (chips of 32 px) and a clean run of the killed command (chips of 16 px, stride 8)."""
    base = ["ingest", str(sample_root / "ndvi"), "--masks", str(sample_root / "cloud_mask"), "--no-progress"]
    return prepare(tmp_path_factory.mktemp("ingest_faults"), base, ["--chip-size", "32"],
                   ["--chip-size", "16", "--stride", "8", "--overwrite"], _ingest_result)


@pytest.mark.parametrize("boundary", list(INGEST_BOUNDARIES))
def test_ingest_killed_at_a_boundary_keeps_the_earlier_result_and_the_rerun_completes(
    ingest_case: dict, boundary: str, tmp_path: Path
) -> None:
    kill_then_rerun(ingest_case, INGEST_BOUNDARIES[boundary], tmp_path, committed=boundary == "the commit point passed")


# -- recipe build ------------------------------------------------------------------------------------------------------

def _recipe_result(out: Path) -> dict[str, object]:
    """Shards, manifest and tables; a GeoPackage by its layers' rows (its bytes hold the time it was written)."""
    import geopandas as gpd
    import pyogrio

    got: dict[str, object] = {}
    for k, v in files(out).items():
        if k.endswith(".gpkg"):
            got[k] = {name: gpd.read_file(out / k, layer=name).to_json()
                      for name, _ in pyogrio.list_layers(out / k)}
        elif k.startswith(("shards/", "manifest.json", "tables/")):
            got[k] = v
    return got


RECIPE_BOUNDARIES: dict[str, Callable[[Path], Callable[[], bool]]] = {
    "started (nothing written yet)": lambda out: after(0.3),
    "the output's temporary made": lambda out: temporary(out.parent, f".{out.name}.tmp-*"),
    "its shards written": lambda out: temporary(out.parent, f".{out.name}.tmp-*", "shards/*.jsonl"),
    "its tables written": lambda out: temporary(out.parent, f".{out.name}.tmp-*", "tables/*"),
}


@pytest.fixture(scope="module")
def recipe_case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The earlier result (seed 3) and a clean build of the killed command (seed 5)."""
    root = tmp_path_factory.mktemp("recipe_faults")
    paths = write_scene(root / "scene")
    (root / "recipe.yaml").write_text(recipe_yaml(paths, name="faults"))
    case = prepare(root, ["recipe", "build", "--recipe", str(root / "recipe.yaml"), "--no-progress"], [],
                   ["--seed", "5", "--overwrite"], _recipe_result)
    assert any(k.startswith("shards/") for k in case["clean"])  # type: ignore[union-attr]
    return case


@pytest.mark.parametrize("boundary", list(RECIPE_BOUNDARIES))
def test_recipe_build_killed_at_a_boundary_keeps_the_earlier_result_and_the_rerun_completes(
    recipe_case: dict, boundary: str, tmp_path: Path
) -> None:
    # the swap is one rename after everything is written: a kill before it leaves the earlier output whole
    kill_then_rerun(recipe_case, RECIPE_BOUNDARIES[boundary], tmp_path)
