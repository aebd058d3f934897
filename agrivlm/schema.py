"""Names shared by recipes, inference, evaluators and the explorer: growth stages and table columns.

Growth-stage tables are *long*: one row per (field, date). Key-date tables have one row per (field, season).
Both are CSV or GeoPackage/GeoJSON attribute tables (a geometry column is allowed and ignored by evaluators).
"""

from __future__ import annotations

from pathlib import PurePath

#: Growth stages, in phenological order (the words the model answers with).
GROWTH_STAGES: tuple[str, ...] = ("dormant", "green-up", "peak", "senescence", "harvested")

#: Columns of a growth-stage table: field id, acquisition date (ISO ``YYYY-MM-DD``), stage (a GROWTH_STAGES word).
STAGE_COLUMNS: tuple[str, ...] = ("field_id", "date", "stage")

#: Key phenological dates per field and season (ISO dates; empty where not reached).
KEY_DATE_COLUMNS: tuple[str, ...] = ("field_id", "season", "green_up", "peak", "senescence")

#: Columns of a field-boundary prediction layer (plus ``geometry``: in the stack's CRS; EPSG:4326 in GeoJSON).
FIELD_PREDICTION_COLUMNS: tuple[str, ...] = ("chip_id", "task", "score", "tokens")

#: Formats of the prediction layer of ``agrivlm infer --out``, by suffix → what is written.
PREDICTION_FORMATS: dict[str, str] = {
    ".gpkg": "GeoPackage",
    ".parquet": "GeoParquet 1.1",
    ".fgb": "FlatGeobuf",
    ".geojson": "GeoJSON, RFC 7946 lon/lat",
}


def prediction_format_problem(path: PurePath) -> str | None:
    """Why ``path`` cannot be the layer of ``agrivlm infer --out`` (its suffix is no format), or None."""
    if path.suffix.lower() in PREDICTION_FORMATS:
        return None
    kinds = ", ".join(f"{suffix} ({what})" for suffix, what in PREDICTION_FORMATS.items())
    return f"{path}: unknown output format {path.suffix or '(no suffix)'!r}; use one of {kinds}"
