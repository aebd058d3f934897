"""Ingestion on a dask.distributed LocalCluster: same outputs as one process, and a killed worker loses nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
from cluster_helpers import rescheduled, worker_killer
from rasters import smooth_field, write_raster

from agrivlm.errors import IngestError
from agrivlm.geo import ChipStream, open_stack
from agrivlm.geo.distributed import TaskResult, dask_client, distributed_chips, merge_results, split_tasks
from agrivlm.geo.index import build_chip_index, read_chip_index
from agrivlm.geo.ingest import ingest

ROOT = Path(__file__).resolve().parents[1]


def _stack(folder: Path, n_dates: int = 5, size: int = 96, bands: int = 2) -> tuple[Path, Path]:
    """uint16 dates (nodata 0) whose bottom-right corner never has data, with cloud masks on odd dates."""
    data_dir, mask_dir = folder / "data", folder / "masks"
    for k in range(n_dates):
        data = (smooth_field(size, size, bands=bands, seed=2, t=0.5 * k) * 3000 + 100).astype(np.uint16)
        data[:, size * 3 // 4 :, size * 3 // 4 :] = 0  # all-nodata chips, skipped
        data[:, : 4 * k, : 7 * k] = 0
        write_raster(data_dir / f"S2_2022{k + 4:02d}01.tif", data, nodata=0, tiled=True, blocksize=32)
        if k % 2:
            clouds = (smooth_field(size, size, seed=7 + k)[0] > 0.55).astype(np.uint8)[None]
            write_raster(mask_dir / f"CLM_2022{k + 4:02d}01.tif", clouds, nodata=None, tiled=True, blocksize=32)
    return data_dir, mask_dir


@pytest.fixture(scope="module")
def client():
    with dask_client(workers=2) as c:  # agrivlm's own LocalCluster path (2 single-threaded processes)
        yield c


def _frames_equal(a: gpd.GeoDataFrame, b: gpd.GeoDataFrame) -> None:
    assert list(a.columns) == list(b.columns)
    assert a.crs == b.crs
    assert list(a.chip_id) == list(b.chip_id)
    for col in a.columns:
        if col == "geometry":
            assert all(x.equals_exact(y, 0) for x, y in zip(a.geometry, b.geometry, strict=True))
        else:
            assert list(a[col]) == list(b[col]), col


def test_merge_drops_duplicates_and_refuses_missing_chips() -> None:
    row = {"chip_id": "r000000_c000000", "chip_index": 0}
    merged = merge_results([TaskResult([row], [(1, "r000000_c000016")]), TaskResult([dict(row)], [])], 2)
    assert merged.duplicates == 1 and [r["chip_id"] for r in merged.rows] == ["r000000_c000000"]
    assert merged.skipped_ids == ["r000000_c000016"]
    with pytest.raises(IngestError, match=r"returned 2 of 3 chips \(first missing chip index: 2\)"):
        merge_results([TaskResult([row], [(1, "r000000_c000016")])], 3)


def test_tasks_split_groups_evenly(tmp_path: Path) -> None:
    stack = open_stack(_stack(tmp_path, n_dates=1)[0])
    groups = ChipStream(stack, chip_size=16).groups()
    tasks = split_tasks(groups, 4)
    assert [g for t in tasks for g in t] == groups and len(tasks) == 4
    sizes = [sum(len(g.members) for g in t) for t in tasks]
    assert max(sizes) - min(sizes) <= max(len(g.members) for g in groups)
    assert split_tasks(groups[:2], 8) == [[groups[0]], [groups[1]]]


def test_cluster_ingest_equals_single_process(tmp_path: Path, client) -> None:
    data_dir, mask_dir = _stack(tmp_path)
    kwargs = {"chip_size": 16, "stride": 12, "masks": mask_dir, "progress": False}
    one = ingest(data_dir, tmp_path / "one", **kwargs)
    dist = ingest(data_dir, tmp_path / "dist", scheduler=client.scheduler.address, **kwargs)
    assert one["chips_skipped_nodata"] > 0 and one["chips_kept"] > 0
    assert {k: v for k, v in one.items() if k != "index"} == {k: v for k, v in dist.items() if k != "index"}
    _frames_equal(read_chip_index(tmp_path / "one" / "chips.gpkg"), read_chip_index(tmp_path / "dist" / "chips.gpkg"))

    # the CLI's --scheduler reaches the same cluster and writes the same index
    res = subprocess.run(
        [sys.executable, "-m", "agrivlm.cli", "ingest", str(data_dir), "--masks", str(mask_dir), "--out",
         str(tmp_path / "cli"), "--chip-size", "16", "--stride", "12", "--scheduler", client.scheduler.address,
         "--format", "parquet", "--no-progress"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr
    assert "INFO distributed" not in res.stderr  # the cluster's chatter stays quiet without -vv
    single = read_chip_index(tmp_path / "one" / "chips.gpkg")
    _frames_equal(single, gpd.read_parquet(tmp_path / "cli" / "chips.parquet"))
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["chips_kept"] == one["chips_kept"]


def test_cluster_workers_read_a_stac_catalogue_over_http(tmp_path: Path, client) -> None:
    """The workers validate and chip a STAC stack served over HTTP (the items' VRTs travel to them whole): the same
    chip index as the local files in one process."""
    from http_helpers import item_collection, serve, stac_item

    data_dir, mask_dir = _stack(tmp_path / "www")
    one = ingest(data_dir, tmp_path / "one", chip_size=16, stride=12, masks=mask_dir, progress=False)
    with serve(tmp_path / "www") as srv:
        items = []
        for f in sorted(data_dir.glob("*.tif")):
            day = f.stem.split("_")[1]
            mask = mask_dir / f"CLM_{day}.tif"
            assets = {"data": f"{srv.url}/data/{f.name}"} | ({"clm": f"{srv.url}/masks/{mask.name}"}
                                                            if mask.is_file() else {})
            items.append(stac_item(f.stem, f"{day[:4]}-{day[4:6]}-{day[6:]}T00:00:00Z", assets))
        (tmp_path / "items.json").write_text(json.dumps(item_collection(items)))
        (tmp_path / "masks.json").write_text(json.dumps(item_collection([i for i in items if "clm" in i["assets"]])))
        dist = ingest(tmp_path / "items.json", tmp_path / "dist", chip_size=16, stride=12, progress=False,
                      masks=tmp_path / "masks.json", assets=["data"], mask_assets=["clm"],
                      scheduler=client.scheduler.address)
    keys = ("chips_kept", "chips_skipped_nodata", "dates", "height", "width", "transform", "unmasked_dates")
    assert {k: dist[k] for k in keys} == {k: one[k] for k in keys} and one["chips_kept"] > 0
    a = read_chip_index(tmp_path / "one" / "chips.gpkg")
    b = read_chip_index(tmp_path / "dist" / "chips.gpkg")
    assert list(a.chip_id) == list(b.chip_id) and all(a.geometry.geom_equals(b.geometry))
    for col in a.columns:  # the files column names the items (<id>.vrt) instead of the files
        if col not in ("geometry", "files"):
            assert list(a[col]) == list(b[col]), col


def test_bad_scheduler_and_both_options_are_clear_errors(tmp_path: Path) -> None:
    data_dir, _ = _stack(tmp_path, n_dates=1, size=32)
    with pytest.raises(IngestError, match="not both"):
        ingest(data_dir, tmp_path / "o", chip_size=16, workers=2, scheduler="tcp://127.0.0.1:1", progress=False)
    res = subprocess.run(
        [sys.executable, "-m", "agrivlm.cli", "ingest", str(data_dir), "--out", str(tmp_path / "o"),
         "--chip-size", "16", "--scheduler", "tcp://127.0.0.1:1", "--no-progress"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert res.returncode == 1 and "cannot reach the dask scheduler at tcp://127.0.0.1:1" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "o").exists()


def test_killed_worker_loses_and_duplicates_nothing(tmp_path: Path, client) -> None:
    data_dir, mask_dir = _stack(tmp_path, n_dates=6, size=160)
    expected = build_chip_index(ChipStream(open_stack(data_dir, masks=mask_dir), chip_size=16), progress=False)

    kill_a_busy_worker, killed = worker_killer(client)
    stream = ChipStream(open_stack(data_dir, masks=mask_dir), chip_size=16)
    merged = distributed_chips(stream, client, on_task_done=kill_a_busy_worker, tasks_per_thread=12)
    assert killed and killed["remaining"] >= 10
    # the scheduler saw the worker go and ran its tasks again elsewhere
    assert killed["addr"] not in client.scheduler_info()["workers"]
    assert rescheduled(client, "agrivlm-chips"), "no task was rescheduled after the kill"
    # nothing lost, nothing duplicated: exactly the single-process rows
    assert merged.duplicates == 0
    assert [r["chip_id"] for r in merged.rows] == list(expected.chip_id)
    assert len({r["chip_id"] for r in merged.rows}) + len(merged.skipped_ids) == len(stream)
    for row, (_, exp) in zip(merged.rows, expected.iterrows(), strict=True):
        assert row["transform"] == exp["transform"] and row["clear_fraction"] == exp["clear_fraction"]
        assert row["valid_fraction"] == exp["valid_fraction"]
