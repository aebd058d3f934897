"""Load and check what the explorer was started with: the stack, field layers and growth-stage tables.

Every loader raises :class:`ExploreError` (an :class:`~agrivlm.errors.AgriVLMError`) naming the file and
the problem, so the page can show one clear message instead of a traceback. Layers are returned in the
stack's CRS with a string ``field_id`` column; stage tables with ``field_id`` (str), ``date``
(``datetime64[ns]``, the acquisition day) and ``stage`` (a :data:`~agrivlm.schema.GROWTH_STAGES` word).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import geopandas as gpd
import pandas as pd
from rasterio.crs import CRS
from shapely.geometry.base import BaseGeometry

from agrivlm.explore.errors import ExploreError
from agrivlm.geo.coords import GeoGrid
from agrivlm.io import field_ids, read_vector, require_crs, unique_ids
from agrivlm.schema import FIELD_PREDICTION_COLUMNS, GROWTH_STAGES, STAGE_COLUMNS

#: Columns tried, in order, for the ids of a true-field layer when none is given: the first that exists
#: and is unique wins; ``index`` falls back to the row number when the layer has no such column.

#: Suffixes read as field layers (polygons) and as growth-stage tables.
LAYER_SUFFIXES: tuple[str, ...] = (".gpkg", ".geojson", ".json", ".parquet", ".fgb", ".shp")
TABLE_SUFFIXES: tuple[str, ...] = (".csv",)

FieldKind = Literal["predicted", "true"]


@dataclass
class MapLayer:
    """Field polygons of one file, in the stack's CRS."""

    #: Polygons with a unique string ``field_id`` and a ``kind`` column (``"predicted"`` / ``"true"``).
    frame: gpd.GeoDataFrame
    #: The file read.
    path: Path
    #: Where the ids came from: a column name or ``"row number"``.
    id_source: str
    #: Things the user should know (reprojection, skipped id columns, dropped rows), one sentence each.
    notes: list[str] = field(default_factory=list)


def split_inputs(paths: Sequence[str | os.PathLike[str]], option: str) -> tuple[list[Path], list[Path]]:
    """Sort ``--predictions`` / ``--truth`` paths into field layers and stage tables by suffix.

    Raises:
        ExploreError: a path that does not exist or has a suffix the explorer does not read.

    """
    layers: list[Path] = []
    tables: list[Path] = []
    for item in paths:
        path = Path(item)
        if not path.is_file():
            raise ExploreError(f"{path}: no such file (given with {option}); check the path")
        suffix = path.suffix.lower()
        if suffix in LAYER_SUFFIXES:
            layers.append(path)
        elif suffix in TABLE_SUFFIXES:
            tables.append(path)
        else:
            raise ExploreError(
                f"{path}: unknown kind of file for {option}; give a field layer "
                f"({', '.join(LAYER_SUFFIXES)}) or a growth-stage table (.csv)"
            )
    return layers, tables


def _prediction_ids(frame: gpd.GeoDataFrame) -> tuple[pd.Series, str]:
    if "field_id" in frame.columns and unique_ids(frame["field_id"]):
        return frame["field_id"].astype(str), "field_id"
    rank = frame.groupby("chip_id", sort=False).cumcount()
    return frame["chip_id"].astype(str) + "#" + rank.astype(str), "chip_id#n"


def read_map_layer(
    path: str | os.PathLike[str],
    grid: GeoGrid,
    kind: FieldKind,
    id_column: str | None = None,
) -> MapLayer:
    """Read a field layer and reproject it to the stack's CRS.

    Args:
        path: GeoPackage, GeoJSON, GeoParquet, FlatGeobuf or Shapefile of polygons, in any CRS.
        grid: the stack's grid (its CRS is the target; its footprint is checked for overlap).
        kind: ``"predicted"`` (columns :data:`~agrivlm.schema.FIELD_PREDICTION_COLUMNS` required; ids from
            ``field_id`` when unique, else ``chip_id#n``) or ``"true"`` (ids from ``id_column``, default
            the first unique of :data:`agrivlm.io.FIELD_ID_COLUMNS`).
        id_column: column holding the ids of true fields.

    Raises:
        ExploreError: missing or unreadable file, no CRS, missing columns, no polygon.

    """
    path = Path(path)
    if not path.is_file():
        raise ExploreError(f"{path}: no such file; check the path")
    frame = read_vector(path, "field layer", ExploreError)
    notes: list[str] = []
    _check_layer_kind(frame, path, kind)
    frame = _polygons_only(frame, path, notes)
    frame = _in_stack_crs(frame, path, grid, notes)
    if kind == "true":
        ids, id_source, id_notes = field_ids(frame, path, id_column, ExploreError, "--truth-id")
        notes.extend(id_notes)
    else:
        ids, id_source = _prediction_ids(frame)
    frame = frame.assign(field_id=ids.to_numpy(), kind=kind)
    _check_overlap(frame, path, grid, notes)
    frame = frame.reset_index(drop=True)
    return MapLayer(frame=frame, path=path, id_source=id_source, notes=notes)


def _check_layer_kind(frame: gpd.GeoDataFrame, path: Path, kind: FieldKind) -> None:
    """Refuse a layer without a CRS, and a prediction layer without the prediction columns."""
    require_crs(frame, path, "layer", ExploreError)
    if kind == "predicted":
        missing = [c for c in FIELD_PREDICTION_COLUMNS if c not in frame.columns]
        if missing:
            raise ExploreError(
                f"{path}: a prediction layer needs the columns {', '.join(FIELD_PREDICTION_COLUMNS)}; "
                f"missing {', '.join(missing)} (is this a truth layer? pass it with --truth)"
            )


