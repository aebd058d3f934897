"""Seeded Sentinel-2-like multitemporal stacks for the ingestion benchmarks (one GeoTIFF per date).

The pixels are not random noise (which no codec compresses and no real tile looks like): a field
pattern of rectangular parcels, each with a crop whose NDVI follows its own seasonal curve, turned
into blue/green/red/NIR reflectances (L2A digital numbers, 0-10000) plus a few DN of sensor noise,
and a nodata wedge (0, as in L2A) off the swath edge on some dates. DEFLATE/ZSTD compress this about
as well as real S2 L2A tiles (ratio ~2-3 with the noise), which is what makes decode speed realistic.

Layouts (GDAL creation options), as the issue asks:

* ``striped_deflate``: a plain GTiff in strips, DEFLATE (what many exporters write);
* ``cog_deflate``: a COG with 512-px tiles, DEFLATE + PREDICTOR=2;
* ``cog_zstd``: a COG with 512-px tiles, ZSTD + PREDICTOR=2;
* ``uncompressed``: a COG with 512-px tiles, no compression.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window

#: Sentinel-2 tile T33TWM's UTM zone and a 10 m grid origin inside it.
CRS_S2 = CRS.from_epsg(32633)
ORIGIN = Affine(10.0, 0.0, 499980.0, 0.0, -10.0, 5100000.0)

LAYOUTS: dict[str, dict[str, object]] = {
    "striped_deflate": {"driver": "GTiff", "compress": "deflate", "tiled": False},
    "cog_deflate": {"driver": "COG", "compress": "deflate", "predictor": 2, "blocksize": 512},
    "cog_zstd": {"driver": "COG", "compress": "zstd", "predictor": 2, "blocksize": 512},
    "uncompressed": {"driver": "COG", "compress": "none", "blocksize": 512},
    # the memory benchmark's big stack: tiled GTiff written directly (one pass), ZSTD level 1
    "tiled_zstd": {"driver": "GTiff", "compress": "zstd", "zstd_level": 1, "predictor": 2, "tiled": True,
                   "blockxsize": 512, "blockysize": 512},
}

#: Crop classes: (day of year of peak NDVI, width of the season in days, peak NDVI).
CROPS = [(150, 40.0, 0.85), (200, 35.0, 0.9), (240, 45.0, 0.8), (120, 60.0, 0.6), (0, 1e9, 0.15)]


def parcel_ids(height: int, width: int, seed: int = 0, row_offset: int = 0) -> np.ndarray:
    """``(height, width)`` int32 parcel ids: rows of parcels 20-80 px tall, each split 20-120 px wide.

    ``row_offset`` selects rows of a taller layout, so a big raster can be written strip by strip.
    """
    rng = np.random.default_rng(seed)
    total = row_offset + height
    bands, r = [], 0
    while r < total:
        h = int(rng.integers(20, 81))
        cuts = np.cumsum(rng.integers(20, 121, size=width // 20 + 2))
        bands.append((r, r + h, cuts))
        r += h
    ids = np.empty((height, width), dtype=np.int32)
    cols = np.arange(width)
    for k, (r0, r1, cuts) in enumerate(bands):
        a, b = max(r0, row_offset), min(r1, total)
        if a >= b:
            continue
        ids[a - row_offset : b - row_offset] = (k * 4096 + np.searchsorted(cuts, cols, side="right"))[None, :]
    return ids


def reflectance_lut(n_ids: int, day: int, seed: int = 0) -> np.ndarray:
    """``(4, n_ids)`` uint16 blue/green/red/NIR DN of every parcel id on day-of-year ``day``.

    Parcel ``i`` keeps its crop and soil for every ``n_ids`` ≥ ``i`` and every day.
    """
    rng = np.random.default_rng(seed + 1)
    crop = rng.integers(0, len(CROPS), size=n_ids)
    peak = np.array([c[0] for c in CROPS])[crop] + rng.normal(0, 8, n_ids)
    width = np.array([c[1] for c in CROPS])[crop]
    top = np.array([c[2] for c in CROPS])[crop]
    ndvi = 0.15 + (top - 0.15) * np.exp(-(((day - peak) / width) ** 2))
    soil = rng.uniform(0.8, 1.2, n_ids)
    nir = 1800 + 3200 * ndvi
    red = np.clip((1400 - 1300 * ndvi) * soil, 150, None)
    green = 0.55 * red + 0.08 * nir
    blue = 0.7 * red + 100
    return np.stack([blue, green, red, nir]).astype(np.uint16) + 1000  # L2A BOA_ADD_OFFSET


def date_pixels(
    ids: np.ndarray, lut: np.ndarray, bands: int, rng: np.random.Generator, col_edge: int | None = None,
    row_offset: int = 0, noise: int = 12,
) -> np.ndarray:
    """``(bands, h, w)`` uint16 pixels of one date for parcel ``ids`` (0 = nodata off the swath edge)."""
    out = np.empty((bands, *ids.shape), dtype=np.uint16)
    for b in range(bands):
        out[b] = lut[b % 4][ids]
        out[b] += rng.integers(0, noise, size=ids.shape, dtype=np.uint16)
    if col_edge is not None:  # a diagonal swath edge: nothing to the right of it
        rows = np.arange(ids.shape[0])[:, None] + row_offset
        out[:, np.arange(ids.shape[1])[None, :] > col_edge + rows // 4] = 0
    return out


def write_stack(
    folder: Path, layout: str, size: int | tuple[int, int] = 2048, dates: int = 24, bands: int = 4,
    dtype: str = "uint16", seed: int = 0, strip_rows: int = 1024, start: datetime = datetime(2021, 3, 1),
) -> list[Path]:
    """Write ``dates`` files ``S2_<YYYYMMDD>.tif`` of ``size`` px (``(height, width)`` or square).

    Written strip by strip (``strip_rows``) with every date's file open, so the parcel layout of a
    strip is computed once and the writer's memory stays at one strip however large the raster; GDAL
    compresses with every core (``NUM_THREADS=ALL_CPUS``). COG layouts are written uncompressed
    first, then copied by GDAL's COG driver. Existing files are kept (delete the folder to rewrite).
    """
    opts = dict(LAYOUTS[layout])
    driver = opts.pop("driver")
    blocksize = opts.pop("blocksize", None)
    h, w = (size, size) if isinstance(size, int) else size
    folder.mkdir(parents=True, exist_ok=True)
    whens = [start + timedelta(days=int(round(k * 270 / max(dates - 1, 1)))) for k in range(dates)]
    paths = [folder / f"S2_{when:%Y%m%d}.tif" for when in whens]
    if all(p.exists() for p in paths):
        return paths
    profile: dict[str, object] = {
        "driver": "GTiff", "height": h, "width": w, "count": bands, "dtype": dtype, "crs": CRS_S2,
        "transform": ORIGIN, "nodata": 0, "num_threads": "all_cpus", **opts,
    }
    if driver == "COG":  # an uncompressed tiled GTiff first, then GDAL's COG driver compresses it
        profile.update(tiled=True, blockxsize=blocksize, blockysize=blocksize, compress=None)
        profile.pop("predictor", None)
    tmps = [p.with_suffix(".partial.tif") for p in paths]
    luts = [reflectance_lut((h // 20 + 2) * 4096, when.timetuple().tm_yday, seed=seed) for when in whens]
    rngs = [np.random.default_rng(seed * 1000 + k) for k in range(dates)]
    edges = [w - w // 6 if k % 5 == 2 else None for k in range(dates)]
    handles = [rasterio.open(t, "w", **profile) for t in tmps]
    try:
        for r0 in range(0, h, strip_rows):
            n = min(strip_rows, h - r0)
            ids = parcel_ids(n, w, seed=seed, row_offset=r0)
            for k, ds in enumerate(handles):
                pix = date_pixels(ids, luts[k], bands, rngs[k], col_edge=edges[k], row_offset=r0)
                ds.write(pix.astype(dtype, copy=False), window=Window(0, r0, w, n))
        for k, ds in enumerate(handles):
            ds.update_tags(ACQUISITIONDATE=f"{whens[k]:%Y-%m-%dT10:30:00}")
            for b in range(bands):
                ds.set_band_description(b + 1, ["B02", "B03", "B04", "B08"][b % 4] + ("" if b < 4 else f"_{b}"))
    finally:
        for ds in handles:
            ds.close()
    for tmp, path in zip(tmps, paths, strict=True):
        if driver == "COG":
            _to_cog(tmp, path, {**opts, "blocksize": blocksize})
            tmp.unlink()
        else:
            os.replace(tmp, path)
    return paths


def _to_cog(src: Path, dst: Path, opts: dict[str, object]) -> None:
    """Copy a tiled GTiff to a COG (GDAL's COG driver: tiles in order, header first; no overviews)."""
    from rasterio.shutil import copy as rio_copy

    kwargs = {"compress": opts["compress"], "blocksize": opts["blocksize"], "overviews": "none",
              "num_threads": "all_cpus"}
    if "predictor" in opts:
        kwargs["predictor"] = "yes"
    rio_copy(src, dst, driver="COG", **kwargs)


def ensure_stacks(
    root: Path, layouts: Sequence[str], size: int, dates: int, bands: int = 4, dtype: str = "uint16",
    log: bool = True,
) -> dict[str, list[Path]]:
    """Write (or reuse) one stack per layout under ``root/<layout>_<size>_<dates>x<bands>[_<dtype>]``."""
    out = {}
    for layout in layouts:
        folder = root / (f"{layout}_{size}_{dates}x{bands}" + ("" if dtype == "uint16" else f"_{dtype}"))
        t0 = time.perf_counter()
        out[layout] = write_stack(folder, layout, size=size, dates=dates, bands=bands, dtype=dtype)
        mb = sum(p.stat().st_size for p in out[layout]) / 1e6
        if log:
            print(f"  {layout:16s} {dates} x {bands}-band {dtype} {size}x{size} px: {mb:8.1f} MB on disk "
                  f"({time.perf_counter() - t0:5.1f} s)", flush=True)
    return out
