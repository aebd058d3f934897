"""Inputs of a recipe: source specs (``sample:`` or paths), the parcel layer, the class raster, checksums."""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import numpy.typing as npt
import pandas as pd
import rasterio
import shapely
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from agrivlm.errors import ConfigError, IngestError
from agrivlm.geo.coords import GeoGrid
from agrivlm.io import read_vector, require_crs
from agrivlm.recipes.config import (
    ClassRasterConfig,
    LabelsConfig,
    PhenologyConfig,
    RecipeConfig,
    SceneSplitConfig,
    SourceConfig,
    SourceEntry,
)
from agrivlm.recipes.context import rng_for
from agrivlm.recipes.schema import SPLITS
from agrivlm.recipes.splits import allocate
from agrivlm.sample import resolve_spec
from agrivlm.tasks.questions import UNKNOWN_CLASS


def load_parcels(
    spec: str,
    base_dir: str | os.PathLike[str] | None,
    crs: object,
    *,
    layer: str | None = None,
    id_column: str | None = None,
    class_column: str | None = None,
    class_names: dict[str, str] | None = None,
) -> tuple[gpd.GeoDataFrame, dict[str, int]]:
    """Read a parcel layer, reproject it to ``crs`` and normalise it.

    Returns:
        A GeoDataFrame sorted by ``field_id`` (str) with columns ``field_id``, ``cls`` (class word),
        ``area_m2`` (area in the stack CRS's units², after reprojection) and ``geometry`` (valid
        polygons/multipolygons in ``crs``), and counts of what was fixed or dropped
        (``repaired``, ``dropped_empty``, ``dropped_not_polygon``).

    Raises:
        IngestError: unreadable file, no CRS, missing column, duplicate ids — naming the file.

    """
    path = Path(resolve_spec(spec, base_dir))
    frame = _read_layer(path, spec, layer, id_column, class_column)
    counts = {"read": len(frame), "repaired": 0, "dropped_empty": 0, "dropped_not_polygon": 0}
    frame = _ids_and_classes(frame, path, id_column, class_column, class_names)
    parcels = _polygons_only(frame.to_crs(crs), counts)
    return parcels, counts


def _read_layer(
    path: Path, spec: str, layer: str | None, id_column: str | None, class_column: str | None
) -> gpd.GeoDataFrame:
    """The parcel layer as read; an :class:`IngestError` naming the file when it cannot serve as one."""
    frame = read_vector(path, "parcel layer", IngestError, layer=layer, hint=f" (source.parcels: {spec})")
    require_crs(frame, path, "parcel layer", IngestError)
    for col, key in ((id_column, "id_column"), (class_column, "class_column")):
        if col is not None and col not in frame.columns:
            raise IngestError(
                f"{path}: no column {col!r} (source.{key}); columns are: {', '.join(map(str, frame.columns))}"
            )
    return frame


def _ids_and_classes(
    frame: gpd.GeoDataFrame, path: Path, id_column: str | None, class_column: str | None,
    class_names: dict[str, str] | None,
) -> gpd.GeoDataFrame:
    """``field_id`` (str, unique) and ``cls`` (class word, renamed by ``class_names``) with the layer's geometry."""
    ids = frame[id_column].astype(str) if id_column else pd.Series([str(i) for i in range(len(frame))])
    ids.index = frame.index
    dup = ids[ids.duplicated()]
    if len(dup):
        raise IngestError(f"{path}: parcel id {dup.iloc[0]!r} appears more than once in column {id_column!r}")
    names = class_names or {}
    if class_column:
        raw = frame[class_column].fillna("").astype(str).str.strip()
        cls = raw.map(lambda v: names.get(v, v) if v else UNKNOWN_CLASS)
    else:
        cls = pd.Series(["parcel"] * len(frame), index=frame.index)
    return gpd.GeoDataFrame({"field_id": ids, "cls": cls}, geometry=frame.geometry.values, crs=frame.crs)