def _polygons_only(frame: gpd.GeoDataFrame, path: Path, notes: list[str]) -> gpd.GeoDataFrame:
    """The rows with a polygon (the others are left out, with a note); refuse a layer with none."""
    empty = frame.geometry.isna() | frame.geometry.is_empty
    if empty.any():
        notes.append(f"{int(empty.sum())} row(s) without geometry left out")
        frame = frame.loc[~empty]
    polygonal = frame.geometry.geom_type.isin(["Polygon", "MultiPolygon"])
    if not polygonal.all():
        notes.append(f"{int((~polygonal).sum())} row(s) that are not polygons left out")
        frame = frame.loc[polygonal]
    if frame.empty:
        raise ExploreError(f"{path}: no polygon to show (the layer is empty or holds no polygons)")
    return frame


def _in_stack_crs(frame: gpd.GeoDataFrame, path: Path, grid: GeoGrid, notes: list[str]) -> gpd.GeoDataFrame:
    """The polygons in the stack's CRS, invalid ones repaired; refuse "degrees" that cannot be degrees."""
    source_crs = CRS.from_user_input(frame.crs)
    minx, miny, maxx, maxy = frame.total_bounds
    if source_crs.is_geographic and (min(minx, miny) < -180 or maxx > 360 or maxy > 90 or miny < -90):
        raise ExploreError(
            f"{path}: coordinates up to {_fmt_bounds(frame.total_bounds)} are not degrees, but the layer declares "
            f"the geographic CRS {source_crs.to_string()}; is the layer's declared CRS the one its coordinates are in?"
        )
    if source_crs != grid.crs:
        frame = frame.to_crs(grid.crs.to_wkt())
        notes.append(f"reprojected from {source_crs.to_string()} to the stack's {grid.crs.to_string()}")
    else:
        frame = frame.set_crs(grid.crs.to_wkt(), allow_override=True)
    invalid = ~frame.geometry.is_valid
    if invalid.any():
        frame = frame.assign(geometry=frame.geometry.make_valid())
        notes.append(f"{int(invalid.sum())} invalid polygon(s) repaired (make_valid)")
    return frame


def _check_overlap(frame: gpd.GeoDataFrame, path: Path, grid: GeoGrid, notes: list[str]) -> None:
    """Refuse a layer that misses the stack entirely; note the polygons outside it."""
    footprint = grid.footprint()
    overlaps = frame.geometry.intersects(footprint)
    if not overlaps.any():
        raise ExploreError(
            f"{path}: none of its {len(frame)} polygons overlaps the stack (layer bounds "
            f"{_fmt_bounds(frame.total_bounds)} vs stack {_fmt_bounds(grid.bounds)} in {grid.crs.to_string()}); "
            "is the layer's declared CRS the one its coordinates are in?"
        )
    if not overlaps.all():
        notes.append(f"{int((~overlaps).sum())} of {len(frame)} polygon(s) lie outside the stack")


def _fmt_bounds(bounds: Sequence[float]) -> str:
    return "(" + ", ".join(f"{b:.1f}" for b in bounds) + ")"


def read_map_stages(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a growth-stage table (CSV with :data:`~agrivlm.schema.STAGE_COLUMNS`; extra columns are kept).

    Returns:
        one row per (field, date): ``field_id`` str, ``date`` ``datetime64[ns]`` (normalized to the day),
        ``stage`` str, plus the file's other columns.

    Raises:
        ExploreError: missing file or columns, a date that is not ISO ``YYYY-MM-DD``, an unknown stage word.

    """
    path = Path(path)
    if not path.is_file():
        raise ExploreError(f"{path}: no such file; check the path")
    try:
        table = pd.read_csv(path, dtype={"field_id": str, "stage": str, "date": str}, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ExploreError(f"{path}: cannot be read as CSV ({exc})") from exc
    missing = [c for c in STAGE_COLUMNS if c not in table.columns]
    if missing:
        raise ExploreError(
            f"{path}: a growth-stage table needs the columns {', '.join(STAGE_COLUMNS)}; missing {', '.join(missing)}"
        )
    dates = pd.to_datetime(table["date"].str.strip(), format="ISO8601", errors="coerce")
    bad = dates.isna()
    if bad.any():
        row = int(bad.to_numpy().nonzero()[0][0])
        raise ExploreError(
            f"{path}: line {row + 2}: date {table['date'].iloc[row]!r} is not an ISO date (YYYY-MM-DD)"
        )
    stages = table["stage"].str.strip().str.lower()
    unknown = ~stages.isin(GROWTH_STAGES)
    if unknown.any():
        row = int(unknown.to_numpy().nonzero()[0][0])
        raise ExploreError(
            f"{path}: line {row + 2}: stage {table['stage'].iloc[row]!r} is not one of {', '.join(GROWTH_STAGES)}"
        )
    dates = dates.dt.tz_localize(None) if dates.dt.tz is not None else dates
    return table.assign(
        field_id=table["field_id"].str.strip(), date=dates.dt.normalize().astype("datetime64[ns]"), stage=stages
    )


def field_geometry(layers: Sequence[MapLayer], field_id: str, kind: FieldKind) -> BaseGeometry | None:
    """The polygon of ``field_id`` among the layers of ``kind`` (stack CRS), or ``None``."""
    for layer in layers:
        rows = layer.frame[(layer.frame["field_id"] == field_id) & (layer.frame["kind"] == kind)]
        if not rows.empty:
            return rows.geometry.iloc[0]
    return None
