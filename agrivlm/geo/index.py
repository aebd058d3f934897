"""The chip index: one row per kept chip (footprint, window, transform, dates, source files).

Written as a GeoPackage (``.gpkg``) or GeoParquet (``.parquet``), atomically: to a temporary file
beside the target, then renamed, so an interrupted run never leaves a half-written index and an
older index stays intact until the new one is complete.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
from affine import Affine
from rasterio.windows import Window
from tqdm.auto import tqdm

from agrivlm.errors import IngestError
from agrivlm.geo.chips import Chip, ChipStream
from agrivlm.geo.coords import GeoGrid

#: Index formats by file suffix.
INDEX_DRIVERS = {".gpkg": "GPKG", ".parquet": "parquet", ".geojson": "GeoJSON"}


def check_index_format(target: Path) -> str:
    """The driver of an index path (see :data:`INDEX_DRIVERS`).

    Raises:
        IngestError: an unknown suffix.

    """
    driver = INDEX_DRIVERS.get(target.suffix.lower())
    if driver is None:
        raise IngestError(f"{target}: unknown output format; use one of {', '.join(INDEX_DRIVERS)}")
    return driver


def write_frame_to(frame: gpd.GeoDataFrame, path: Path, layer: str) -> None:
    """Write a GeoDataFrame straight to ``path``; the format follows the suffix (see :data:`INDEX_DRIVERS`).

    Not atomic by itself: the chip index is written inside :func:`atomic_unit` with its summary.
    """
    driver = check_index_format(path)
    if driver == "parquet":
        frame.to_parquet(path)
    else:
        kwargs = {"layer": layer} if driver == "GPKG" else {}
        frame.to_file(path, driver=driver, **kwargs)


def chip_row(chip: Chip) -> dict[str, object]:
    """The index row of one chip (geometry = footprint polygon in the stack's CRS)."""
    dates = [str(t) for t in chip.times]
    return {
        "chip_id": chip.chip_id,
        "chip_index": chip.index,
        "row_off": int(chip.window.row_off),
        "col_off": int(chip.window.col_off),
        "height": int(chip.window.height),
        "width": int(chip.window.width),
        "transform": json.dumps(list(chip.grid.transform)[:6]),
        "n_dates": len(dates),
        "first_date": dates[0],
        "last_date": dates[-1],
        "dates": json.dumps(dates),
        "files": json.dumps(chip.files),
        "valid_fraction": round(chip.valid_fraction, 6),
        "clear_fraction": round(chip.clear_fraction, 6),
        "geometry": chip.grid.footprint(),
    }


def build_chip_index(
    stream: ChipStream, progress: bool = True, on_chip: Callable[[Chip], None] | None = None
) -> gpd.GeoDataFrame:
    """Stream every chip once and collect the index rows, sorted by ``chip_index`` (row-major grid order).

    Memory: the stream's bounded read-ahead plus one small row per chip.
    """
    rows = []
    bar = tqdm(total=len(stream), desc="chips", unit="chip", disable=not progress)
    try:
        for chip in stream:
            rows.append(chip_row(chip))
            if on_chip is not None:
                on_chip(chip)
            bar.update(1)
            bar.set_postfix(kept=stream.kept, skipped=stream.skipped)
        bar.update(len(stream) - bar.n)
    finally:
        bar.close()
    rows.sort(key=lambda row: int(row["chip_index"]))  # type: ignore[call-overload]
    return rows_frame(rows, stream.stack.crs)


def rows_frame(rows: list[dict[str, object]], crs: Any) -> gpd.GeoDataFrame:
    """The chip index frame of :func:`chip_row` rows (an empty frame keeps the CRS)."""
    if not rows:
        return gpd.GeoDataFrame({"chip_id": []}, geometry=gpd.GeoSeries([], crs=crs))
    return gpd.GeoDataFrame(rows, geometry="geometry", crs=crs)


def read_chip_index(path: str | Path) -> gpd.GeoDataFrame:
    """Read an index written by :func:`write_frame_to` (GPKG, GeoParquet or GeoJSON)."""
    path = Path(path)
    if not path.exists():
        raise IngestError(f"{path}: no such chip index; run `agrivlm ingest` first")
    return gpd.read_parquet(path) if path.suffix.lower() == ".parquet" else gpd.read_file(path)


def row_window(row: Any) -> Window:
    """The pixel window of an index row."""
    return Window(int(row["col_off"]), int(row["row_off"]), int(row["width"]), int(row["height"]))


def row_grid(row: Any, crs: Any) -> GeoGrid:
    """The chip grid (own transform, CRS, size) of an index row."""
    coeffs = json.loads(str(row["transform"]))
    return GeoGrid(Affine(*coeffs), crs, int(row["width"]), int(row["height"]))


def row_dates(row: Any) -> np.ndarray:
    """The dates of an index row as ``datetime64[s]``."""
    return np.array(json.loads(str(row["dates"])), dtype="datetime64[s]")
