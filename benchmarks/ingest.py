"""Chip-stream throughput: agrivlm against raw rasterio, torchgeo and rioxarray+dask, side by side.

Every reader cuts the same chip grid (``--chip-size``, no overlap) of the same generated stacks
(S2-like uint16, ``--bands`` bands, ``--dates`` dates, one GeoTIFF per date; see ``synth.py``) in four
layouts (striped DEFLATE, COG 512-px DEFLATE+PREDICTOR=2, COG ZSTD, uncompressed) with the same
number of workers, and delivers every chip as ``(T, C, h, w)``:

* ``agrivlm``: ``ChipStream(open_stack(files), workers=N)`` → float32 chips + nodata/cloud masks;
* ``agrivlm native``: the same with ``native=True`` → chips in the files' data type (uint16) + the same masks;
* ``agrivlm per-chip``: ``Stack.read_window`` chip by chip on N threads (no grouping), for reference;
* ``raw rasterio``: ``DatasetReader.read`` of block-aligned windows covering the chips, every date,
  N threads with their own handles, native dtype, nothing else: the practical ceiling;
* ``torchgeo``: ``RasterDataset`` + ``GridGeoSampler`` + ``DataLoader(num_workers=N)``; torchgeo
  merges the files of a query instead of stacking dates, so each chip is one query per date (its
  issue #2221: the area is re-read for every date), stacked into ``(T, C, h, w)``;
* ``rioxarray+dask``: ``open_rasterio(chunks=<file blocks>)`` per date, ``xr.concat`` over time, the
  chips of one chunk row sliced and computed together on the threaded scheduler (N workers).

Also measured: the decode ceiling, ``cores × single-core MB/s`` of raw block-aligned reads (one
thread, the same tiles), and each reader's decoded MB/s as a fraction of it; how agrivlm's chips/s
changes as the raster grows (``--growth``); that every agrivlm chip's transform equals the source
geotransform shifted by its window; that sampled agrivlm chips equal raw rasterio reads.

Each reader runs in its own long-lived subprocess (so GDAL block caches and CPU accounting are
separate; CPU-seconds include DataLoader worker processes); runs alternate between readers, in a
rotated order, ``--reps`` times (25 by default: with 3, two runs' ratios differed by up to 2x; with 15, one ratio of 20
differed by 10.5 %, with 25 none by more than 9.4 %), and the table
gives medians; a ratio to raw rasterio is the ratio of the two readers' fastest repetitions (interference only
slows a run: see :func:`summarise`), printed beside the range and median of each repetition's own ratio. This
machine is shared, so timings are noisy: compare the ratios, not the absolute numbers. ``--compare A.json
B.json`` prints two runs' ratios side by side with their largest difference (the stability claim).

Run (the core venv: the torchgeo column then says "not installed")::

    python benchmarks/ingest.py                       # defaults: --size 1024 --dates 24 --bands 4
    python benchmarks/ingest.py --size 2048 --reps 5  # bigger, steadier

With torchgeo, from its own venv (``benchmarks/requirements-torchgeo.txt`` says how to make it),
either running everything there or only the torchgeo column::

    /work/venvs/torchgeo/bin/python benchmarks/ingest.py
    python benchmarks/ingest.py --torchgeo-python /work/venvs/torchgeo/bin/python

Writes ``benchmarks/results/ingest.json`` and ``ingest.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: import this checkout's agrivlm, not an installed one
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import rasterio  # noqa: E402

READERS = ["agrivlm", "agrivlm native", "agrivlm per-chip", "raw rasterio", "torchgeo", "rioxarray+dask"]


# ---------------------------------------------------------------------------------------------------
# readers (each runs inside a server subprocess; returns chips, decoded bytes, and checks)
# ---------------------------------------------------------------------------------------------------
def _grid(files: list[str]) -> tuple[int, int, tuple[int, int], Any, int, int, str]:
    with rasterio.open(files[0]) as ds:
        return ds.height, ds.width, ds.block_shapes[0], ds.transform, ds.count, len(files), ds.dtypes[0]


def _chip_bytes(files: list[str], chip: int) -> int:
    _, _, _, _, count, n_dates, dtype = _grid(files)
    return n_dates * count * chip * chip * np.dtype(dtype).itemsize


def read_agrivlm(files: list[str], chip: int, workers: int, native: bool = False) -> dict[str, Any]:
    from affine import Affine

    from agrivlm.geo import ChipStream, open_stack

    t0 = time.perf_counter()
    src_transform = _grid(files)[3]
    stack = open_stack(files)
    n, transforms_ok, first_s = 0, True, 0.0
    for c in ChipStream(stack, chip_size=chip, workers=workers, skip_empty=False, native=native):
        n += 1
        if n == 1:
            first_s = time.perf_counter() - t0  # opening the stack and the first group
        w = c.window
        transforms_ok &= c.grid.transform == src_transform * Affine.translation(w.col_off, w.row_off)
    return {"chips": n, "bytes": n * _chip_bytes(files, chip), "transforms_ok": bool(transforms_ok),
            "first_chip_s": first_s}


def read_agrivlm_native(files: list[str], chip: int, workers: int) -> dict[str, Any]:
    """:func:`read_agrivlm` with ``ChipStream(native=True)``: chips in the files' own data type."""
    return read_agrivlm(files, chip, workers, native=True)