def _polygons_only(frame: gpd.GeoDataFrame, counts: dict[str, int]) -> gpd.GeoDataFrame:
    """Invalid geometries repaired, empty and non-polygonal ones dropped (tallied in ``counts``), sorted by id."""
    geoms = frame.geometry.values
    invalid = ~shapely.is_valid(geoms)
    counts["repaired"] = int(invalid.sum())
    if invalid.any():
        geoms = np.where(invalid, shapely.make_valid(geoms), geoms)
        # make_valid may return collections: keep their polygonal parts
        geoms = np.array([_polygonal(g) for g in geoms], dtype=object)
    frame = frame.set_geometry(gpd.GeoSeries(geoms, index=frame.index, crs=frame.crs))
    empty = frame.geometry.is_empty | frame.geometry.isna()
    counts["dropped_empty"] = int(empty.sum())
    frame = frame[~empty]
    poly = frame.geometry.geom_type.isin(["Polygon", "MultiPolygon"])
    counts["dropped_not_polygon"] = int((~poly).sum())
    frame = frame[poly].copy()
    frame["area_m2"] = frame.geometry.area
    frame = frame.sort_values("field_id", kind="stable").reset_index(drop=True)
    return frame[["field_id", "cls", "area_m2", "geometry"]]


def _polygonal(geom: shapely.Geometry) -> shapely.Geometry:
    if geom is None or geom.geom_type in ("Polygon", "MultiPolygon"):
        return geom
    parts = [g for g in getattr(geom, "geoms", []) if g.geom_type in ("Polygon", "MultiPolygon")]
    return shapely.union_all(parts) if parts else shapely.Polygon()


