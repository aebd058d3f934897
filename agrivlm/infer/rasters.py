"""``agrivlm infer --raster``: the predictions as Cloud-Optimized GeoTIFFs on each stack's own grid.

* ``--task fields`` → ``<stem>_extent.tif``: float32, one band, each pixel the highest score of a predicted
  field covering it (the probability the model gave that field's outline), 0 where no field was found;
  band description ``field_score``.
* ``--task growth`` → ``<stem>_stages.tif``: uint8, one band per date of the stage table (the band's
  description is the ISO date), each pixel of a field the code of its predicted stage that day
  (:data:`STAGE_CODES`: 1 dormant … 5 harvested), 0 elsewhere or where that field has no stage that day;
  the dataset's ``stage_codes`` tag maps codes to stages.

With several INPUTS each stack gets its own file, ``<stem>_<k>_extent.tif`` (``k`` = the INPUT's position).
Files are COGs (internal tiles, overviews, DEFLATE), written to a temporary file and renamed, as the other
outputs. Features are reprojected to the stack's CRS before they are burnt in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import numpy.typing as npt
import pandas as pd
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.crs import CRS
from rasterio.features import rasterize

from agrivlm.infer.journal import StackEntry
from agrivlm.io import atomic_path
from agrivlm.schema import GROWTH_STAGES

#: Stage → the code of ``<stem>_stages.tif`` (0: no field, or no stage that day).
STAGE_CODES: dict[str, int] = {stage: k + 1 for k, stage in enumerate(GROWTH_STAGES)}


def raster_path(out: Path, kind: str, k: int | None) -> Path:
    """``<stem>_<kind>.tif`` beside ``out`` (``<stem>_<k>_<kind>.tif`` for the k-th of several stacks)."""
    return out.with_name(f"{out.stem}_{kind}.tif" if k is None else f"{out.stem}_{k}_{kind}.tif")


def _write_cog(path: Path, bands: npt.NDArray[Any], transform: Affine, crs: CRS, nodata: float | None,
               descriptions: list[str], tags: dict[str, str]) -> None:
    """``bands`` ``(B, H, W)`` as a COG at ``path`` (atomically): a GTiff in memory, then GDAL's COG driver."""
    b, h, w = bands.shape
    profile = {"driver": "GTiff", "height": h, "width": w, "count": b, "dtype": bands.dtype.name, "crs": crs,
               "transform": transform, "nodata": nodata}
    with rasterio.MemoryFile() as mem:
        with mem.open(**profile) as ds:
            ds.write(bands)
            for i, text in enumerate(descriptions, start=1):
                ds.set_band_description(i, text)
            ds.update_tags(**tags)
        with atomic_path(path) as tmp:
            rasterio.shutil.copy(mem.name, str(tmp), driver="COG", compress="DEFLATE", blocksize=256,
                                 overview_resampling="nearest")


def _grid(info: StackEntry) -> tuple[Affine, CRS, int, int]:
    grid = info["fingerprint"]["grid"]
    h, w = grid["shape"]
    return Affine(*grid["transform"]), CRS.from_wkt(grid["crs"]), int(h), int(w)


def write_extent_raster(frame: gpd.GeoDataFrame, info: StackEntry, path: Path) -> Path:
    """The field-score raster of ``frame`` (the fields layer) on the grid of the journaled stack ``info``."""
    transform, crs, h, w = _grid(info)
    out = np.zeros((h, w), np.float32)
    if len(frame):
        feats = frame.to_crs(crs) if frame.crs is not None else frame
        # low scores first, so where fields overlap the best-scored one stays on top
        order = feats.assign(_s=feats["score"].astype(float).fillna(0.0)).sort_values("_s", kind="stable")
        shapes = [(g, float(s)) for g, s in zip(order.geometry, order["_s"], strict=True) if g is not None]
        if shapes:
            out = rasterize(shapes, out_shape=(h, w), transform=transform, fill=0.0, dtype="float32")
    _write_cog(path, out[None], transform, crs, None, ["field_score"],
               {"agrivlm": "field extent: the highest score of a predicted field covering the pixel; 0 = none"})
    return path


def write_stage_raster(stages: pd.DataFrame, fields: gpd.GeoDataFrame, info: StackEntry, path: Path) -> Path:
    """The stage map (one band per date) of the stage table ``stages`` on the grid of the stack ``info``.

    ``fields``: the growth layer (one polygon per ``field_id``).
    """
    transform, crs, h, w = _grid(info)
    feats = fields.to_crs(crs) if fields.crs is not None and len(fields) else fields
    geom = dict(zip(feats["field_id"].astype(str), feats.geometry, strict=True)) if len(feats) else {}
    dates = sorted(stages["date"].astype(str).unique()) if len(stages) else []
    bands = np.zeros((max(len(dates), 1), h, w), np.uint8)
    for b, date in enumerate(dates):
        day = stages[stages["date"].astype(str) == date]
        shapes = [(geom[str(f)], STAGE_CODES[s]) for f, s in zip(day["field_id"], day["stage"], strict=True)
                  if str(f) in geom and s in STAGE_CODES]
        if shapes:
            bands[b] = rasterize(shapes, out_shape=(h, w), transform=transform, fill=0, dtype="uint8")
    _write_cog(path, bands, transform, crs, None, dates or ["no stages"],
               {"stage_codes": json.dumps({str(v): k for k, v in STAGE_CODES.items()}),
                "agrivlm": "growth stage per date (band description), 0 = no field or no stage"})
    return path