def read_agrivlm_per_chip(files: list[str], chip: int, workers: int) -> dict[str, Any]:
    from agrivlm.geo import chip_windows, open_stack

    stack = open_stack(files)
    windows = chip_windows(stack.grid.height, stack.grid.width, chip)
    with stack, ThreadPoolExecutor(max(workers, 1)) as pool:
        n = sum(1 for _ in pool.map(stack.read_window, windows))
    return {"chips": n, "bytes": n * _chip_bytes(files, chip)}


def block_windows(files: list[str], chip: int) -> list[Any]:
    """Block-aligned windows covering the chip grid (each block of a file in exactly one)."""
    from agrivlm.geo.chips import chip_groups

    h, w, block, *_ = _grid(files)
    return [g.window for g in chip_groups(h, w, chip, block_shape=block, max_group_bytes=2**62)]


def read_raw(files: list[str], chip: int, workers: int, dates: int | None = None) -> dict[str, Any]:
    local = threading.local()
    opened: list[Any] = []
    lock = threading.Lock()
    todo = files[:dates] if dates else files

    def read(window: Any) -> int:
        handles = getattr(local, "handles", None)
        if handles is None:
            handles = local.handles = [rasterio.open(f) for f in todo]
            with lock:
                opened.extend(handles)
        return sum(ds.read(window=window).nbytes for ds in handles)

    from agrivlm.geo import chip_windows

    windows = block_windows(files, chip)
    h, w, *_ = _grid(files)
    n_chips = len(chip_windows(h, w, chip))  # the chips these windows hold
    try:
        if workers <= 1:
            nbytes = sum(read(w) for w in windows)
        else:
            with ThreadPoolExecutor(workers) as pool:
                nbytes = sum(pool.map(read, windows))
    finally:
        for ds in opened:
            ds.close()
    return {"chips": n_chips * len(todo) / len(files), "bytes": nbytes}


