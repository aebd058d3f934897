"""Growth-stage evaluation: per-date stage accuracy, temporal IoU of stage segments, key-date errors.

Inputs are the long tables of :mod:`agrivlm.schema` — stages: ``STAGE_COLUMNS`` (``field_id, date, stage``,
one row per field and acquisition date, ``stage`` a :data:`~agrivlm.schema.GROWTH_STAGES` word); key dates:
``KEY_DATE_COLUMNS`` (``field_id, season, green_up, peak, senescence``, ISO dates, empty where not reached)
— as CSV, GeoPackage, GeoJSON or Parquet (a geometry column is ignored). Dates are compared as calendar days
(``2021-04-01T10:30`` is ``2021-04-01``), so stage tables hold at most one stage per field and day.

What the numbers mean (``summary.json`` keys):

* ``accuracy``: share of the truth's (field, date) pairs whose predicted stage equals the true one. A pair
  with no prediction counts as wrong (``n_missing``); predicted pairs absent from the truth are ignored
  (``n_extra``).
* ``macro_f1``: unweighted mean over stages of ``F1 = 2·TP / (2·TP + FP + FN)``, over the stages present in
  the truth or predicted on a truth pair; a missing prediction is a false negative of the true stage.
* ``temporal_iou``: each date owns a cell of the time axis — from the midpoint with the previous date to the
  midpoint with the next; the first and last dates reach out by half of their one neighbouring gap, and a
  lone date owns one day centred on it. A stage *segment* (a run of consecutive dates with that stage) thus
  covers ``[first date − half the gap before, last date + half the gap after]``. For each field and each
  stage present in its truth or prediction, IoU (in days) of the union of true segments and the union of
  predicted segments, each on its own table's dates of that field; ``temporal_iou`` is the mean over all
  (field, stage) pairs, ``temporal_iou_per_stage`` the mean per stage. A field with no prediction scores 0.
* ``key_dates``: per key date (green-up, peak, senescence), over the (field, season) rows where the truth
  has that date: absolute error in days where the prediction has it too (mean, median, max, count), and the
  count of truth dates the prediction misses (no row or an empty cell); predicted dates absent from the
  truth are counted as ``n_extra``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from agrivlm.errors import EvalError
from agrivlm.eval.common import GROWTH_REPORT_FILES, check_outputs, json_safe, ratio
from agrivlm.io import read_table as read_attribute_table
from agrivlm.io import write_json
from agrivlm.schema import GROWTH_STAGES, KEY_DATE_COLUMNS, STAGE_COLUMNS

#: Key-date columns of :data:`~agrivlm.schema.KEY_DATE_COLUMNS` (after ``field_id, season``).
KEY_DATES: tuple[str, ...] = KEY_DATE_COLUMNS[2:]

#: Column of the confusion matrix for truth pairs without a prediction.
MISSING = "missing"

FloatArray = npt.NDArray[np.float64]
_DAY = np.timedelta64(86400, "s")


# ------------------------------------------------------------------------------------------ reading
def read_table(src: str | Path | pd.DataFrame, columns: Sequence[str], role: str) -> tuple[pd.DataFrame, str]:
    """Read a CSV / GPKG / GeoJSON / Parquet attribute table and check it has ``columns``.

    Returns:
        ``(frame, source)``: the table with ``columns`` as strings (``""`` for empty cells) and a name for messages.

    Raises:
        EvalError: missing or unreadable file, missing columns.

    """
    if isinstance(src, pd.DataFrame):
        frame, source = pd.DataFrame(src), f"<{role} DataFrame>"
    else:
        source = str(src)
        frame = read_attribute_table(src, role, EvalError)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise EvalError(
            f"{source}: the {role} table lacks column(s) {missing}; it needs {list(columns)} "
            f"(agrivlm.schema), it has {[c for c in frame.columns if c != 'geometry']}"
        )
    out = frame[list(columns)].copy()
    for c in columns:
        out[c] = pd.Series([_cell(v) for v in out[c]], index=out.index, dtype=object)
    return out, source


def _cell(value: Any) -> str:
    """A table cell as a stripped string; missing values → ``""``."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NaT:
        return ""
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _parse_dates(values: pd.Series, source: str, column: str, allow_empty: bool) -> npt.NDArray[np.datetime64]:
    """ISO dates → calendar days as ``datetime64[s]`` at midnight (a time part is dropped; NaT for empty cells)."""
    out = np.full(len(values), np.datetime64("NaT"), dtype="datetime64[s]")
    for k, text in enumerate(values):
        if text == "":
            if not allow_empty:
                raise EvalError(f"{source}: row {k + 1} has no {column}; every row needs an ISO date (YYYY-MM-DD)")
            continue
        try:
            out[k] = np.datetime64(pd.Timestamp(text).tz_localize(None).to_datetime64(), "D")
        except (ValueError, TypeError) as exc:
            raise EvalError(f"{source}: row {k + 1}: {column}={text!r} is not an ISO date (YYYY-MM-DD)") from exc
    return out


