"""Names shared by recipes, inference, evaluators and the explorer: growth stages and table columns.

Growth-stage tables are *long*: one row per (field, date). Key-date tables have one row per (field, season).
Both are CSV or GeoPackage/GeoJSON attribute tables (a geometry column is allowed and ignored by evaluators).
"""

from __future__ import annotations

#: Growth stages, in phenological order (the words the model answers with).
GROWTH_STAGES: tuple[str, ...] = ("dormant", "green-up", "peak", "senescence", "harvested")

#: Columns of a growth-stage table: field id, acquisition date (ISO ``YYYY-MM-DD``), stage (a GROWTH_STAGES word).
STAGE_COLUMNS: tuple[str, ...] = ("field_id", "date", "stage")

#: Key phenological dates per field and season (ISO dates; empty where not reached).
KEY_DATE_COLUMNS: tuple[str, ...] = ("field_id", "season", "green_up", "peak", "senescence")

#: Columns of a field-boundary prediction layer (plus ``geometry`` in the stack's CRS).
FIELD_PREDICTION_COLUMNS: tuple[str, ...] = ("chip_id", "task", "score", "tokens")