def read_decode_1core(files: list[str], chip: int, workers: int) -> dict[str, Any]:
    """One thread, raw block-aligned reads of the first dates: single-core decode speed."""
    return read_raw(files, chip, 1, dates=max(2, len(files) // 4))


def read_torchgeo(files: list[str], chip: int, workers: int, max_chips: int = 0) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader, Dataset
    from torchgeo.datasets import RasterDataset, stack_samples
    from torchgeo.samplers import GridGeoSampler

    class S2Dates(RasterDataset):  # one file per date, the date in the name
        filename_glob = "S2_*.tif"
        filename_regex = r"S2_(?P<date>\d{8})\.tif"
        date_format = "%Y%m%d"
        is_image = True

    dataset = S2Dates(paths=str(Path(files[0]).parent))
    intervals = sorted(dataset.index.index, key=lambda iv: iv.left)

    class Multitemporal(Dataset):  # type: ignore[type-arg]
        """(T, C, h, w) per chip: torchgeo answers one date per query (it mosaics, never stacks)."""

        def __getitem__(self, query: Any) -> dict[str, Any]:
            x, y, _ = query
            frames = [dataset[x, y, iv.left : iv.right]["image"] for iv in intervals]
            return {"image": torch.stack(frames), "bounds": query}

    sampler: Any = GridGeoSampler(dataset, size=chip, stride=chip, toi=intervals[0])
    if max_chips:  # the first chips of the grid only (torchgeo is slow); rates are per chip
        sampler = list(sampler)[:max_chips]
    bands = _grid(files)[4]
    loader = DataLoader(Multitemporal(), sampler=sampler, batch_size=1, num_workers=workers,
                        collate_fn=stack_samples)
    n = 0
    for batch in loader:
        n += batch["image"].shape[0]
        assert batch["image"].shape[1:] == (len(intervals), bands, chip, chip), batch["image"].shape
    return {"chips": n, "bytes": n * _chip_bytes(files, chip)}


def read_rioxarray(files: list[str], chip: int, workers: int) -> dict[str, Any]:
    import dask
    import rioxarray
    import xarray as xr

    h, w, (bh, bw), *_ = _grid(files)
    cy = bh if bh >= chip else chip  # one chunk = the file's tile, or a chip-tall strip
    cx = bw if bh >= chip else w
    arrays = [rioxarray.open_rasterio(f, chunks={"band": -1, "y": cy, "x": cx}, lock=False, cache=False)
              for f in files]
    try:
        stack = xr.concat(arrays, dim="time")
        n = 0
        for r0 in range(0, h - chip + 1, cy):  # the chips of one chunk row, computed together
            rows = [r for r in range(r0, min(r0 + cy, h - chip + 1), chip)]
            parts = [stack.data[:, :, r : r + chip, c : c + chip] for r in rows for c in range(0, w - chip + 1, chip)]
            out = dask.compute(*parts, scheduler="threads", num_workers=workers)
            n += len(out)
    finally:
        for a in arrays:
            a.close()
    return {"chips": n, "bytes": n * _chip_bytes(files, chip)}


RUNNERS: dict[str, Callable[[list[str], int, int], dict[str, Any]]] = {
    "agrivlm": read_agrivlm,
    "agrivlm native": read_agrivlm_native,
    "agrivlm per-chip": read_agrivlm_per_chip,
    "raw rasterio": read_raw,
    "decode 1 core": read_decode_1core,
    "torchgeo": read_torchgeo,
    "rioxarray+dask": read_rioxarray,
}


def measure(reader: str, files: list[str], chip: int, workers: int, **kwargs: Any) -> dict[str, Any]:
    """Run one reader once; wall seconds, CPU seconds (threads and reaped child processes)."""
    before, t0 = os.times(), time.perf_counter()
    out = RUNNERS[reader](files, chip, workers, **kwargs)
    wall, after = time.perf_counter() - t0, os.times()
    cpu = sum(getattr(after, k) - getattr(before, k) for k in ("user", "system", "children_user", "children_system"))
    return {**out, "wall_s": wall, "cpu_s": cpu}


#: Modules each reader imports, loaded before the first timed run.
PREIMPORT = {
    "agrivlm": ["agrivlm.geo", "affine"],
    "agrivlm native": ["agrivlm.geo", "affine"],
    "agrivlm per-chip": ["agrivlm.geo"],
    "raw rasterio": ["agrivlm.geo.chips"],
    "torchgeo": ["torch", "torchgeo.datasets", "torchgeo.samplers"],
    "rioxarray+dask": ["rioxarray", "xarray", "dask", "dask.array", "agrivlm.geo.chips"],
}


def serve(reader: str) -> None:
    """Subprocess loop: one JSON request per stdin line → one JSON result per stdout line."""
    import importlib

    out = sys.stdout
    sys.stdout = sys.stderr  # progress and warnings must not corrupt the protocol
    for name in PREIMPORT.get(reader, []):
        importlib.import_module(name)
    out.write(json.dumps({"ready": reader}) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        try:
            res = measure(req["reader"], req["files"], req["chip"], req["workers"], **req.get("kwargs", {}))
        except Exception as exc:  # reported to the parent, which prints it and stops
            res = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(res) + "\n")
        out.flush()


class Server:
    """A reader's long-lived subprocess."""

    def __init__(self, python: str, reader: str) -> None:
        self.proc = subprocess.Popen([python, __file__, "--serve", reader], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.proc.stdout is not None
        ready = self.proc.stdout.readline()  # imports done: they never overlap a timed run
        if not ready:
            raise RuntimeError(f"{reader}: the reader's process failed to start (exit {self.proc.wait()})")

    def run(self, reader: str, files: list[str], chip: int, workers: int, **kwargs: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        req = {"reader": reader, "files": files, "chip": chip, "workers": workers, "kwargs": kwargs}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{reader}: the reader's process died (exit {self.proc.wait()})")
        res = json.loads(line)
        if "error" in res:
            raise RuntimeError(f"{reader}: {res['error']}")
        return res

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def has_torchgeo(python: str) -> str | None:
    """torchgeo's version under ``python``, or None."""
    res = subprocess.run([python, "-c", "import torchgeo; print(torchgeo.__version__)"], capture_output=True,
                         text=True)
    return res.stdout.strip() if res.returncode == 0 else None


def warm_page_cache(files: list[Path]) -> None:
    """Read every file once, so no reader pays for the disk and all read from the page cache."""
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def spot_check(files: list[Path], chip: int) -> int:
    """Compare a few agrivlm chips with raw rasterio window reads (nodata → NaN); return chips checked."""
    from agrivlm.geo import ChipStream, open_stack

    stack = open_stack(files)
    stream = ChipStream(stack, chip_size=chip, skip_empty=False)
    chosen = {0, len(stream) // 2, len(stream) - 1}
    checked = 0
    for c in stream:
        if c.index not in chosen:
            continue
        for t in (0, len(files) // 2, len(files) - 1):
            with rasterio.open(files[t]) as ds:
                raw = ds.read(window=c.window)
            np.testing.assert_array_equal(c.nodata[t], raw == 0)
            np.testing.assert_array_equal(c.data[t][raw != 0], raw[raw != 0].astype(np.float32))
        checked += 1
    return checked


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def rate(res: dict[str, Any], key: str) -> float:
    """``res[key]`` per wall second of one repetition."""
    return res[key] / res["wall_s"]


def summarise(runs: dict[str, dict[str, list[dict[str, Any]]]], layouts: list[str], readers: list[str],
              cores: int) -> dict[str, dict[str, dict[str, Any]]]:
    """Per layout and reader: median rates over the repetitions and the ratios to raw rasterio.

    ``x_raw`` is the ratio of the two readers' fastest repetitions (``best_mb_per_s``). On a shared machine
    interference only ever slows a run, so a reader's fastest repetition is its steadiest estimate (``timeit``
    takes the minimum for the same reason): on this VM, two ``--reps 15`` runs gave median-of-paired ratios up to
    23 % apart (uncompressed float32 0.71 and 0.54, each repetition's own ratio ranging 0.38-0.98), and ratios of
    the fastest repetitions at most 7 % apart on every layout and reader; two later runs: 19 of 20 ratios within
    10 %, the worst float32 chips on COG DEFLATE, 10.5 %; two ``--reps 25`` runs (the default since): every ratio
    within 9.4 %, float32 chips within 7.9 %, native chips within 5.1 %. The median of each repetition's own
    ratio stays beside it (``x_raw_paired``, with ``x_raw_runs`` and their range ``x_raw_spread``).
    """
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for layout in layouts:
        table[layout] = {}
        one = runs[layout]["decode 1 core"]
        ceiling = cores * median([rate(r, "bytes") for r in one]) / 1e6
        for reader in [*readers, "decode 1 core"]:
            rs = runs[layout].get(reader)
            if not rs:
                table[layout][reader] = {"status": "not installed" if reader == "torchgeo" else "not run"}
                continue
            table[layout][reader] = {
                "chips_per_s": median([rate(r, "chips") for r in rs]),
                "mb_per_s": median([rate(r, "bytes") for r in rs]) / 1e6,
                "best_chips_per_s": max(rate(r, "chips") for r in rs),
                "best_mb_per_s": max(rate(r, "bytes") for r in rs) / 1e6,
                "cpu_s_per_chip": median([r["cpu_s"] / r["chips"] for r in rs]),
                "chips": rs[0]["chips"],
                "wall_s": [r["wall_s"] for r in rs],
                "transforms_ok": all(r.get("transforms_ok", True) for r in rs),
            }
        table[layout]["decode ceiling"] = {"mb_per_s": ceiling}
        _ratios(table[layout], runs[layout], readers, ceiling)
    return table


def _ratios(ref: dict[str, dict[str, Any]], runs: dict[str, list[dict[str, Any]]], readers: list[str],
            ceiling: float) -> None:
    raw_runs = runs.get("raw rasterio") or []
    raw = ref.get("raw rasterio", {})
    for reader in readers:
        row = ref[reader]
        if "mb_per_s" not in row:
            continue
        row["x_ceiling"] = row["mb_per_s"] / ceiling
        if raw_runs:
            row["x_raw"] = row["best_mb_per_s"] / raw["best_mb_per_s"]
            # each repetition's own ratio (the two readers ran minutes apart at most, in one rotation)
            paired = [rate(r, "bytes") / rate(q, "bytes") for r, q in zip(runs[reader], raw_runs, strict=True)]
            row["x_raw_paired"] = median(paired)
            row["x_raw_runs"] = paired
            row["x_raw_spread"] = [min(paired), max(paired)]
    agri = ref.get("agrivlm", {})
    if "best_chips_per_s" in agri:
        for other in ("torchgeo", "rioxarray+dask", "agrivlm per-chip"):
            if "best_chips_per_s" in ref.get(other, {}):
                agri[f"x_{other}"] = agri["best_chips_per_s"] / ref[other]["best_chips_per_s"]


def compare(paths: list[Path]) -> dict[str, dict[str, list[float]]]:
    """Every ``x_raw`` of two (or more) reports side by side, with the largest relative difference; printed."""
    reports = []
    for path in paths:
        try:
            reports.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as exc:
            raise SystemExit(f"{path}: not an ingest.json of this benchmark ({exc})") from None
    out: dict[str, dict[str, list[float]]] = {}
    print(f"{'layout':16s} {'reader':17s} " + " ".join(f"{'run ' + str(k + 1):>7s}" for k in range(len(paths)))
          + "  max diff")
    worst = 0.0
    for layout, rows in reports[0]["layouts"].items():
        for reader, row in rows.items():
            vals = [r["layouts"].get(layout, {}).get(reader, {}).get("x_raw") for r in reports]
            if reader == "raw rasterio" or "x_raw" not in row or any(v is None for v in vals):
                continue
            diff = (max(vals) - min(vals)) / max(vals)
            worst = max(worst, diff)
            out.setdefault(layout, {})[reader] = [*vals, diff]
            print(f"{layout:16s} {reader:17s} " + " ".join(f"{v:7.2f}" for v in vals) + f"  {diff:8.1%}")
    print(f"largest difference between the runs: {worst:.1%} (target: within 10 %)")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024, help="raster height = width in pixels (default 1024)")
    ap.add_argument("--dates", type=int, default=24, help="dates (files) per stack (default 24)")
    ap.add_argument("--bands", type=int, default=4, help="bands per file (default 4)")
    ap.add_argument("--chip-size", type=int, default=256, help="chip size in pixels (default 256)")
    ap.add_argument("--workers", type=int, default=2, help="workers of every reader (default 2)")
    ap.add_argument("--reps", type=int, default=25, help="alternated repetitions per reader and layout (default 25)")
    ap.add_argument("--layouts", default="striped_deflate,cog_deflate,cog_zstd,uncompressed")
    ap.add_argument("--readers", default=",".join(READERS))
    ap.add_argument("--torchgeo-chips", type=int, default=4,
                    help="torchgeo reads only the first N chips of the grid (it is slow; rates are per chip; 0 = all)")
    ap.add_argument("--growth", default="full,double,quad",
                    help="agrivlm chips/s on cog_zstd at sizes: half/full/double/quad of --size or px ('' = skip)")
    ap.add_argument("--growth-bands", type=int, default=1,
                    help="bands of the growth series' stacks (default 1, so the largest stays quick to write)")
    ap.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "agrivlm_bench",
                    help="generated stacks are kept here and reused")
    ap.add_argument("--torchgeo-python", default=sys.executable,
                    help="Python with torchgeo installed, for the torchgeo column (default: this one)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--compare", nargs="+", type=Path, default=None, metavar="JSON",
                    help="print the x raw ratios of earlier runs' ingest.json side by side and exit")
    args = ap.parse_args(argv)
    if args.compare:
        compare(args.compare)
        return {}
    if args.serve:
        serve(args.serve)
        return {}

    import synth

    layouts = [x for x in args.layouts.split(",") if x]
    readers = [x for x in args.readers.split(",") if x]
    tg_version = has_torchgeo(args.torchgeo_python) if "torchgeo" in readers else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    print(f"stacks: {args.dates} dates x {args.bands} bands uint16, {args.size}x{args.size} px, "
          f"chips {args.chip_size} px, {args.workers} workers, {args.reps} reps, {cores} cores; "
          f"torchgeo {tg_version or 'not installed'}", flush=True)
    stacks = synth.ensure_stacks(args.data_dir, layouts, args.size, args.dates, args.bands)

    growth_sizes = []
    for item in [x for x in args.growth.split(",") if x]:
        size = {"half": args.size // 2, "full": args.size, "double": args.size * 2, "quad": args.size * 4}.get(item)
        size = size or int(item)
        growth_sizes.append(size)
    growth_stacks = {s: synth.ensure_stacks(args.data_dir, ["cog_zstd"], s, args.dates, args.growth_bands)["cog_zstd"]
                     for s in growth_sizes}

    checked = {layout: spot_check(paths, args.chip_size) for layout, paths in stacks.items()}
    for paths in list(stacks.values()) + list(growth_stacks.values()):
        warm_page_cache(paths)

    active = [r for r in readers if r != "torchgeo" or tg_version]
    servers = {r: Server(args.torchgeo_python if r == "torchgeo" else sys.executable, r) for r in active}
    servers["decode 1 core"] = servers.get("raw rasterio") or Server(sys.executable, "raw rasterio")
    # the growth series in a process of its own, so a reader's process measures that reader only. With the series
    # in the agrivlm reader's process its float32 chips on COG ZSTD scored 0.68 and 0.79 x raw in two runs, apart
    # 0.79 and 0.81; their repetitions spread either way (0.40-0.84 s, native chips 0.34-0.51 s), cause not found
    growth_server = Server(sys.executable, "agrivlm") if growth_sizes and "agrivlm" in active else None
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {layout: {r: [] for r in [*active, "decode 1 core"]}
                                                        for layout in layouts}
    growth: dict[int, list[dict[str, Any]]] = {s: [] for s in growth_sizes}
    t_start = time.perf_counter()
    try:
        for rep in range(args.reps):
            for layout in layouts:
                files = [str(p) for p in stacks[layout]]
                order = [*active, "decode 1 core"]
                k = rep % len(order)
                for reader in order[k:] + order[:k]:  # alternate, rotated each repetition
                    extra = {"max_chips": args.torchgeo_chips} if reader == "torchgeo" else {}
                    res = servers[reader].run(reader, files, args.chip_size, args.workers, **extra)
                    runs[layout][reader].append(res)
                    print(f"  rep {rep + 1} {layout:16s} {reader:18s} {res['chips']:7.1f} chips "
                          f"{res['wall_s']:7.2f} s  {res['bytes'] / res['wall_s'] / 1e6:7.1f} MB/s", flush=True)
            for size in growth_sizes:
                files = [str(p) for p in growth_stacks[size]]
                growth[size].append(growth_server.run("agrivlm", files, args.chip_size, args.workers)
                                    if growth_server is not None else {})
    finally:
        for srv in {id(s): s for s in [*servers.values(), *([growth_server] if growth_server else [])]}.values():
            srv.close()

    table = summarise(runs, layouts, readers, cores)
    growth_rows = {size: {"chips_per_s": median([r["chips"] / r["wall_s"] for r in rs if r]),
                          "mb_per_s": median([r["bytes"] / r["wall_s"] / 1e6 for r in rs if r]),
                          "first_chip_s": median([r["first_chip_s"] for r in rs if r]),
                          # after the first chip: without the constant start-up (opening files, first group)
                          "after_first_chips_per_s": median([(r["chips"] - 1) / (r["wall_s"] - r["first_chip_s"])
                                                             for r in rs if r and r["chips"] > 1]),
                          "chips": rs[0].get("chips", 0) if rs else 0}
                   for size, rs in growth.items()}
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": cores,
                    "python": platform.python_version(), "gdal": rasterio.__gdal_version__,
                    "rasterio": rasterio.__version__, "torchgeo": tg_version,
                    "note": "shared machine: medians of alternated runs; ratios of each reader's fastest run"},
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "serve"},
        "layouts": table,
        "growth_chips_per_s": {str(k): v for k, v in growth_rows.items()},
        "spot_checked_chips": checked,
        "elapsed_s": time.perf_counter() - t_start,
    }
    print_table(report, readers)
    write_outputs(report, readers, args.out)
    return report


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or not np.isfinite(x) else format(x, spec)


def print_table(report: dict[str, Any], readers: list[str]) -> None:
    p = report["params"]
    print(f"\nchip stream, {p['dates']} dates x {p['bands']} bands uint16, {p['size']}x{p['size']} px, "
          f"chip {p['chip_size']} px, {p['workers']} workers; medians of {p['reps']} alternated runs "
          "(x raw: the ratio of the fastest repetitions; [min-max]: each repetition's own ratio, "
          "x paired: their median)")
    head = (f"{'layout':16s} {'reader':17s} {'chips/s':>8s} {'MB/s':>7s} {'CPU s/chip':>10s} "
            f"{'x raw':>6s} {'[min-max]':11s} {'x paired':>8s} {'x ceiling':>9s}  agrivlm x")
    print(head)
    print("-" * len(head))
    for layout, rows in report["layouts"].items():
        for reader in readers:
            row = rows[reader]
            if "status" in row:
                print(f"{layout:16s} {reader:17s} {row['status']:>8s}")
                continue
            extra = ""
            if reader == "agrivlm":
                extra = "  ".join(f"{k[2:]} {v:.1f}" for k, v in row.items()
                                  if k.startswith("x_") and not k.startswith("x_raw") and k != "x_ceiling")
            lo, hi = row.get("x_raw_spread") or (None, None)
            spread = f"[{_fmt(lo, '.2f')}-{_fmt(hi, '.2f')}]" if lo is not None else ""
            print(f"{layout:16s} {reader:17s} {_fmt(row['chips_per_s'], '8.2f')} {_fmt(row['mb_per_s'], '7.0f')} "
                  f"{_fmt(row['cpu_s_per_chip'], '10.3f')} {_fmt(row.get('x_raw'), '6.2f')} {spread:11s} "
                  f"{_fmt(row.get('x_raw_paired'), '8.2f')} {_fmt(row.get('x_ceiling'), '9.2f')}  {extra}")
        print(f"{layout:16s} {'decode ceiling':17s} {'':8s} {rows['decode ceiling']['mb_per_s']:7.0f}   "
              f"(= {report['machine']['cores']} cores x 1-core raw MB/s)")
    g = report["growth_chips_per_s"]
    if g:
        after = [v["after_first_chips_per_s"] for v in g.values()]
        print(f"agrivlm chips/s as the raster grows (cog_zstd, {p['dates']} dates x {p['growth_bands']} band), "
              "overall / after the first chip: "
              + ", ".join(f"{k} px ({v['chips']} chips) {v['chips_per_s']:.1f} / {v['after_first_chips_per_s']:.1f}"
                          for k, v in g.items())
              + f"; start-up (first chip) {median([v['first_chip_s'] for v in g.values()]):.2f} s whatever the size"
              + (f"; largest / next after the first chip: {after[-1] / after[-2]:.2f}" if len(after) > 1 else ""))
    ok = all(r["agrivlm"].get("transforms_ok", False) for r in report["layouts"].values() if "agrivlm" in r)
    print(f"every agrivlm chip transform == source transform shifted by its window: {ok}; "
          f"chips equal to raw rasterio reads: {sum(report['spot_checked_chips'].values())} checked")
    targets = []
    for layout, rows in report["layouts"].items():
        a, nat = rows.get("agrivlm", {}), rows.get("agrivlm native", {})
        targets.append(f"{layout}: x raw {_fmt(a.get('x_raw'), '.2f')} float32 / {_fmt(nat.get('x_raw'), '.2f')} "
                       f"native (>= 0.8), x torchgeo {_fmt(a.get('x_torchgeo'), '.1f')} (>= 2)")
    print("targets: " + "; ".join(targets))


def write_outputs(report: dict[str, Any], readers: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "ingest.json").write_text(json.dumps(report, indent=2))
    layouts = list(report["layouts"])
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(readers)
    for k, reader in enumerate(readers):
        xs = np.arange(len(layouts)) + k * width
        cps = [report["layouts"][lay][reader].get("chips_per_s", 0.0) for lay in layouts]
        frac = [report["layouts"][lay][reader].get("x_ceiling", 0.0) for lay in layouts]
        axes[0].bar(xs, cps, width, label=reader)
        axes[1].bar(xs, frac, width, label=reader)
    for ax, title in zip(axes, ["chips/s (median)", "decoded MB/s ÷ decode ceiling (cores × 1-core MB/s)"],
                         strict=True):
        ax.set_xticks(np.arange(len(layouts)) + 0.4 - width / 2, layouts, fontsize=8)
        ax.set_title(title, fontsize=10)
    axes[1].axhline(1.0, color="k", lw=0.8, ls="--")
    axes[0].legend(fontsize=8)
    p, m = report["params"], report["machine"]
    fig.suptitle(f"chip stream: {p['dates']} dates × {p['bands']} bands, {p['size']}² px, chip {p['chip_size']}, "
                 f"{p['workers']} workers, {m['cores']} cores (shared machine)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "ingest.png", dpi=110)
    print(f"wrote {out / 'ingest.json'} and {out / 'ingest.png'}")


if __name__ == "__main__":
    main()