def read_stage_table(src: str | Path | pd.DataFrame, role: str) -> tuple[pd.DataFrame, str]:
    """A stage table as ``field_id`` (str), ``date`` (``datetime64[s]``), ``stage`` (a GROWTH_STAGES word).

    Stage words are matched case-insensitively. Identical duplicate rows are dropped; one (field, date) with
    two different stages is an error.

    Raises:
        EvalError: unknown stage word, bad date, conflicting duplicates (naming the file and the row).

    """
    frame, source = read_table(src, STAGE_COLUMNS, role)
    stages = frame["stage"].str.lower()
    unknown = ~stages.isin(GROWTH_STAGES)
    if unknown.any():
        rows = np.flatnonzero(unknown.to_numpy())[:5] + 1
        words = sorted(set(frame["stage"][unknown]))[:5]
        raise EvalError(
            f"{source}: unknown stage word(s) {words} (rows {rows.tolist()}); use one of {list(GROWTH_STAGES)}"
        )
    out = pd.DataFrame({
        "field_id": frame["field_id"], "date": _parse_dates(frame["date"], source, "date", allow_empty=False),
        "stage": stages,
    }).drop_duplicates()
    dup = out.duplicated(["field_id", "date"], keep=False)
    if dup.any():
        first = out[dup].iloc[0]
        raise EvalError(
            f"{source}: field {first['field_id']!r} has several stages on {str(first['date'])[:10]} "
            f"({sorted(out[dup & (out.field_id == first.field_id) & (out.date == first.date)].stage)}); "
            "keep one row per field and date"
        )
    return out.sort_values(["field_id", "date"], ignore_index=True), source


def read_key_date_table(src: str | Path | pd.DataFrame, role: str) -> tuple[pd.DataFrame, str]:
    """A key-date table: ``field_id``, ``season`` (str) and one ``datetime64[s]`` column per key date (NaT: none).

    Raises:
        EvalError: bad date, duplicate (field, season) rows.

    """
    frame, source = read_table(src, KEY_DATE_COLUMNS, role)
    out = pd.DataFrame({"field_id": frame["field_id"], "season": frame["season"]})
    for key in KEY_DATES:
        out[key] = _parse_dates(frame[key], source, key, allow_empty=True)
    dup = out.duplicated(["field_id", "season"])
    if dup.any():
        row = out[dup].iloc[0]
        raise EvalError(
            f"{source}: field {row['field_id']!r} season {row['season']!r} appears more than once; "
            "keep one row per field and season"
        )
    return out, source


# ------------------------------------------------------------------------------------------ pure math
def date_cells(days: npt.ArrayLike) -> FloatArray:
    """The extent of the time axis each date owns (a Voronoi cell on the line).

    Args:
        days: ``(N,)`` strictly increasing dates in days (any origin).

    Returns:
        ``(N, 2)`` ``[start, end]`` in days: cell ``i`` runs from the midpoint with date ``i − 1`` to the
        midpoint with date ``i + 1``; the first and last cells reach out by half of their one neighbouring gap;
        a lone date owns ``[d − 0.5, d + 0.5]``. Cells tile ``[d_0 − g_0/2, d_n + g_n/2]`` without overlap.

    """
    d = np.asarray(days, dtype=np.float64).ravel()
    if d.size == 0:
        return np.zeros((0, 2))
    if d.size == 1:
        return np.array([[d[0] - 0.5, d[0] + 0.5]])
    if np.any(np.diff(d) <= 0):
        raise ValueError("date_cells needs strictly increasing dates")
    mid = (d[:-1] + d[1:]) / 2.0
    start = np.concatenate([[d[0] - (d[1] - d[0]) / 2.0], mid])
    end = np.concatenate([mid, [d[-1] + (d[-1] - d[-2]) / 2.0]])
    return np.stack([start, end], axis=1)


