"""Write a synthetic scene as a user's data would arrive: GeoTIFFs per date, masks, parcels, exact truth.

Layout of ``DIR`` (written into a temporary sibling folder and renamed at the end, so a killed run
leaves no scene that looks complete)::

    stack/S2_<YYYYMMDDTHHMMSS>.tif       one GeoTIFF per acquisition (UTM, 10 m, tiled, DEFLATE, date tags)
    cloud_mask/S2_CLM_<stamp>.tif        1 = cloud or shadow, 0 = clear, 255 = no data
    parcels.gpkg                         field_id, class, crop, area_ha, crop/sowing/harvest per season
    landcover.tif                        majority land cover per pixel (codes in scene.json)
    truth/stages.csv                     field_id, date, stage of every vegetated parcel on every date
    truth/key_dates.csv                  field_id, season, green_up, peak, senescence, harvest, crop
    scene.json                           every parameter and the seed (regenerates the scene)

Pixels are computed window by window (``block_px``), each from sub-pixel covers rasterised at
``supersample`` × the resolution, so memory is bounded by the window and by per-parcel tables, never by
the cube; every random draw comes from a generator keyed by (seed, purpose, indices), so the same seed
and parameters give byte-identical files whatever runs before.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import geopandas as gpd
import numpy as np
import numpy.typing as npt
import rasterio
import shapely
from affine import Affine
from pyproj import Transformer
from rasterio.crs import CRS
from rasterio.features import rasterize
from rasterio.io import DatasetWriter
from rasterio.windows import Window
from shapely import affinity

from agrivlm.errors import SynthError
from agrivlm.io import atomic_dir, fixed_gpkg_date
from agrivlm.synth.landscape import Parcel, tessellate
from agrivlm.synth.phenology import FieldSeasons, PhenologyParams, field_seasons, iso, to_day
from agrivlm.synth.regions import LANDCOVER_CODES, REGIONS, Crop, Region
from agrivlm.synth.sensor import (
    CLOUD,
    HAZE,
    S2_BANDS,
    SOIL,
    URBAN,
    VEGETATION,
    WATER,
    SensorParams,
    SmoothField,
    acquisitions,
    ndvi_of,
    veg_fraction,
)

BandSet = Literal["ndvi", "s2"]
#: Band sets of ``--bands``.
BAND_SETS: tuple[str, ...] = ("ndvi", "s2")
#: Version of the generator; scene.json records it (a new version may draw other scenes from one seed).
GENERATOR_VERSION = 1
#: Nodata of the NDVI files (as the embedded sample) and of the S2 digital numbers (as L2A).
NDVI_NODATA = -9999.0
DN_NODATA = 0

#: Ids of the background covers in the id raster; parcel ``i`` is ``FIRST_PARCEL_ID + i``.
MARGIN_ID, HEDGE_ID, ROAD_ID, FIRST_PARCEL_ID = 0, 1, 2, 3
#: Sub-pixel covers kept per pixel (the rest, rarely more than a sixteenth, is dropped and renormalised).
TOP_COVERS = 4

_CLASS_OF_USE = {"grassland": "grassland", "forest": "forest", "built-up": "artificial surface",
                 "water": "water"}


@dataclass(frozen=True)
class SceneSpec:
    """Everything that defines a scene; ``scene.json`` holds it (with the derived grid and dates)."""

    region: str = "central_europe"
    area_km2: float = 1.0
    seed: int = 0
    bands: str = "ndvi"
    start: str = "2021-01-01"
    end: str = "2022-12-31"
    #: Pixel size (m), sub-pixel factor of the mixed edges, window size of the writer.
    pixel_m: float = 10.0
    supersample: int = 4
    block_px: int = 256
    #: Within-field heterogeneity: correlation length (m) and the per-field amplitude range (relative fv).
    heterogeneity_scale_m: float = 120.0
    heterogeneity: tuple[float, float] = (0.03, 0.12)
    #: Soil brightness spread between fields (relative).
    soil_brightness_sd: float = 0.15
    phenology: PhenologyParams = field(default_factory=PhenologyParams)
    sensor: SensorParams = field(default_factory=SensorParams)

    def validate(self) -> None:
        """Raise :class:`SynthError` with one line naming the bad value."""
        if self.region not in REGIONS:
            raise SynthError(f"unknown region {self.region!r}; choose one of {', '.join(REGIONS)}")
        if self.bands not in BAND_SETS:
            raise SynthError(f"unknown band set {self.bands!r}; choose one of {', '.join(BAND_SETS)}")
        if not self.area_km2 > 0 or not math.isfinite(self.area_km2):
            raise SynthError(f"--area-km2 must be > 0 (got {self.area_km2})")
        if self.area_km2 > 10_000:
            raise SynthError(f"--area-km2 {self.area_km2} is over 10,000 km²; write several scenes instead")
        try:
            start, end = np.datetime64(self.start, "D"), np.datetime64(self.end, "D")
        except ValueError as exc:
            raise SynthError(f"--start/--end must be YYYY-MM-DD dates ({exc})") from None
        if end <= start:
            raise SynthError(f"--end {self.end} is not after --start {self.start}")
        if self.seed < 0:
            raise SynthError(f"--seed must be ≥ 0 (got {self.seed})")
        if self.supersample < 1 or self.block_px < 16:
            raise SynthError("supersample must be ≥ 1 and block_px ≥ 16")


def _rng(seed: int, *keys: int) -> np.random.Generator:
    """A generator keyed by the seed and a purpose/index path (independent of call order)."""
    return np.random.default_rng([seed, *keys])


@dataclass
class Grid:
    """The scene's raster grid."""

    crs: CRS
    transform: Affine
    width: int
    height: int


