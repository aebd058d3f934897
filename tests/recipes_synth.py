"""A seeded synthetic scene for the recipe and phenology tests: known curves, real GeoTIFFs, real polygons.

Two fields on a 10 m UTM grid carry asymmetric-Gaussian NDVI seasons with known dates; clouds cover
part of the scene on some dates (their pixels read 0.02 and the date's mask marks them); the parcels
are written as GeoJSON in EPSG:4326 so recipes have to reproject them to the stack's CRS.

:func:`write_synth_scene` writes the same fields as a scene folder in the layout of ``agrivlm synth``
(``stack/``, ``cloud_mask/``, ``parcels.gpkg``, ``truth/stages.csv``, ``truth/key_dates.csv``, ``scene.json``).

Run as a script to write the scene into a folder: ``python tests/recipes_synth.py OUT_DIR``.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
from rasters import UTM33, UTM_TRANSFORM, write_raster
from shapely.geometry import Polygon, box

#: First acquisition, spacing and count: 2020-11-01 every 10 days → 2022-03-16.
START = datetime(2020, 11, 1)
EVERY_DAYS = 10
N_DATES = 50
SIZE = 64
BASE, AMP = 0.15, 0.65
CLOUD_VALUE = 0.02


@dataclass(frozen=True)
class SynthField:
    """A rectangular field (pixel rows/cols, end-exclusive) with an asymmetric-Gaussian season in 2021."""

    field_id: str
    cls: str
    rows: tuple[int, int]
    cols: tuple[int, int]
    #: Peak day of 2021 (0 = 1 January) and the left/right widths in days.
    peak_doy: float
    w_left: float
    w_right: float
    #: Seasonal amplitude (a small one, like an evergreen forest, is no season).
    amp: float = AMP

    def ndvi(self, doy: np.ndarray) -> np.ndarray:
        """NDVI on days of 2021 (may be negative or > 365)."""
        x = np.asarray(doy, dtype=np.float64) - self.peak_doy
        w = np.where(x < 0, self.w_left, self.w_right)
        base = BASE if self.amp >= 0.3 else 0.7
        return base + self.amp * np.exp(-((x / w) ** 2))

    def truth(self, sos: float = 0.2, peak: float = 0.8, eos: float = 0.2) -> dict[str, datetime]:
        """Analytic key dates: green-up (SOS), peak (POS), senescence (end of the peak stage), EOS."""
        day0 = datetime(2021, 1, 1)
        return {
            "green_up": day0 + timedelta(days=self.peak_doy - self.w_left * math.sqrt(-math.log(sos))),
            "peak": day0 + timedelta(days=self.peak_doy),
            "senescence": day0 + timedelta(days=self.peak_doy + self.w_right * math.sqrt(-math.log(peak))),
            "eos": day0 + timedelta(days=self.peak_doy + self.w_right * math.sqrt(-math.log(eos))),
        }


#: A: slow decline (EOS − senescence ≈ 48 d → dormant after the season); B: abrupt (≈ 16 d → harvested);
#: C: an evergreen forest strip (no season); F runs off the raster's right edge.
FIELDS = (
    SynthField("A", "cultivated land", rows=(4, 22), cols=(4, 20), peak_doy=170.0, w_left=40.0, w_right=60.0),
    SynthField("B", "grassland", rows=(6, 28), cols=(36, 60), peak_doy=200.0, w_left=30.0, w_right=20.0),
    SynthField("C", "forest", rows=(24, 30), cols=(4, 28), peak_doy=190.0, w_left=60.0, w_right=60.0, amp=0.05),
    SynthField("D", "grassland", rows=(36, 60), cols=(2, 30), peak_doy=150.0, w_left=35.0, w_right=45.0),
    SynthField("E", "cultivated land", rows=(40, 62), cols=(34, 50), peak_doy=185.0, w_left=45.0, w_right=25.0),
    SynthField("F", "shrubland", rows=(40, 62), cols=(52, 70), peak_doy=175.0, w_left=50.0, w_right=50.0),
)


def dates() -> list[datetime]:
    """The acquisition times."""
    return [START + timedelta(days=EVERY_DAYS * k, hours=10) for k in range(N_DATES)]


def _field_ndvi(rng: np.random.Generator, when: datetime) -> np.ndarray:
    """``(SIZE, SIZE)`` clear-sky NDVI on ``when``: a noisy background and every field's curve plus noise."""
    doy = (when - datetime(2021, 1, 1)).total_seconds() / 86400.0
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    ndvi = np.full((SIZE, SIZE), 0.1, dtype=np.float64) + rng.normal(0, 0.005, (SIZE, SIZE))
    for f in FIELDS:
        inside = (rows >= f.rows[0]) & (rows < f.rows[1]) & (cols >= f.cols[0]) & (cols < f.cols[1])
        ndvi[inside] = f.ndvi(np.array([doy]))[0] + rng.normal(0, 0.01, int(inside.sum()))
    return ndvi