def merge_intervals(intervals: npt.ArrayLike) -> FloatArray:
    """``(K, 2)`` intervals → sorted, disjoint ``(K', 2)`` intervals covering the same set (touching ones merge)."""
    iv = np.asarray(intervals, dtype=np.float64).reshape(-1, 2)
    if iv.shape[0] == 0:
        return iv
    iv = iv[np.argsort(iv[:, 0], kind="stable")]
    out = [iv[0].copy()]
    for s, e in iv[1:]:
        if s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append(np.array([s, e]))
    return np.array(out)


def intersection_length(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Length of the intersection of two sets of disjoint intervals (each ``(K, 2)``, sorted)."""
    a, b = merge_intervals(a), merge_intervals(b)
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i, 0], b[j, 0]), min(a[i, 1], b[j, 1])
        total += max(0.0, hi - lo)
        if a[i, 1] < b[j, 1]:
            i += 1
        else:
            j += 1
    return total


def interval_iou(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """IoU of two interval sets on a line (lengths in the intervals' unit); NaN when both are empty."""
    a, b = merge_intervals(a), merge_intervals(b)
    inter = intersection_length(a, b)
    union = float((a[:, 1] - a[:, 0]).sum() + (b[:, 1] - b[:, 0]).sum()) - inter
    return ratio(inter, union)


def stage_segments(days: npt.ArrayLike, stages: npt.ArrayLike, stage: str) -> FloatArray:
    """``(K, 2)`` merged extents (days) of the runs of ``stage`` in a field's dated stage sequence."""
    cells = date_cells(days)
    mask = np.asarray(stages) == stage
    return merge_intervals(cells[mask]) if mask.any() else np.zeros((0, 2))


def _days(dates: npt.NDArray[np.datetime64]) -> FloatArray:
    return np.asarray((dates - np.datetime64(0, "s")) / _DAY, dtype=np.float64)


# ------------------------------------------------------------------------------------------ results
@dataclass
class StageScores:
    """Per-date stage scores over the truth's (field, date) pairs."""

    accuracy: float
    macro_f1: float
    #: F1 of each stage with support (truth or prediction), in GROWTH_STAGES order.
    f1_per_stage: dict[str, float]
    n_pairs: int
    n_correct: int
    n_missing: int
    n_extra: int
    #: ``(5, 6)`` counts: rows = true stage, columns = predicted stage then ``missing`` (GROWTH_STAGES order).
    confusion: npt.NDArray[np.int64] = field(repr=False)
    temporal_iou: float = math.nan
    temporal_iou_per_stage: dict[str, float] = field(default_factory=dict)
    #: One row per true field: ``field_id, n_dates, n_correct, n_missing, accuracy, temporal_iou``.
    per_field: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Scores as plain JSON values (NaN → ``None``)."""
        return json_safe({
            "accuracy": self.accuracy, "macro_f1": self.macro_f1, "temporal_iou": self.temporal_iou,
            "f1_per_stage": self.f1_per_stage, "temporal_iou_per_stage": self.temporal_iou_per_stage,
            "n_pairs": self.n_pairs, "n_correct": self.n_correct, "n_missing": self.n_missing,
            "n_extra": self.n_extra, "confusion": {
                "rows_truth": list(GROWTH_STAGES), "columns_pred": [*GROWTH_STAGES, MISSING],
                "counts": self.confusion.tolist(),
            },
        })


@dataclass
class KeyDateScores:
    """Absolute key-date errors in days, per key date (see the module docstring)."""

    #: Per key date: ``n_truth, n_compared, n_missing, n_extra, mean_abs_days, median_abs_days, max_abs_days``.
    per_key: dict[str, dict[str, float]]
    #: One row per truth (field, season): ``field_id, season`` and per key ``<key>_truth, <key>_pred, <key>_abs_days``.
    table: pd.DataFrame = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Scores as plain JSON values (NaN → ``None``)."""
        return json_safe(self.per_key)


@dataclass
class GrowthEvaluation:
    """Growth-stage scores (stages and/or key dates) of a prediction against a truth."""

    stages: StageScores | None
    key_dates: KeyDateScores | None
    sources: dict[str, str]
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        """The ``summary.json`` content (stage keys at the top level, key dates under ``key_dates``)."""
        out: dict[str, Any] = dict(self.stages.to_dict()) if self.stages else {}
        out["key_dates"] = self.key_dates.to_dict() if self.key_dates else None
        out["sources"] = self.sources
        out["notes"] = self.notes
        out["definitions"] = GROWTH_DEFINITIONS
        return json_safe(out)


#: Short definitions written into every growth summary.json.
GROWTH_DEFINITIONS: dict[str, str] = {
    "accuracy": "share of truth (field, date) pairs with the right predicted stage; missing predictions are wrong",
    "macro_f1": "mean F1 over stages present in truth or prediction; a missing prediction is a FN of the true stage",
    "temporal_iou": "mean over (field, stage) of the IoU in days of true vs predicted stage segments; a date owns "
    "the axis from the midpoint with its previous date to the midpoint with its next (ends: half the gap)",
    "key_dates": "absolute error in days per key date where both have it; n_missing: truth dates not predicted",
}


# ------------------------------------------------------------------------------------------ evaluation
def evaluate_stages(pred: str | Path | pd.DataFrame, truth: str | Path | pd.DataFrame) -> StageScores:
    """Stage accuracy, macro-F1, confusion counts and temporal IoU of a stage table against the truth's."""
    p, _ = read_stage_table(pred, "prediction")
    t, _ = read_stage_table(truth, "truth")
    merged = t.merge(p, on=["field_id", "date"], how="left", suffixes=("_true", "_pred"))
    merged["stage_pred"] = merged["stage_pred"].fillna(MISSING)
    n_extra = len(p) - int((merged["stage_pred"] != MISSING).sum())
    cols = [*GROWTH_STAGES, MISSING]
    confusion = np.zeros((len(GROWTH_STAGES), len(cols)), dtype=np.int64)
    rows = merged["stage_true"].map(GROWTH_STAGES.index).to_numpy(int)
    np.add.at(confusion, (rows, merged["stage_pred"].map(cols.index).to_numpy(int)), 1)
    n_pairs, n_correct = len(merged), int(np.trace(confusion[:, : len(GROWTH_STAGES)]))
    f1_per_stage = {}
    for k, stage in enumerate(GROWTH_STAGES):
        tp = confusion[k, k]
        fp = confusion[:, k].sum() - tp
        fn = confusion[k].sum() - tp
        if tp + fp + fn > 0:
            f1_per_stage[stage] = float(2 * tp / (2 * tp + fp + fn))
    correct = merged["stage_true"] == merged["stage_pred"]
    per_field = (
        merged.assign(correct=correct, missing=merged["stage_pred"] == MISSING)
        .groupby("field_id", sort=True)
        .agg(n_dates=("date", "size"), n_correct=("correct", "sum"), n_missing=("missing", "sum"))
        .reset_index()
    )
    per_field["accuracy"] = per_field["n_correct"] / per_field["n_dates"]
    t_iou, t_iou_stage, field_iou = _temporal_iou(t, p)
    per_field["temporal_iou"] = per_field["field_id"].map(field_iou)
    return StageScores(
        accuracy=ratio(n_correct, n_pairs),
        macro_f1=float(np.mean(list(f1_per_stage.values()))) if f1_per_stage else math.nan,
        f1_per_stage=f1_per_stage, n_pairs=n_pairs, n_correct=n_correct,
        n_missing=int(confusion[:, -1].sum()), n_extra=n_extra, confusion=confusion,
        temporal_iou=t_iou, temporal_iou_per_stage=t_iou_stage, per_field=per_field,
    )


def _temporal_iou(t: pd.DataFrame, p: pd.DataFrame) -> tuple[float, dict[str, float], dict[str, float]]:
    """Mean temporal IoU over (field, stage), per stage, and per field (fields of the truth only)."""
    pred_by_field = {fid: g for fid, g in p.groupby("field_id", sort=False)}
    scores: dict[str, list[float]] = {s: [] for s in GROWTH_STAGES}
    per_field: dict[str, float] = {}
    for fid, tg in t.groupby("field_id", sort=True):
        t_days, t_st = _days(tg["date"].to_numpy()), tg["stage"].to_numpy()
        pg = pred_by_field.get(fid)
        p_days = _days(pg["date"].to_numpy()) if pg is not None else np.zeros(0)
        p_st = pg["stage"].to_numpy() if pg is not None else np.zeros(0, dtype=str)
        field_scores = []
        for stage in GROWTH_STAGES:
            if not (np.any(t_st == stage) or np.any(p_st == stage)):
                continue
            iou = interval_iou(stage_segments(t_days, t_st, stage), stage_segments(p_days, p_st, stage))
            scores[stage].append(iou)
            field_scores.append(iou)
        per_field[str(fid)] = float(np.mean(field_scores))
    flat = [v for vs in scores.values() for v in vs]
    per_stage = {s: float(np.mean(v)) for s, v in scores.items() if v}
    return (float(np.mean(flat)) if flat else math.nan), per_stage, per_field


def evaluate_key_dates(pred: str | Path | pd.DataFrame, truth: str | Path | pd.DataFrame) -> KeyDateScores:
    """Absolute errors in days of the key dates (green-up, peak, senescence) per truth (field, season)."""
    p, _ = read_key_date_table(pred, "prediction")
    t, _ = read_key_date_table(truth, "truth")
    merged = t.merge(p, on=["field_id", "season"], how="left", suffixes=("_truth", "_pred"))
    extra = p.merge(t, on=["field_id", "season"], how="left", suffixes=("_pred", "_truth"))
    table = merged[["field_id", "season"]].copy()
    per_key: dict[str, dict[str, float]] = {}
    for key in KEY_DATES:
        tv, pv = merged[f"{key}_truth"].to_numpy(), merged[f"{key}_pred"].to_numpy()
        err = np.abs((pv - tv) / _DAY).astype(np.float64)  # NaN where either is NaT
        has_t, has_both = ~np.isnat(tv), ~np.isnan(err)
        n_extra = int((~np.isnat(extra[f"{key}_pred"].to_numpy()) & np.isnat(extra[f"{key}_truth"].to_numpy())).sum())
        vals = err[has_both]
        per_key[key] = {
            "n_truth": int(has_t.sum()), "n_compared": int(has_both.sum()),
            "n_missing": int((has_t & np.isnat(pv)).sum()), "n_extra": n_extra,
            "mean_abs_days": float(vals.mean()) if vals.size else math.nan,
            "median_abs_days": float(np.median(vals)) if vals.size else math.nan,
            "max_abs_days": float(vals.max()) if vals.size else math.nan,
        }
        table[f"{key}_truth"] = merged[f"{key}_truth"].dt.strftime("%Y-%m-%d").fillna("")
        table[f"{key}_pred"] = merged[f"{key}_pred"].dt.strftime("%Y-%m-%d").fillna("")
        table[f"{key}_abs_days"] = err
    return KeyDateScores(per_key=per_key, table=table)


def key_dates_from_stages(stages: str | Path | pd.DataFrame, season_start: str = "01-01") -> pd.DataFrame:
    """Key dates read off a stage table: per field and season, the first date of each key stage.

    ``green_up`` = the first ``green-up`` date, ``peak`` = the first ``peak`` date, ``senescence`` = the first
    ``senescence`` date of the season (the start of that stage, as the recipes' key dates mark the end of
    the peak stage). Seasons run from ``season_start`` (``MM-DD``) for a year and are named by the year they
    start in, as the recipes name them. A stage never reached in a season leaves its cell empty.

    Returns:
        A key-date table with the columns of :data:`agrivlm.schema.KEY_DATE_COLUMNS` (ISO dates, "" = none).

    """
    table, _ = read_stage_table(stages, "stages")
    month, day = (int(x) for x in season_start.split("-"))
    dates = pd.to_datetime(table["date"])
    before_start = (dates.dt.month < month) | ((dates.dt.month == month) & (dates.dt.day < day))
    table = table.assign(season=(dates.dt.year - before_start.astype(int)).astype(str),
                         day=dates.dt.strftime("%Y-%m-%d"))
    stage_of_key = {"green_up": "green-up", "peak": "peak", "senescence": "senescence"}
    rows = []
    for (fid, season), group in table.sort_values("date").groupby(["field_id", "season"], sort=True):
        row = {"field_id": fid, "season": season}
        for key, stage in stage_of_key.items():
            hit = group.loc[group["stage"] == stage, "day"]
            row[key] = hit.iloc[0] if len(hit) else ""
        rows.append(row)
    return pd.DataFrame(rows, columns=list(KEY_DATE_COLUMNS))


def evaluate_growth(
    pred: str | Path | pd.DataFrame | None = None,
    truth: str | Path | pd.DataFrame | None = None,
    *,
    pred_key_dates: str | Path | pd.DataFrame | None = None,
    truth_key_dates: str | Path | pd.DataFrame | None = None,
) -> GrowthEvaluation:
    """Score growth-stage predictions: stage tables (``pred``, ``truth``) and/or key-date tables.

    Raises:
        EvalError: only one of a pair given, or unusable tables (the message names the file).

    """
    if (pred is None) != (truth is None):
        raise EvalError("growth evaluation needs both --pred and --truth stage tables, or neither")
    if (pred_key_dates is None) != (truth_key_dates is None):
        raise EvalError("key-date evaluation needs both --pred-key-dates and --truth-key-dates, or neither")
    if pred is None and pred_key_dates is None:
        raise EvalError(
            "nothing to evaluate: pass --pred/--truth stage tables and/or --pred-key-dates/--truth-key-dates"
        )
    stages = evaluate_stages(pred, truth) if pred is not None and truth is not None else None
    keys = (
        evaluate_key_dates(pred_key_dates, truth_key_dates)
        if pred_key_dates is not None and truth_key_dates is not None else None
    )
    notes = []
    if stages is not None and stages.n_missing:
        notes.append(f"{stages.n_missing} truth (field, date) pair(s) have no prediction and count as wrong")
    if stages is not None and stages.n_extra:
        notes.append(f"{stages.n_extra} predicted (field, date) pair(s) are not in the truth and were ignored")
    sources = {
        name: (str(v) if not isinstance(v, pd.DataFrame) else "<DataFrame>")
        for name, v in (("pred", pred), ("truth", truth), ("pred_key_dates", pred_key_dates),
                        ("truth_key_dates", truth_key_dates)) if v is not None
    }
    return GrowthEvaluation(stages=stages, key_dates=keys, sources=sources, notes=notes)


# ------------------------------------------------------------------------------------------ report
def write_growth_report(result: GrowthEvaluation, out: str | Path, overwrite: bool = False) -> dict[str, Path]:
    """Write ``summary.json``, ``stages.csv`` (per field), ``confusion_matrix.png`` and ``key_dates.csv``.

    Returns:
        The written paths by name (only those that apply).

    """
    from agrivlm.io import atomic_path  # agrivlm.geo loads dask: only when writing

    out = Path(out)
    check_outputs(out, GROWTH_REPORT_FILES, overwrite)
    paths: dict[str, Path] = {}
    if result.stages is not None:
        paths["stages.csv"] = out / "stages.csv"
        with atomic_path(paths["stages.csv"]) as tmp:
            result.stages.per_field.to_csv(tmp, index=False, float_format="%.8g")
        paths["confusion_matrix.png"] = out / "confusion_matrix.png"
        plot_confusion(result.stages, paths["confusion_matrix.png"])
    if result.key_dates is not None:
        paths["key_dates.csv"] = out / "key_dates.csv"
        with atomic_path(paths["key_dates.csv"]) as tmp:
            result.key_dates.table.to_csv(tmp, index=False, float_format="%.3f")
    paths["summary.json"] = out / "summary.json"
    write_json(paths["summary.json"], result.to_dict(), strict=True)
    return paths


def plot_confusion(scores: StageScores, target: Path) -> None:
    """Confusion matrix PNG: rows = true stage, columns = predicted stage (GROWTH_STAGES order, then missing).

    Colours are row-normalised (recall per true stage); cells show counts.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from agrivlm.io import atomic_path

    counts = scores.confusion
    show_missing = counts[:, -1].sum() > 0
    counts = counts if show_missing else counts[:, :-1]
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    fig, ax = plt.subplots(figsize=(6.5 if show_missing else 5.8, 5))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (r, c), n in np.ndenumerate(counts):
        ax.text(c, r, str(n), ha="center", va="center", color="white" if share[r, c] > 0.5 else "black")
    cols = [*GROWTH_STAGES, MISSING][: counts.shape[1]]
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(GROWTH_STAGES)), GROWTH_STAGES)
    ax.set(xlabel="predicted stage", ylabel="true stage",
           title=f"accuracy {scores.accuracy:.3f}, macro-F1 {scores.macro_f1:.3f} ({scores.n_pairs} pairs)")
    fig.colorbar(im, ax=ax, label="share of true stage")
    fig.tight_layout()
    with atomic_path(target) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
