"""Inputs of a recipe: source specs (``sample:`` or paths), the parcel layer, the class raster, checksums."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

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
from agrivlm.sample import SAMPLE_ROOT

#: Prefix of specs that point into the embedded sample (``sample:ndvi`` → ``agrivlm/sample_data/…/ndvi``).
SAMPLE_SCHEME = "sample:"

#: Class word of parcels whose class cell is empty.
UNKNOWN_CLASS = "unknown"


def resolve_spec(spec: str, base_dir: str | os.PathLike[str] | None = None) -> str:
    """A source spec → a path or glob pattern usable by ``open_stack``/``geopandas``.

    ``sample:<rel>`` resolves inside the embedded sample; a relative path resolves against ``base_dir``
    (the recipe file's folder); ``~`` is expanded. Globs are returned as patterns.

    Raises:
        ConfigError: a ``sample:`` spec naming nothing in the sample.

    """
    if spec.startswith(SAMPLE_SCHEME):
        rel = spec[len(SAMPLE_SCHEME):].lstrip("/")
        path = SAMPLE_ROOT / rel
        if not path.exists():
            have = ", ".join(sorted(p.name for p in SAMPLE_ROOT.iterdir() if not p.name.startswith(".")))
            raise ConfigError(f"{spec}: not in the embedded sample ({SAMPLE_ROOT}); it has: {have}")
        return str(path)
    path = Path(os.path.expanduser(spec))
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return str(path)


def portable_spec(spec: str, base_dir: str | os.PathLike[str] | None = None) -> str:
    """The spec written into records: ``sample:`` specs as they are, anything else as an absolute path."""
    if spec.startswith(SAMPLE_SCHEME):
        return spec
    return str(Path(resolve_spec(spec, base_dir)).resolve())


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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
    if not path.exists():
        raise IngestError(f"{path}: no such parcel file (source.parcels: {spec})")
    try:
        frame = gpd.read_file(path, layer=layer) if layer else gpd.read_file(path)
    except Exception as exc:  # pyogrio raises several types for unreadable files; name the file
        raise IngestError(f"{path}: cannot be read as a vector layer ({exc})") from exc
    if frame.crs is None:
        raise IngestError(f"{path}: the parcel layer has no CRS; set one (e.g. ogr2ogr -a_srs EPSG:xxxx)")
    for col, key in ((id_column, "id_column"), (class_column, "class_column")):
        if col is not None and col not in frame.columns:
            raise IngestError(
                f"{path}: no column {col!r} (source.{key}); columns are: {', '.join(map(str, frame.columns))}"
            )
    counts = {"read": len(frame), "repaired": 0, "dropped_empty": 0, "dropped_not_polygon": 0}
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
    frame = gpd.GeoDataFrame({"field_id": ids, "cls": cls}, geometry=frame.geometry.values, crs=frame.crs)
    frame = frame.to_crs(crs)
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
    return frame[["field_id", "cls", "area_m2", "geometry"]], counts


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