@dataclass
class ClassRaster:
    """A land-cover class raster read window by window on the stack's grid (warped with nearest if needed).

    Use as a context manager; :meth:`read` returns the class codes of one window of the stack's grid.
    """

    path: Path
    grid: GeoGrid
    classes: dict[int, str]
    ignore: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self._ds: rasterio.io.DatasetReader | None = None
        self._vrt: WarpedVRT | None = None

    def __enter__(self) -> ClassRaster:
        try:
            self._ds = rasterio.open(self.path)
        except rasterio.errors.RasterioIOError as exc:
            raise IngestError(f"{self.path}: cannot be opened as a class raster ({exc})") from exc
        ds = self._ds
        if ds.crs is None:
            raise IngestError(f"{self.path}: the class raster has no CRS; fix the file, agrivlm never guesses one")
        same = (
            ds.crs == self.grid.crs
            and ds.width == self.grid.width
            and ds.height == self.grid.height
            and ds.transform.almost_equals(self.grid.transform, precision=1e-9 * abs(self.grid.transform.a))
        )
        if not same:
            self._vrt = WarpedVRT(
                ds, crs=self.grid.crs, transform=self.grid.transform, width=self.grid.width,
                height=self.grid.height, resampling=Resampling.nearest,
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._vrt is not None:
            self._vrt.close()
        if self._ds is not None:
            self._ds.close()
        self._ds = self._vrt = None

    def read(self, window: Window) -> npt.NDArray[np.int64]:
        """Class codes ``(h, w)`` of ``window`` on the stack's grid; nodata and ``ignore`` values → −1."""
        src = self._vrt if self._vrt is not None else self._ds
        if src is None:
            raise RuntimeError("ClassRaster.read outside its `with` block")
        arr = src.read(1, window=window, masked=True)
        codes = np.asarray(arr.data).astype(np.int64)
        codes[np.ma.getmaskarray(arr)] = -1
        known = np.isin(codes, list(self.classes)) & ~np.isin(codes, list(self.ignore))
        codes[~known] = -1
        return codes


# -- the sources of a recipe -------------------------------------------------------------------------------
#: What a synthetic scene folder (``agrivlm synth --out DIR``) holds, relative to it.
SCENE_FILES = {"scene.json": "file", "stack": "dir", "cloud_mask": "dir", "parcels.gpkg": "file",
               "truth/stages.csv": "file", "truth/key_dates.csv": "file"}

#: Band names of the ``s2`` preset of ``agrivlm synth`` (reflectance, in file order).
S2_BANDS = ("B02", "B03", "B04", "B08", "B11")


@dataclass(frozen=True)
class ResolvedSource:
    """One concrete source of a recipe run: files, labels, how its chips get a split, its mixture weight."""

    #: Chip-id prefix (``NAME/r000000_c000000``); ``None`` for the single ``source:`` of a recipe.
    name: str | None
    source: SourceConfig
    labels: LabelsConfig | None
    #: Every chip goes to this split; ``None`` = geographic blocks within the source (the recipe's ``split:``).
    split: str | None
    #: The ``sources:`` entry it came from (``sources[i]``); mixture weights are per entry.
    group: str
    #: The entry's weight in each mixture component.
    weight: float
    #: A synthetic scene's ``scene.json`` (``None`` for a real source).
    scene: dict[str, Any] | None = None
    #: Start (``MM-DD``) of this source's season windows, when it is not the recipe's
    #: ``phenology.season_start`` (a synthetic scene's region: its truth labels seasons by it).
    season_start: str | None = None

    @property
    def label(self) -> str:
        """The name used in messages and the manifest."""
        return self.name if self.name is not None else "source"


def _scene_index(scene: dict[str, Any], path: Path) -> dict[str, Any]:
    """``band`` / ``normalized_difference`` for a scene from its band names.

    The names are ``band_names``, else those of the band set ``spec.bands`` or ``bands`` (``ndvi`` | ``s2``).
    """
    spec = scene["spec"] if isinstance(scene.get("spec"), dict) else {}
    bands = scene.get("band_names") or spec.get("bands") or scene.get("bands")
    names = list(S2_BANDS) if bands == "s2" else ["NDVI"] if bands == "ndvi" else bands
    if isinstance(names, list) and [str(b).lower() for b in names] == ["ndvi"]:
        return {"band": 1}
    if isinstance(names, list) and "B08" in names and "B04" in names:
        return {"normalized_difference": ("B08", "B04")}
    raise ConfigError(
        f"{path}: bands {bands!r} give no NDVI; a synthetic scene needs bands ndvi, or s2 (B04 and B08)"
    )


def synth_scene(folder: Path, entry: SourceEntry) -> tuple[SourceConfig, LabelsConfig, dict[str, Any]]:
    """The source, labels and ``scene.json`` of one folder written by ``agrivlm synth``.

    Raises:
        ConfigError: a part of the scene is missing or ``scene.json`` is unreadable, naming the path.

    """
    for rel, kind in SCENE_FILES.items():
        path = folder / rel
        if not (path.is_dir() if kind == "dir" else path.is_file()):
            raise ConfigError(
                f"{path}: missing; {folder} is not a complete synthetic scene (write one with "
                f"`agrivlm synth --out {folder} --seed N`)"
            )
    meta = folder / "scene.json"
    try:
        scene = json.loads(meta.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{meta}: cannot be read as JSON ({exc})") from exc
    if not isinstance(scene, dict):
        raise ConfigError(f"{meta}: expected a JSON object with the generator's parameters")
    class_raster = entry.class_raster
    raster = scene.get("class_raster")
    if class_raster is None and isinstance(raster, dict) and (folder / str(raster.get("path"))).is_file():
        try:
            classes = {int(k): str(v) for k, v in dict(raster["classes"]).items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{meta}: class_raster.classes must map codes to class words ({exc})") from exc
        class_raster = ClassRasterConfig(path=str(folder / str(raster["path"])), classes=classes)
    source = SourceConfig(
        stack=str(folder / "stack"), masks=str(folder / "cloud_mask"), parcels=str(folder / "parcels.gpkg"),
        id_column="field_id", class_column="class", index_name=entry.index_name, same_day=entry.same_day,
        class_names=entry.class_names, class_raster=class_raster, **_scene_index(scene, meta),
    )
    labels = LabelsConfig(stages=str(folder / "truth" / "stages.csv"),
                          key_dates=str(folder / "truth" / "key_dates.csv"), derive="never")
    return source, labels, scene


def _season_start(scene: dict[str, Any], folder: Path) -> str | None:
    """The scene's ``season_start`` (its truth's season labels follow it), checked; ``None`` if not recorded."""
    value = scene.get("season_start")
    if value is None:
        return None
    try:
        return PhenologyConfig(season_start=str(value)).season_start
    except ValueError as exc:
        raise ConfigError(f"{folder / 'scene.json'}: season_start {value!r} is not a day as MM-DD") from exc


def _scene_folders(entry: SourceEntry, where: str, base_dir: str | os.PathLike[str] | None) -> list[Path]:
    pattern = resolve_spec(str(entry.synth), base_dir)
    if any(ch in pattern for ch in "*?["):
        found = sorted(Path(p).resolve() for p in glob.glob(pattern) if Path(p).is_dir())
    else:
        found = [Path(pattern).resolve()] if Path(pattern).is_dir() else []
    if not found:
        raise ConfigError(
            f"{pattern}: no synthetic scene folder there ({where}.synth: {entry.synth}); write one with "
            "`agrivlm synth --out DIR --seed N`, or fix the path (relative paths start at the recipe file)"
        )
    return found


def deal_scenes(names: list[str], rule: SceneSplitConfig) -> dict[str, str]:
    """Whole scenes → splits: ``names`` (sorted) shuffled with ``rule.seed`` and dealt by ``rule.fractions``.

    The deal depends only on the set of names and the seed, so every recipe over the same scene folders
    with the same seed (the three curriculum stages, a mixed recipe) puts each scene in the same split.
    Adding or removing a scene may move others: pin one with ``split: train`` on its own entry.
    """
    ordered = sorted(names)
    order = [ordered[int(i)] for i in rng_for(rule.seed, "scene-split").permutation(len(ordered))]
    counts = allocate({k: rule.fractions.get(k, 0.0) for k in SPLITS}, len(order), at_least_one=True)  # type: ignore[call-overload]
    out: dict[str, str] = {}
    pos = 0
    for split in SPLITS:
        for name in order[pos:pos + counts[split]]:
            out[name] = split
        pos += counts[split]
    return out


def resolve_sources(cfg: RecipeConfig, base_dir: str | os.PathLike[str] | None) -> list[ResolvedSource]:
    """The concrete sources of a recipe, each with its split rule settled.

    Its ``source:``, or every ``sources:`` entry with ``synth:`` globs expanded to one source per scene
    folder (sorted by path).

    Raises:
        ConfigError: a ``synth:`` path matching no scene, an incomplete scene, two sources with one name.

    """
    if cfg.source is not None:
        gs = cfg.tasks.growth_stages
        return [ResolvedSource(None, cfg.source, gs.labels if gs is not None else None, None, "source", 1.0)]
    out: list[ResolvedSource] = []
    for i, entry in enumerate(cfg.sources or []):
        where = f"sources[{i}]"
        fixed: str | None = entry.split if isinstance(entry.split, str) else None
        if entry.synth is None:
            name = entry.name or f"source{i}"
            if isinstance(entry.split, SceneSplitConfig):  # one scene: dealt whole to one split
                fixed = deal_scenes([name], entry.split)[name]
            out.append(ResolvedSource(name, entry.to_source(), entry.labels, fixed, where, entry.weight))
            continue
        scenes = []
        folder_of: dict[str, Path] = {}
        for folder in _scene_folders(entry, where, base_dir):
            name = f"{entry.name}.{folder.name}" if entry.name else folder.name
            folder_of[name] = folder
            source, labels, scene = synth_scene(folder, entry)
            scenes.append((name, source, labels, scene))
        # dealt by folder name, so a named entry (NAME.folder) deals its scenes as an unnamed one does
        dealt = deal_scenes([folder_of[n].name for n, *_ in scenes], entry.split) \
            if isinstance(entry.split, SceneSplitConfig) else {}
        for name, source, labels, scene in scenes:
            split = dealt.get(folder_of[name].name, fixed)
            out.append(ResolvedSource(name, source, labels, split, where, entry.weight, scene,
                                      _season_start(scene, folder_of[name])))
    names = [s.name for s in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ConfigError(f"sources: two sources are named {dup!r}; give the entries distinct name: keys")
    return out