def scene_grid(spec: SceneSpec, region: Region) -> Grid:
    """UTM grid of the scene: the region's zone, scenes of different seeds side by side (never overlapping)."""
    lon, lat = region.lonlat
    zone = int((lon + 180.0) // 6.0) + 1
    epsg = (32600 if lat >= 0 else 32700) + zone
    crs = CRS.from_epsg(epsg)
    x0, y0 = Transformer.from_crs("EPSG:4326", f"EPSG:{epsg}", always_xy=True).transform(lon, lat)
    side_px = max(int(round(math.sqrt(spec.area_km2) * 1000.0 / spec.pixel_m)), 8)
    step = (side_px * spec.pixel_m) + 2000.0
    col, row = spec.seed % 40, spec.seed // 40
    left = math.floor((x0 + col * step) / spec.pixel_m) * spec.pixel_m
    top = math.floor((y0 - row * step) / spec.pixel_m) * spec.pixel_m
    return Grid(crs=crs, transform=Affine(spec.pixel_m, 0.0, left, 0.0, -spec.pixel_m, top),
                width=side_px, height=side_px)


@dataclass
class ParcelTable:
    """Per-id tables of the id raster: backgrounds, heterogeneity amplitudes, land cover, seasons."""

    parcels: list[Parcel]
    field_ids: list[str]
    classes: list[str]
    crops: list[dict[int, Crop]]
    seasons: list[FieldSeasons | None]
    #: ``(n_ids, 5)`` background reflectance, ``(n_ids,)`` heterogeneity amplitude, land-cover code.
    background: npt.NDArray[np.float32]
    het_amp: npt.NDArray[np.float32]
    cover_code: npt.NDArray[np.int64]
    #: ``(n_ids,)`` constant vegetation fraction of ids without seasons (built-up lots, water, roads).
    const_fv: npt.NDArray[np.float32]
    margin: FieldSeasons
    hedge: FieldSeasons


def _crop_years(use: str, region: Region, years: list[int], rng: np.random.Generator) -> dict[int, Crop]:
    """Each year's crop of one parcel: perennials keep theirs, arable fields rotate."""
    if use == "grassland":
        return dict.fromkeys(years, region.crops["grassland"])
    if use == "forest":
        return dict.fromkeys(years, region.crops["forest"])
    names = list(region.crop_mix)
    probs = np.asarray([region.crop_mix[n] for n in names], dtype=np.float64)
    probs /= probs.sum()
    first = str(rng.choice(names, p=probs))
    if first == "grassland":
        return dict.fromkeys(years, region.crops["grassland"])
    arable = [n for n in names if n != "grassland"]
    ap = np.asarray([region.crop_mix[n] for n in arable], dtype=np.float64)
    ap /= ap.sum()
    out, prev = {}, first
    for y in years:
        pick = prev if y == years[0] else str(rng.choice(arable, p=ap))
        if y != years[0] and pick == prev and rng.uniform() < 0.7:
            pick = str(rng.choice(arable, p=ap))
        out[y] = region.crops[pick]
        prev = pick
    return out


def build_parcels(spec: SceneSpec, region: Region, grid: Grid) -> tuple[ParcelTable, list[shapely.Polygon]]:
    """Tessellate the scene and give every parcel its crops, seasons and spectra."""
    w_m, h_m = grid.width * spec.pixel_m, grid.height * spec.pixel_m
    parcels, blocks = tessellate(w_m, h_m, region, _rng(spec.seed, 1))
    start_year = int(spec.start[:4]) - 1
    years = list(range(start_year, int(spec.end[:4]) + 2))
    params = spec.phenology
    rng = _rng(spec.seed, 2)
    n = FIRST_PARCEL_ID + len(parcels)
    background = np.zeros((n, len(S2_BANDS)), dtype=np.float32)
    het = np.zeros(n, dtype=np.float32)
    code = np.zeros(n, dtype=np.int64)
    const_fv = np.zeros(n, dtype=np.float32)
    background[MARGIN_ID] = SOIL
    background[HEDGE_ID] = SOIL * 0.8
    background[ROAD_ID] = URBAN
    het[[MARGIN_ID, HEDGE_ID]] = 0.08
    code[[MARGIN_ID, HEDGE_ID, ROAD_ID]] = [LANDCOVER_CODES["grassland"], LANDCOVER_CODES["shrubland"],
                                            LANDCOVER_CODES["artificial surface"]]
    field_ids, classes, crops, seasons = [], [], [], []
    for i, p in enumerate(parcels):
        k = FIRST_PARCEL_ID + i
        fid = f"f{i + 1:05d}"
        crop_years = _crop_years(p.use, region, years, rng) if p.use in ("fields", "grassland", "forest") else {}
        if p.use == "fields":
            cls = crop_years[years[0]].cls
        else:
            cls = _CLASS_OF_USE[p.use]
        brightness = float(np.clip(1.0 + rng.normal(0, spec.soil_brightness_sd), 0.6, 1.5))
        background[k] = SOIL * brightness
        het[k] = float(rng.uniform(*spec.heterogeneity))
        if p.use == "water":
            background[k] = WATER
            het[k] = 0.0
        elif p.use == "built-up":
            background[k] = URBAN * float(np.clip(1.0 + rng.normal(0, 0.15), 0.6, 1.6))
            const_fv[k] = float(rng.uniform(0.05, 0.35))  # gardens and street trees
        code[k] = LANDCOVER_CODES[cls]
        fs = field_seasons(fid, crop_years, _rng(spec.seed, 3, i), params, region) if crop_years else None
        field_ids.append(fid)
        classes.append(cls)
        crops.append(crop_years)
        seasons.append(fs)
    margin = field_seasons("margin", dict.fromkeys(years, region.crops["grassland"]), _rng(spec.seed, 4),
                           PhenologyParams(cut_count_shares=(1.0, 0.0, 0.0)), region)
    margin.cycles = [c for c in margin.cycles if c.pre_stage == "dormant"]  # margins are not mown
    for c in margin.cycles:
        c.harvest, c.is_cut = None, False
    for a, b in zip(margin.cycles, margin.cycles[1:], strict=False):
        a.end = b.start
    hedge = field_seasons("hedge", dict.fromkeys(years, region.crops["forest"]), _rng(spec.seed, 5), params, region)
    table = ParcelTable(parcels=parcels, field_ids=field_ids, classes=classes, crops=crops, seasons=seasons,
                        background=background, het_amp=het, cover_code=code, const_fv=const_fv,
                        margin=margin, hedge=hedge)
    return table, blocks


def fv_table(table: ParcelTable, days: npt.NDArray[np.float64], params: PhenologyParams) -> npt.NDArray[np.float32]:
    """``(n_ids, T)`` vegetation fraction of every id on every date (from its NDVI curve and background)."""
    n = len(table.background)
    out = np.repeat(table.const_fv[:, None], len(days), axis=1).astype(np.float32)
    curves: list[tuple[int, FieldSeasons]] = [(MARGIN_ID, table.margin), (HEDGE_ID, table.hedge)]
    curves += [(FIRST_PARCEL_ID + i, s) for i, s in enumerate(table.seasons) if s is not None]
    for k, fs in curves:
        ndvi = fs.ndvi(days, params)
        out[k] = veg_fraction(ndvi, np.broadcast_to(table.background[k], (len(days), len(S2_BANDS))))
    assert out.shape == (n, len(days))
    return out


def _covers(ids: npt.NDArray[np.int64], s: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Fine ids ``(H·s, W·s)`` → the ``TOP_COVERS`` largest covers of each pixel: ids and area weights ``(H, W, K)``."""
    hs, ws = ids.shape
    sub = ids.reshape(hs // s, s, ws // s, s).transpose(0, 2, 1, 3).reshape(hs // s, ws // s, s * s)
    srt = np.sort(sub, axis=-1)
    new = np.ones(srt.shape, dtype=bool)
    new[..., 1:] = srt[..., 1:] != srt[..., :-1]
    rank = np.cumsum(new, axis=-1) - 1
    k = TOP_COVERS
    out_ids = np.zeros((*srt.shape[:2], k), dtype=np.int64)
    counts = np.zeros((*srt.shape[:2], k), dtype=np.float32)
    for r in range(k):
        m = rank == r
        counts[..., r] = m.sum(-1)
        out_ids[..., r] = np.where(m, srt, -1).max(-1).clip(0)
    weights = counts / counts.sum(-1, keepdims=True)
    return out_ids, weights


@dataclass
class _Window:
    row0: int
    col0: int
    height: int
    width: int

    @property
    def rio(self) -> Window:
        return Window(self.col0, self.row0, self.width, self.height)


def _windows(grid: Grid, block: int) -> list[_Window]:
    return [_Window(r, c, min(block, grid.height - r), min(block, grid.width - c))
            for r in range(0, grid.height, block) for c in range(0, grid.width, block)]


def write_scene(out: str | os.PathLike[str], spec: SceneSpec, *, overwrite: bool = False,
                progress: Callable[[int, int], None] | None = None) -> dict[str, object]:
    """Generate the scene ``spec`` into ``out`` (see the module docstring); return its summary.

    Raises:
        SynthError: bad parameters, or ``out`` exists and ``overwrite`` is false (nothing is written).

    """
    spec.validate()
    target = Path(out)
    if target.exists() and not overwrite:
        raise SynthError(f"{target}: already exists; pass --overwrite to replace it")
    if target.exists() and not target.is_dir():
        raise SynthError(f"{target}: exists and is not a folder")
    with atomic_dir(target) as tmp:
        return _write(tmp, spec, progress)


def _write(root: Path, spec: SceneSpec, progress: Callable[[int, int], None] | None) -> dict[str, object]:
    region = REGIONS[spec.region]
    grid = scene_grid(spec, region)
    table, blocks = build_parcels(spec, region, grid)
    sensor = spec.sensor
    times, covers = acquisitions(np.datetime64(spec.start), np.datetime64(spec.end), region.cloud_monthly,
                                 sensor, _rng(spec.seed, 6))
    if not times:
        raise SynthError(f"no acquisition between {spec.start} and {spec.end} survives the cloud filter")
    days = np.asarray([to_day(t) for t in times])
    fv = fv_table(table, days, spec.phenology)
    for sub in ("stack", "cloud_mask", "truth"):
        (root / sub).mkdir()
    stamps = [str(t).replace("-", "").replace(":", "") for t in times]
    _write_rasters(root, spec, grid, table, blocks, times, covers, stamps, fv, progress)
    _write_parcels(root / "parcels.gpkg", spec, grid, table)
    n_stage_rows = _write_truth(root / "truth", spec, table, days)
    summary: dict[str, object] = {
        "generator_version": GENERATOR_VERSION,
        "spec": asdict(spec),
        "crs": grid.crs.to_string(),
        "transform": list(grid.transform)[:6],
        "width": grid.width,
        "height": grid.height,
        "bounds": _bounds(grid),
        "season_start": region.season_start,
        "band_names": list(S2_BANDS) if spec.bands == "s2" else ["NDVI"],
        "dates": [str(t) for t in times],
        "cloud_cover": [round(c, 4) for c in covers],
        "n_parcels": len(table.parcels),
        "n_fields": sum(c in ("cultivated land", "grassland") for c in table.classes),
        "n_stage_rows": n_stage_rows,
        "class_raster": {"path": "landcover.tif", "classes": {str(v): k for k, v in LANDCOVER_CODES.items()}},
        "region": asdict_region(region),
    }
    (root / "scene.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return summary


def _bounds(grid: Grid) -> list[float]:
    left, top = grid.transform.c, grid.transform.f
    return [left, top - grid.height * abs(grid.transform.e), left + grid.width * grid.transform.a, top]


def asdict_region(region: Region) -> dict[str, object]:
    """The region preset as plain JSON values (recorded in scene.json)."""
    out = asdict(region)
    return json.loads(json.dumps(out, default=str))


@dataclass
class _Layout:
    """What every window and date of the rasters share: the fine transform, map-frame shapes, the smooth fields."""

    #: Transform of the sub-pixel grid (``supersample`` × the resolution).
    fine: Affine
    blocks_map: list[shapely.Polygon]
    block_tree: shapely.STRtree
    parcels_map: list[shapely.Polygon]
    parcel_tree: shapely.STRtree
    het_field: SmoothField
    hedge_field: SmoothField
    haze_field: SmoothField
    #: Hedge where ``hedge_field`` is above it (the region's hedge share of the margins).
    hedge_thr: float
    #: Cloud shadows' offset from their clouds, in pixels (rows, columns).
    shift_px: tuple[float, float]


def _layout(spec: SceneSpec, grid: Grid, table: ParcelTable, blocks: list[shapely.Polygon]) -> _Layout:
    """The blocks and parcels in the pixel frame (with search trees) and the scene's smooth fields."""
    sensor = spec.sensor
    to_map = [1.0, 0.0, 0.0, -1.0, grid.transform.c, grid.transform.f]
    blocks_map = [affinity.affine_transform(b, to_map) for b in blocks]
    parcels_map = [affinity.affine_transform(p.geometry, to_map) for p in table.parcels]
    block_tree = shapely.STRtree(blocks_map)
    parcel_tree = shapely.STRtree(parcels_map)
    het_field = SmoothField(grid.width, grid.height, spec.pixel_m, spec.heterogeneity_scale_m, _rng(spec.seed, 7))
    hedge_field = SmoothField(grid.width, grid.height, spec.pixel_m, 400.0, _rng(spec.seed, 8))
    haze_field = SmoothField(grid.width, grid.height, spec.pixel_m, 3000.0, _rng(spec.seed, 9))
    hedge_thr = hedge_field.quantile(1.0 - REGIONS[spec.region].hedge_share)
    shift_px = (-sensor.shadow_shift_m[1] / spec.pixel_m, sensor.shadow_shift_m[0] / spec.pixel_m)
    return _Layout(grid.transform * Affine.scale(1.0 / spec.supersample), blocks_map, block_tree, parcels_map,
                   parcel_tree, het_field, hedge_field, haze_field, hedge_thr, shift_px)


@dataclass
class _DateDraws:
    """Each date's haze level, its no-data edge (whether there is one, its angle and cut) and its cloud field."""

    haze_levels: npt.NDArray[np.float32]
    edge_dates: npt.NDArray[np.bool_]
    edge_angle: npt.NDArray[np.float64]
    edge_cut: npt.NDArray[np.float64]
    clouds: list[tuple[SmoothField, float] | None]


def _date_draws(spec: SceneSpec, grid: Grid, covers: list[float], n_t: int) -> _DateDraws:
    """The draws of every date, in one fixed order from one generator."""
    sensor = spec.sensor
    date_rng = _rng(spec.seed, 10)
    haze_levels = date_rng.exponential(sensor.haze_mean, size=n_t).astype(np.float32)
    edge_dates = date_rng.uniform(size=n_t) < sensor.edge_nodata_share
    edge_angle = date_rng.uniform(0, 2 * np.pi, size=n_t)
    edge_cut = date_rng.uniform(0.55, 0.9, size=n_t)
    # each date's cloud field and threshold, built once on the coarse grid (not again for every window)
    clouds = [_cloud_field(spec, grid, t, cover) for t, cover in enumerate(covers)]
    return _DateDraws(haze_levels, edge_dates, edge_angle, edge_cut, clouds)


def _profiles(grid: Grid, s2: bool) -> tuple[dict[str, object], dict[str, object], dict[str, object]]:
    """The GeoTIFF profiles of the band files, the cloud masks and the land-cover raster."""
    profile = {
        "driver": "GTiff", "width": grid.width, "height": grid.height, "crs": grid.crs,
        "transform": grid.transform, "tiled": grid.width >= 256 and grid.height >= 256,
        "compress": "deflate",
    }
    if profile["tiled"]:
        profile.update(blockxsize=256, blockysize=256)
    if s2:
        band_profile = {**profile, "count": len(S2_BANDS), "dtype": "uint16", "nodata": DN_NODATA, "predictor": 2}
    else:
        band_profile = {**profile, "count": 1, "dtype": "float32", "nodata": NDVI_NODATA, "predictor": 3}
    mask_profile = {**profile, "count": 1, "dtype": "uint8", "nodata": 255}
    return band_profile, mask_profile, {**profile, "count": 1, "dtype": "uint8", "nodata": 0}


def _tag_dates(stack_files: list[DatasetWriter], mask_files: list[DatasetWriter], times: list[np.datetime64],
               names: list[str]) -> None:
    """Acquisition-date tags on every file, band names on the band files."""
    for f, when in zip(stack_files, times, strict=True):
        stamp = str(when)
        f.update_tags(ACQUISITIONDATE=stamp, TIFFTAG_DATETIME=stamp.replace("-", ":").replace("T", " "))
        for b, name in enumerate(names, start=1):
            f.set_band_description(b, name)
    for f, when in zip(mask_files, times, strict=True):
        f.update_tags(ACQUISITIONDATE=str(when), MEANING="1 = cloud or shadow, 0 = clear, 255 = no data")


@dataclass
class _WindowMix:
    """One window's sub-pixel covers and what every date of it shares."""

    #: ``(h, w, K)`` cover ids and their weights.
    cov_ids: npt.NDArray[np.int64]
    weights: npt.NDArray[np.float32]
    #: ``(h, w, K, 5)`` backgrounds, pre-weighted, and their sum over covers.
    bg: npt.NDArray[np.float32]
    bg_sum: npt.NDArray[np.float32]
    #: ``(h, w, K)`` within-field heterogeneity factor of the vegetation fraction.
    hfac: npt.NDArray[np.floating]
    rows: npt.NDArray[np.int64]
    cols: npt.NDArray[np.int64]


def _window_mix(win: _Window, spec: SceneSpec, grid: Grid, table: ParcelTable, layout: _Layout) -> _WindowMix:
    """Rasterise a window's covers at the sub-pixel resolution and mix them per pixel."""
    s = spec.supersample
    ids = _id_raster(win, layout.fine, s, grid, spec, layout.blocks_map, layout.block_tree, layout.parcels_map,
                     layout.parcel_tree, layout.hedge_field, layout.hedge_thr)
    cov_ids, weights = _covers(ids, s)
    bg = (weights[..., None] * table.background[cov_ids]).astype(np.float32)  # (h, w, K, 5) pre-weighted
    het = layout.het_field.window(win.row0, win.col0, win.height, win.width)[..., None]
    return _WindowMix(
        cov_ids=cov_ids, weights=weights, bg=bg, bg_sum=bg.sum(2), hfac=1.0 + table.het_amp[cov_ids] * het,
        rows=np.arange(win.height)[:, None] + win.row0, cols=np.arange(win.width)[None, :] + win.col0,
    )


def _landcover(win: _Window, table: ParcelTable, mix: _WindowMix) -> npt.NDArray[np.uint8]:
    """A window's land-cover codes: per pixel, the code with the largest share of its covers."""
    codes = table.cover_code[mix.cov_ids]
    cover = np.zeros((win.height, win.width), dtype=np.uint8)
    best = np.zeros((win.height, win.width), dtype=np.float32)
    for code in sorted(set(LANDCOVER_CODES.values())):
        share = np.where(codes == code, mix.weights, 0.0).sum(-1)
        better = share > best
        cover[better], best[better] = code, share[better]
    return cover


def _date_pixels(win: _Window, t: int, spec: SceneSpec, grid: Grid, fv: npt.NDArray[np.float32], mix: _WindowMix,
                 layout: _Layout, draws: _DateDraws
                 ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8], npt.NDArray[np.bool_]]:
    """Date ``t`` on a window: reflectance ``(h, w, 5)``, the cloud/shadow/no-data mask and the no-data pixels."""
    fvk = np.clip(fv[mix.cov_ids, t] * mix.hfac, 0.0, 1.0)  # (h, w, K)
    veg = (mix.weights * fvk).sum(-1)
    refl = veg[..., None] * VEGETATION + mix.bg_sum - (fvk[..., None] * mix.bg).sum(2)
    refl, mask = _atmosphere(refl, win, draws.clouds[t], spec, layout.shift_px, layout.haze_field,
                             float(draws.haze_levels[t]))
    refl = refl + _noise(spec.seed, t, win, len(S2_BANDS), spec.sensor.noise_sd)
    nodata = np.zeros(mask.shape, dtype=bool)
    if draws.edge_dates[t]:
        a = draws.edge_angle[t]
        proj = (mix.cols / grid.width - 0.5) * np.cos(a) + (mix.rows / grid.height - 0.5) * np.sin(a)
        nodata = np.broadcast_to(proj > draws.edge_cut[t] - 0.5, mask.shape)
    mask = np.where(nodata, 255, mask).astype(np.uint8)
    return refl, mask, nodata


def _write_date(stack_file: DatasetWriter, mask_file: DatasetWriter, win: _Window, refl: npt.NDArray[np.float32],
                mask: npt.NDArray[np.uint8], nodata: npt.NDArray[np.bool_], s2: bool) -> None:
    """Write one date's window: digital numbers (s2) or NDVI, with no data marked, and its mask."""
    if s2:
        dn = np.clip(np.rint(refl * 10000.0), 1, 65534).astype(np.uint16)
        dn[nodata] = DN_NODATA
        stack_file.write(np.moveaxis(dn, -1, 0), window=win.rio)
    else:
        nd = ndvi_of(np.clip(refl, 1e-4, None))
        nd[nodata] = NDVI_NODATA
        stack_file.write(nd, 1, window=win.rio)
    mask_file.write(mask, 1, window=win.rio)


def _write_rasters(root: Path, spec: SceneSpec, grid: Grid, table: ParcelTable, blocks: list[shapely.Polygon],
                   times: list[np.datetime64], covers: list[float], stamps: list[str],
                   fv: npt.NDArray[np.float32], progress: Callable[[int, int], None] | None) -> None:
    """The band files, cloud masks and land cover, window by window (a window's covers once for all its dates)."""
    layout = _layout(spec, grid, table, blocks)
    s2 = spec.bands == "s2"
    n_t = len(times)
    draws = _date_draws(spec, grid, covers, n_t)
    band_profile, mask_profile, cover_profile = _profiles(grid, s2)
    names = list(S2_BANDS) if s2 else ["NDVI"]
    stack_files = [rasterio.open(root / "stack" / f"S2_{st}.tif", "w", **band_profile) for st in stamps]
    mask_files = [rasterio.open(root / "cloud_mask" / f"S2_CLM_{st}.tif", "w", **mask_profile) for st in stamps]
    cover_file = rasterio.open(root / "landcover.tif", "w", **cover_profile)
    try:
        _tag_dates(stack_files, mask_files, times, names)
        windows = _windows(grid, spec.block_px)
        done, total = 0, len(windows) * n_t
        for win in windows:
            mix = _window_mix(win, spec, grid, table, layout)
            cover_file.write(_landcover(win, table, mix), 1, window=win.rio)
            for t in range(n_t):
                refl, mask, nodata = _date_pixels(win, t, spec, grid, fv, mix, layout, draws)
                _write_date(stack_files[t], mask_files[t], win, refl, mask, nodata, s2)
                done += 1
                if progress is not None:
                    progress(done, total)
    finally:
        for f in (*stack_files, *mask_files, cover_file):
            f.close()


#: Sensor noise is drawn in tiles of this many pixels, keyed by (date, tile): windows of any size agree.
NOISE_TILE = 64


def _noise(seed: int, t: int, win: _Window, bands: int, sd: float) -> npt.NDArray[np.float32]:
    """``(h, w, bands)`` Gaussian noise of date ``t`` on a window, the same whatever the window size."""
    out = np.empty((win.height, win.width, bands), dtype=np.float32)
    r0, c0 = win.row0 // NOISE_TILE, win.col0 // NOISE_TILE
    r1, c1 = (win.row0 + win.height - 1) // NOISE_TILE, (win.col0 + win.width - 1) // NOISE_TILE
    for tr in range(r0, r1 + 1):
        for tc in range(c0, c1 + 1):
            tile = _rng(seed, 11, t, tr, tc).normal(0.0, sd, size=(NOISE_TILE, NOISE_TILE, bands)).astype(np.float32)
            ra, ca = max(tr * NOISE_TILE, win.row0), max(tc * NOISE_TILE, win.col0)
            rb = min((tr + 1) * NOISE_TILE, win.row0 + win.height)
            cb = min((tc + 1) * NOISE_TILE, win.col0 + win.width)
            out[ra - win.row0:rb - win.row0, ca - win.col0:cb - win.col0] = \
                tile[ra - tr * NOISE_TILE:rb - tr * NOISE_TILE, ca - tc * NOISE_TILE:cb - tc * NOISE_TILE]
    return out


def _id_raster(win: _Window, fine: Affine, s: int, grid: Grid, spec: SceneSpec, blocks_map: list[shapely.Polygon],
               block_tree: shapely.STRtree, parcels_map: list[shapely.Polygon], parcel_tree: shapely.STRtree,
               hedge_field: SmoothField, hedge_thr: float) -> npt.NDArray[np.int64]:
    """``(h·s, w·s)`` cover ids of a window at the sub-pixel resolution (road, margin/hedge, parcels)."""
    shape = (win.height * s, win.width * s)
    wt = fine * Affine.translation(win.col0 * s, win.row0 * s)
    bounds = shapely.box(*rasterio.transform.array_bounds(shape[0], shape[1], wt))
    ids = np.full(shape, ROAD_ID, dtype=np.int64)
    bl = block_tree.query(bounds, predicate="intersects")
    if len(bl):
        burned = rasterize(((blocks_map[i], 1) for i in sorted(bl)), out_shape=shape, transform=wt, fill=0,
                           dtype="uint8")
        hedge = hedge_field.window(win.row0, win.col0, win.height, win.width) > hedge_thr
        hedge_fine = np.repeat(np.repeat(hedge, s, axis=0), s, axis=1)
        ids[burned == 1] = np.where(hedge_fine, HEDGE_ID, MARGIN_ID)[burned == 1]
    pl = parcel_tree.query(bounds, predicate="intersects")
    if len(pl):
        burned_p = rasterize(((parcels_map[i], FIRST_PARCEL_ID + int(i)) for i in sorted(pl)), out_shape=shape,
                             transform=wt, fill=-1, dtype="int32")
        ids = np.where(burned_p >= 0, burned_p, ids)
    return ids


def _cloud_field(spec: SceneSpec, grid: Grid, t: int, cover: float) -> tuple[SmoothField, float] | None:
    """Date ``t``'s cloud field and the threshold that covers ``cover`` of the scene (None: a clear date)."""
    if cover <= 0.005:
        return None
    fld = SmoothField(grid.width, grid.height, spec.pixel_m, spec.sensor.cloud_scale_m, _rng(spec.seed, 12, t))
    return fld, fld.quantile(1.0 - cover)


def _atmosphere(refl: npt.NDArray[np.float32], win: _Window, cloud: tuple[SmoothField, float] | None,
                spec: SceneSpec, shift_px: tuple[float, float], haze_field: SmoothField, haze_level: float
                ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
    """Clouds, shadows and haze on one date's window; returns reflectance and the cloud/shadow mask."""
    sensor = spec.sensor
    mask = np.zeros(refl.shape[:2], dtype=np.uint8)
    if cloud is not None:
        fld, thr = cloud
        f = fld.window(win.row0, win.col0, win.height, win.width)
        opacity = np.clip((f - thr) / sensor.cloud_edge, 0.0, 1.0)
        f_sh = fld.window(win.row0, win.col0, win.height, win.width, shift_px)
        shadow = np.clip((f_sh - thr) / sensor.cloud_edge, 0.0, 1.0) * (1.0 - opacity)
        refl = refl * (1.0 - sensor.shadow_darkening * shadow)[..., None]
        refl = refl * (1.0 - opacity)[..., None] + opacity[..., None] * CLOUD
        mask = ((opacity > sensor.mask_min_opacity) | (shadow > 0.3)).astype(np.uint8)
    haze = haze_level * (1.0 + 0.3 * haze_field.window(win.row0, win.col0, win.height, win.width))
    refl = refl + np.clip(haze, 0.0, None)[..., None] * HAZE
    return refl.astype(np.float32), mask


def _write_parcels(path: Path, spec: SceneSpec, grid: Grid, table: ParcelTable) -> None:
    to_map = [1.0, 0.0, 0.0, -1.0, grid.transform.c, grid.transform.f]
    start, end = to_day(np.datetime64(spec.start)), to_day(np.datetime64(spec.end))
    rows = []
    season_cols: set[str] = set()
    for p, fid, cls, fs in zip(table.parcels, table.field_ids, table.classes, table.seasons, strict=True):
        geom = affinity.affine_transform(p.geometry, to_map)
        row: dict[str, object] = {"field_id": fid, "class": cls, "land_use": p.use,
                                  "crop": "", "area_ha": round(geom.area / 1e4, 4), "geometry": geom}
        if fs is not None:
            in_period = [c for c in fs.cycles if start <= c.pos <= end]
            row["crop"] = in_period[0].crop if in_period else fs.cycles[0].crop
            for c in in_period:
                key = c.season.replace("-", "_")
                row[f"crop_{key}"] = c.crop
                row[f"sowing_{key}"] = "" if c.pre_stage == "harvested" else iso(c.sow)  # a regrowth is not sown
                row[f"harvest_{key}"] = iso(c.harvest) if c.harvest is not None else ""
                season_cols.update((f"crop_{key}", f"sowing_{key}", f"harvest_{key}"))
        rows.append(row)
    frame = gpd.GeoDataFrame(rows, geometry="geometry", crs=grid.crs)
    for col in sorted(season_cols):
        if col not in frame:
            frame[col] = ""
        frame[col] = frame[col].fillna("").astype(str)
    ordered = ["field_id", "class", "land_use", "crop", "area_ha", *sorted(season_cols), "geometry"]
    frame = frame[ordered]
    with fixed_gpkg_date():
        frame.to_file(path, layer="parcels", driver="GPKG", engine="pyogrio")


def _write_truth(folder: Path, spec: SceneSpec, table: ParcelTable, days: npt.NDArray[np.float64]) -> int:
    params = spec.phenology
    dates = [iso(d) for d in days]
    start, end = days.min(), days.max()
    n = 0
    with open(folder / "stages.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["field_id", "date", "stage"])
        for fid, fs in zip(table.field_ids, table.seasons, strict=True):
            if fs is None:
                continue
            for d, ds in zip(days, dates, strict=True):
                w.writerow([fid, ds, fs.stage(float(d), params)])
                n += 1
    with open(folder / "key_dates.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["field_id", "season", "green_up", "peak", "senescence", "harvest", "crop"])
        for fid, fs in zip(table.field_ids, table.seasons, strict=True):
            if fs is None:
                continue
            for c in fs.cycles:
                if start <= c.pos <= end:
                    harvest = iso(c.harvest) if c.harvest is not None and not c.is_cut else ""
                    w.writerow([fid, c.season, iso(c.green_up), iso(c.pos), iso(c.senescence), harvest, c.crop])
    return n
