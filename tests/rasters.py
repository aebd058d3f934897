"""Seeded writers of the small GeoTIFFs the tests need (no hand-made binary blobs are committed).

Run as a script to write an example set into a folder: ``python tests/rasters.py OUT_DIR``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS

UTM33 = CRS.from_epsg(32633)
#: A 10 m UTM grid near the sample area (top-left corner).
UTM_TRANSFORM = Affine(10.0, 0.0, 465000.0, 0.0, -10.0, 5080000.0)
#: The same origin, rotated by 20° (a grid not aligned with the CRS axes).
ROTATED_TRANSFORM = Affine.translation(465000.0, 5080000.0) @ Affine.rotation(20.0) @ Affine.scale(10.0, -10.0)
#: A south-up grid (rows go north).
SOUTH_UP_TRANSFORM = Affine(10.0, 0.0, 465000.0, 0.0, 10.0, 5079000.0)


def smooth_field(height: int, width: int, bands: int = 1, seed: int = 0, t: float = 0.0) -> np.ndarray:
    """A smooth, seeded ``(bands, height, width)`` float32 field (values in about [0, 1])."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    out = []
    for b in range(bands):
        fx, fy, phase = rng.uniform(0.02, 0.08), rng.uniform(0.02, 0.08), rng.uniform(0, 6.28)
        out.append(0.5 + 0.25 * np.sin(fx * cols + phase + t) * np.cos(fy * rows - b) + 0.1 * b)
    return np.stack(out).astype(np.float32)


def write_raster(
    path: Path,
    data: np.ndarray,
    transform: Affine = UTM_TRANSFORM,
    crs: CRS | None = UTM33,
    nodata: float | None = -9999.0,
    tags: dict[str, str] | None = None,
    descriptions: Sequence[str] | None = None,
    tiled: bool = False,
    compress: str | None = "deflate",
    blocksize: int = 16,
) -> Path:
    """Write ``data`` ``(bands, h, w)`` as a GeoTIFF."""
    path.parent.mkdir(parents=True, exist_ok=True)
    profile: dict[str, object] = {
        "driver": "GTiff",
        "height": data.shape[1],
        "width": data.shape[2],
        "count": data.shape[0],
        "dtype": data.dtype.name,
        "transform": transform,
        "nodata": nodata,
    }
    if crs is not None:
        profile["crs"] = crs
    if compress:
        profile["compress"] = compress
    if tiled:
        profile.update(tiled=True, blockxsize=blocksize, blockysize=blocksize)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
        if tags:
            ds.update_tags(**tags)
        if descriptions:
            for i, d in enumerate(descriptions, start=1):
                ds.set_band_description(i, d)
    return path


def write_dated_stack(
    folder: Path,
    n_dates: int = 5,
    height: int = 40,
    width: int = 48,
    bands: int = 2,
    start: datetime = datetime(2021, 3, 1),
    every_days: int = 10,
    date_in: str = "name",
    transform: Affine = UTM_TRANSFORM,
    crs: CRS = UTM33,
    seed: int = 0,
) -> list[Path]:
    """Write ``n_dates`` files ``S2_<YYYYMMDD>.tif`` (``date_in="name"``) or ``tile_<k>.tif`` with the
    date in ``TIFFTAG_DATETIME`` (``date_in="tag"``); each date's field is shifted in phase."""
    paths = []
    for k in range(n_dates):
        when = start + timedelta(days=every_days * k)
        data = smooth_field(height, width, bands, seed=seed, t=0.3 * k)
        if date_in == "name":
            path, tags = folder / f"S2_{when:%Y%m%d}.tif", None
        else:
            path, tags = folder / f"tile_{k:02d}.tif", {"TIFFTAG_DATETIME": f"{when:%Y:%m:%d %H:%M:%S}"}
        paths.append(write_raster(path, data, transform=transform, crs=crs, tags=tags))
    return paths


def truncate(path: Path, keep_fraction: float = 0.6) -> Path:
    """Cut a file to ``keep_fraction`` of its bytes (header intact, later blocks damaged)."""
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep_fraction)])
    return path


def main(out: str) -> None:
    """Write an example set: a dated stack, a rotated file, a file without CRS and a truncated file."""
    root = Path(out)
    write_dated_stack(root / "stack")
    write_raster(root / "rotated_20210301.tif", smooth_field(20, 20), transform=ROTATED_TRANSFORM)
    write_raster(root / "nocrs_20210301.tif", smooth_field(20, 20), crs=None)
    big = write_raster(root / "truncated_20210301.tif", smooth_field(256, 256, seed=3), tiled=True, blocksize=32)
    truncate(big)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "test_rasters")