def _field_box(f: SynthField) -> Polygon:
    """A field's rectangle in EPSG:32633."""
    x0, y0 = UTM_TRANSFORM * (f.cols[0], f.rows[1])
    x1, y1 = UTM_TRANSFORM * (f.cols[1], f.rows[0])
    return box(x0, y0, x1, y1)


def write_scene(root: Path, seed: int = 0, cloud_rate: float = 0.3) -> dict[str, Path]:
    """Write ``ndvi/``, ``masks/`` and ``parcels.geojson`` (EPSG:4326) under ``root``; return their paths."""
    rng = np.random.default_rng(seed)
    for k, when in enumerate(dates()):
        ndvi = _field_ndvi(rng, when)
        cloud = np.zeros((SIZE, SIZE), dtype=np.uint8)
        if k > 0 and rng.random() < cloud_rate:  # a cloud over a random half (or all) of the scene
            kind = int(rng.integers(3))
            cloud[:, : SIZE // 2] = 1 if kind in (0, 2) else 0
            cloud[:, SIZE // 2:] = 1 if kind in (1, 2) else 0
        ndvi[cloud == 1] = CLOUD_VALUE
        stamp = f"{when:%Y%m%dT%H%M%S}"
        write_raster(root / "ndvi" / f"S2_NDVI_{stamp}.tif", ndvi[None].astype(np.float32))
        write_raster(root / "masks" / f"S2_CLM_{stamp}.tif", cloud[None], nodata=255)
    polys = [_field_box(f).segmentize(10.0) for f in FIELDS]
    parcels = gpd.GeoDataFrame(
        {"fid": [f.field_id for f in FIELDS], "landuse": [f.cls for f in FIELDS]}, geometry=polys, crs=UTM33
    ).to_crs(4326)
    parcels.to_file(root / "parcels.geojson", driver="GeoJSON")
    return {"ndvi": root / "ndvi", "masks": root / "masks", "parcels": root / "parcels.geojson"}


#: Reflectance band names of ``--bands s2`` scenes (NDVI = (B08 − B04) / (B08 + B04)).
S2_BANDS = ("B02", "B03", "B04", "B08", "B11")


def _stage(f: SynthField, day: datetime, shift: float) -> str:
    """The analytic stage of a field on ``day`` (key dates shifted by ``shift`` days)."""
    t = {k: v + timedelta(days=shift) for k, v in f.truth().items()}
    peak_start = datetime(2021, 1, 1) + timedelta(days=f.peak_doy + shift - f.w_left * math.sqrt(-math.log(0.8)))
    if day < t["green_up"]:
        return "dormant"
    if day < peak_start:
        return "green-up"
    if day < t["senescence"]:
        return "peak"
    if day < t["eos"]:
        return "senescence"
    return "harvested" if f.cls == "cultivated land" else "dormant"


#: Land-cover codes of the scenes' ``landcover.tif`` (as ``agrivlm synth``'s).
LANDCOVER = {"cultivated land": 1, "forest": 2, "grassland": 3, "shrubland": 4}


def write_synth_scene(
    root: Path, seed: int = 0, bands: str = "ndvi", cloud_rate: float = 0.3,
    truth_shift: dict[str, float] | None = None, season_start: str = "01-01", second_cycle: tuple[str, ...] = (),
) -> Path:
    """Write a scene folder as ``agrivlm synth`` does; return ``root``.

    The fields of :data:`FIELDS` with a season (not the forest) get truth rows for every acquisition date
    and their key dates, labelled by the year of the ``season_start`` window holding the peak;
    ``truth_shift`` moves a field's truth by days away from what its NDVI shows, so a recipe that derived
    stages from NDVI would answer differently; fields in ``second_cycle`` get a second key-date row in the
    same window (``YYYY-2``, as a double crop). ``ndvi`` scenes record ``seed``/``region``/``bands`` at the
    top of ``scene.json``; ``s2`` scenes as the generator's writer does (``spec``, ``band_names``,
    ``season_start``, ``class_raster`` with a ``landcover.tif``).
    """
    rng = np.random.default_rng(seed)
    shift = truth_shift or {}
    for k, when in enumerate(dates()):
        ndvi = _field_ndvi(rng, when)
        cloud = np.zeros((SIZE, SIZE), dtype=np.uint8)
        if k > 0 and rng.random() < cloud_rate:
            cloud[:, : SIZE // 2] = 1
        ndvi[cloud == 1] = CLOUD_VALUE
        stamp = f"{when:%Y%m%d}"
        tags = {"TIFFTAG_DATETIME": f"{when:%Y:%m:%d %H:%M:%S}"}
        if bands == "s2":
            red = np.full_like(ndvi, 0.05)
            nir = red * (1 + ndvi) / (1 - ndvi)
            data = np.stack([red * 0.8, red * 1.2, red, nir, nir * 0.6]).astype(np.float32)
            write_raster(root / "stack" / f"S2_{stamp}.tif", data, tags=tags, descriptions=S2_BANDS)
        else:
            write_raster(root / "stack" / f"NDVI_{stamp}.tif", ndvi[None].astype(np.float32), tags=tags,
                         descriptions=["NDVI"])
        write_raster(root / "cloud_mask" / f"CLM_{stamp}.tif", cloud[None], nodata=255, tags=tags)
    polys, stage_rows, key_rows = [], [], []
    for f in FIELDS:
        polys.append(_field_box(f))
        if f.amp < 0.3:
            continue
        d = shift.get(f.field_id, 0.0)
        stage_rows += [(f.field_id, f"{when:%Y-%m-%d}", _stage(f, when, d)) for when in dates()]
        t = {k: f"{v + timedelta(days=d):%Y-%m-%d}" for k, v in f.truth().items()}
        peak = f.truth()["peak"] + timedelta(days=d)
        label = str(peak.year if f"{peak:%m-%d}" >= season_start else peak.year - 1)
        key_rows.append((f.field_id, label, t["green_up"], t["peak"], t["senescence"], t["eos"]))
        if f.field_id in second_cycle:
            later = {k: f"{v + timedelta(days=d + 120):%Y-%m-%d}" for k, v in f.truth().items()}
            key_rows.append((f.field_id, f"{label}-2", later["green_up"], later["peak"], later["senescence"], ""))
    gpd.GeoDataFrame(
        {"field_id": [f.field_id for f in FIELDS], "class": [f.cls for f in FIELDS],
         "crop": ["maize" if f.cls == "cultivated land" else "" for f in FIELDS]},
        geometry=polys, crs=UTM33,
    ).to_file(root / "parcels.gpkg", driver="GPKG")
    (root / "truth").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(stage_rows, columns=["field_id", "date", "stage"]).to_csv(root / "truth" / "stages.csv", index=False)
    pd.DataFrame(key_rows, columns=["field_id", "season", "green_up", "peak", "senescence", "harvest"]).to_csv(
        root / "truth" / "key_dates.csv", index=False)
    if bands == "ndvi":
        scene: dict[str, object] = {"seed": seed, "region": "test", "bands": bands, "size": SIZE}
    else:
        cover = np.zeros((1, SIZE, SIZE), dtype=np.uint8)
        for f in FIELDS:
            cover[0, f.rows[0]:f.rows[1], f.cols[0]:f.cols[1]] = LANDCOVER[f.cls]
        write_raster(root / "landcover.tif", cover, nodata=0)
        scene = {"spec": {"seed": seed, "region": "test", "bands": bands}, "season_start": season_start,
                 "band_names": list(S2_BANDS), "region": {"season_start": season_start},
                 "class_raster": {"path": "landcover.tif", "classes": {str(v): k for k, v in LANDCOVER.items()}}}
    (root / "scene.json").write_text(json.dumps(scene))
    return root


def recipe_yaml(paths: dict[str, Path], name: str = "synth", extra: str = "") -> str:
    """A recipe over the scene with every family on (32 px chips, 16 px stride, 32 px blocks)."""
    return f"""
name: {name}
seed: 3
source:
  stack: {paths['ndvi']}
  masks: {paths['masks']}
  parcels: {paths['parcels']}
  id_column: fid
  class_column: landuse
chips: {{size: 32, stride: 16, min_clear: 0.6, max_frames: 24, min_frames: 4}}
split: {{block_px: 32, buffer_px: 0, fractions: {{train: 0.5, val: 0.25, test: 0.25}}, seed: 1}}
phenology: {{min_pixels: 6}}
tasks:
  field_boundaries: {{}}
  growth_stages: {{stage_questions: 3}}
  general_rs: {{}}
  spatial_reasoning: {{}}
{extra}
"""


if __name__ == "__main__":
    write_scene(Path(sys.argv[1] if len(sys.argv) > 1 else "synth_scene"))
