"""Phenology per parcel: index curves, cloud masking, gap fill, Savitzky–Golay, amplitude thresholds, stages.

The method is TIMESAT's amplitude-threshold one (Jönsson & Eklundh 2004), on a curve smoothed by an
upper-envelope Savitzky–Golay filter (Chen et al. 2004):

1. **curve**: the mean index over a parcel's *clear* pixels on each date (cloud-masked with the stack's
   masks); a date where less than ``min_clear_fraction`` of the parcel is clear is a gap;
2. **gap fill**: linear interpolation of the valid observations onto a regular grid of ``step_days``;
3. **smoothing**: Savitzky–Golay (``savgol_window_days``, ``savgol_order``); then, ``envelope_iterations``
   times, observations below the fit are lifted to it (residual cloud and shadow only ever lower NDVI)
   and the curve is refitted;
4. **seasons**: one per year from ``season_start``. The peak (POS) is the curve's maximum inside the
   season; the left/right minima are searched up to ``season_margin_days`` outside it; the left/right
   amplitudes are peak − minimum. Start of season (SOS) = the first up-crossing of
   ``min_left + sos_fraction·amp_left`` after the left minimum; end of season (EOS) = the last
   down-crossing of ``min_right + eos_fraction·amp_right`` before the right minimum; the ``peak`` stage runs
   from the up-crossing to the down-crossing of ``peak_fraction`` of the amplitudes. Crossings are
   interpolated linearly between grid samples. A season whose peak sits on the edge of the season or of
   the observed period, or whose amplitudes are below ``min_amplitude`` or below ``min_relative_amplitude``
   of the curve's whole range, is not a season.
5. **stages** on a date of a season: ``dormant`` before SOS, ``green-up`` from SOS, ``peak`` from the
   peak-stage start, ``senescence`` from the peak-stage end (the key date ``senescence``), and after EOS
   ``harvested`` or ``dormant`` (``post_season``; ``auto`` says harvested when the fall from peak-stage
   end to EOS is abrupt, at most ``harvest_max_days``).

Times are float **days since 1970-01-01** in the pure functions (:func:`to_days` / :func:`from_days`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import geopandas as gpd
import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy.signal import savgol_filter

from agrivlm.errors import ConfigError, IngestError
from agrivlm.geo.dates import day_str, iso_day, season_windows, to_days
from agrivlm.io import read_table
from agrivlm.recipes.config import LabelsConfig, PhenologyConfig
from agrivlm.recipes.scan import StackScan
from agrivlm.sample import resolve_spec
from agrivlm.schema import GROWTH_STAGES, KEY_DATE_COLUMNS, STAGE_COLUMNS

FloatArray = npt.NDArray[np.float64]

_DAY = np.timedelta64(86400, "s")
def season_of(label: str) -> str:
    """The season window of a key-date label: ``2021-2`` (a second cycle) → ``2021``; ``2021`` → ``2021``."""
    base, _, k = label.rpartition("-")
    return base if base and k.isdigit() else label


# -- pure curve math ---------------------------------------------------------------------------------------
def gap_fill(
    obs_days: npt.ArrayLike, obs_values: npt.ArrayLike, step_days: float, span: tuple[float, float] | None = None
) -> tuple[FloatArray, FloatArray]:
    """Linear interpolation of the finite observations onto a regular grid.

    Args:
        obs_days: ``(N,)`` observation times in days.
        obs_values: ``(N,)`` values, NaN = gap.
        step_days: grid spacing in days.
        span: ``(first, last)`` day of the grid (default: the observations' range); the curve is held
            constant beyond the first/last valid observation.

    Returns:
        ``grid`` ``(M,)`` days and ``filled`` ``(M,)`` values.

    Raises:
        ValueError: fewer than two finite observations.

    """
    d, v = np.asarray(obs_days, dtype=np.float64), np.asarray(obs_values, dtype=np.float64)
    ok = np.isfinite(v)
    if ok.sum() < 2:
        raise ValueError(f"gap_fill needs at least two valid observations, got {int(ok.sum())}")
    lo, hi = span if span is not None else (float(d.min()), float(d.max()))
    grid = np.arange(lo, hi + 1e-9, step_days, dtype=np.float64)
    order = np.argsort(d[ok], kind="stable")
    return grid, np.interp(grid, d[ok][order], v[ok][order])


def savgol_samples(step_days: float, window_days: float, order: int, n: int) -> int:
    """Savitzky–Golay window length in samples: odd, > ``order``, ≤ ``n`` (0 when ``n`` is too short)."""
    wl = int(round(window_days / step_days))
    wl = max(wl, order + 2)
    wl += 1 - wl % 2
    if wl > n:
        wl = n - (1 - n % 2)
    return wl if wl > order else 0


def smooth_curve(
    obs_days: npt.ArrayLike,
    obs_values: npt.ArrayLike,
    step_days: float,
    window_days: float,
    order: int,
    envelope_iterations: int = 2,
    span: tuple[float, float] | None = None,
) -> tuple[FloatArray, FloatArray]:
    """Gap-filled, Savitzky–Golay-smoothed curve with upper-envelope adaptation.

    Returns:
        ``grid`` ``(M,)`` days and ``smooth`` ``(M,)`` index values.

    """
    d = np.asarray(obs_days, dtype=np.float64)
    v = np.asarray(obs_values, dtype=np.float64).copy()
    grid, filled = gap_fill(d, v, step_days, span)
    wl = savgol_samples(step_days, window_days, order, grid.size)
    smooth = savgol_filter(filled, wl, order, mode="interp") if wl else filled
    ok = np.isfinite(v)
    for _ in range(envelope_iterations):
        fit = np.interp(d, grid, smooth)
        v[ok] = np.maximum(v[ok], fit[ok])
        grid, filled = gap_fill(d, v, step_days, span)
        smooth = savgol_filter(filled, wl, order, mode="interp") if wl else filled
    return grid, smooth


def _up_crossing(grid: FloatArray, curve: FloatArray, start: int, stop: int, thr: float) -> float | None:
    """First day in ``grid[start..stop]`` where ``curve`` rises to ``thr`` (linear between samples)."""
    for i in range(start + 1, stop + 1):
        if curve[i] >= thr:
            a, b = curve[i - 1], curve[i]
            if a >= thr:
                return float(grid[i - 1])
            return float(grid[i - 1] + (thr - a) / (b - a) * (grid[i] - grid[i - 1]))
    return None


def _down_crossing(grid: FloatArray, curve: FloatArray, start: int, stop: int, thr: float) -> float | None:
    """Last day in ``grid[start..stop]`` where ``curve`` falls to ``thr`` (searching back from ``stop``)."""
    for i in range(stop - 1, start - 1, -1):
        if curve[i] >= thr:
            a, b = curve[i], curve[i + 1]
            if b >= thr:
                return float(grid[i + 1])
            return float(grid[i] + (a - thr) / (a - b) * (grid[i + 1] - grid[i]))
    return None


@dataclass(frozen=True)
class Season:
    """One growing season of one curve. Days are float days since 1970-01-01."""

    #: Label, the year the season starts in (``"2016"``).
    label: str
    #: ``[start, end)`` of the season window.
    start: float
    end: float
    #: Start of season (green-up).
    sos: float
    #: Start of the ``peak`` stage.
    peak_start: float
    #: Peak of season (the curve's maximum).
    pos: float
    #: End of the ``peak`` stage = start of senescence.
    senescence: float
    #: End of season.
    eos: float
    #: Curve minimum before / after the peak, and the peak value (index units).
    base_left: float
    base_right: float
    peak_value: float
    #: Stage after EOS: ``harvested`` or ``dormant``.
    post_stage: str

    @property
    def amplitude(self) -> float:
        """Peak minus the mean of the two minima."""
        return self.peak_value - 0.5 * (self.base_left + self.base_right)

    def stage_at(self, day: float) -> str | None:
        """The stage on ``day`` (``None`` outside the season window)."""
        if not self.start <= day < self.end:
            return None
        if day < self.sos:
            return "dormant"
        if day < self.peak_start:
            return "green-up"
        if day < self.senescence:
            return "peak"
        if day < self.eos:
            return "senescence"
        return self.post_stage




def detect_season(
    grid: FloatArray,
    curve: FloatArray,
    window: tuple[str, float, float],
    observed: tuple[float, float],
    cfg: PhenologyConfig,
) -> Season | None:
    """Amplitude-threshold phenology of one season window of a smoothed curve (see the module docstring).

    Args:
        grid: ``(M,)`` days of the curve samples, increasing.
        curve: ``(M,)`` smoothed index.
        window: ``(label, start, end)`` of the season.
        observed: ``(first, last)`` day with a valid observation; nothing outside is trusted.
        cfg: thresholds and margins.

    """
    label, start, end = window
    first, last = observed
    in_win = np.flatnonzero((grid >= start) & (grid < end) & (grid >= first) & (grid <= last))
    if in_win.size < 3:
        return None
    ipk = int(in_win[np.argmax(curve[in_win])])
    if ipk in (in_win[0], in_win[-1]):
        return None  # the maximum is on an edge: the real peak lies outside what this season saw
    margin = cfg.season_margin_days
    left = np.flatnonzero((grid >= max(start - margin, first)) & (grid <= grid[ipk]))
    right = np.flatnonzero((grid >= grid[ipk]) & (grid <= min(end + margin, last)))
    il = int(left[np.argmin(curve[left])])
    ir = int(right[np.argmin(curve[right])])
    peak = float(curve[ipk])
    base_l, base_r = float(curve[il]), float(curve[ir])
    amp_l, amp_r = peak - base_l, peak - base_r
    whole = float(curve[(grid >= first) & (grid <= last)].max() - curve[(grid >= first) & (grid <= last)].min())
    if min(amp_l, amp_r) < max(cfg.min_amplitude, cfg.min_relative_amplitude * whole):
        return None
    sos = _up_crossing(grid, curve, il, ipk, base_l + cfg.sos_fraction * amp_l)
    pk0 = _up_crossing(grid, curve, il, ipk, base_l + cfg.peak_fraction * amp_l)
    sen = _down_crossing(grid, curve, ipk, ir, base_r + cfg.peak_fraction * amp_r)
    eos = _down_crossing(grid, curve, ipk, ir, base_r + cfg.eos_fraction * amp_r)
    if sos is None or pk0 is None or sen is None or eos is None:
        return None
    if cfg.post_season == "auto":
        post = "harvested" if eos - sen <= cfg.harvest_max_days else "dormant"
    else:
        post = cfg.post_season
    return Season(
        label=label, start=start, end=end, sos=sos, peak_start=pk0, pos=float(grid[ipk]), senescence=sen,
        eos=eos, base_left=base_l, base_right=base_r, peak_value=peak, post_stage=post,
    )


# -- per parcel ---------------------------------------------------------------------------------------------
@dataclass
class FieldPhenology:
    """The curve and seasons of one parcel."""

    field_id: str
    cls: str
    #: Pixels of the parcel on the stack's grid.
    n_px: int
    #: ``(T,)`` observation days, and the cloud-masked mean index per date (NaN = gap).
    obs_days: FloatArray
    obs_values: FloatArray
    #: ``(T,)`` mean over all pixels with data, clouds included (what masking removed; for plots).
    obs_unmasked: FloatArray
    #: The smoothed curve.
    grid: FloatArray
    smooth: FloatArray
    seasons: list[Season] = field(default_factory=list)

    def season_at(self, day: float) -> Season | None:
        """The detected season whose window holds ``day``."""
        for s in self.seasons:
            if s.start <= day < s.end:
                return s
        return None

    def stage_at(self, day: float) -> str | None:
        """The derived stage on ``day`` (``None`` when no season was detected there)."""
        s = self.season_at(day)
        return s.stage_at(day) if s is not None else None

    @property
    def observed(self) -> tuple[float, float]:
        """First and last day with a valid observation."""
        ok = np.isfinite(self.obs_values)
        return float(self.obs_days[ok].min()), float(self.obs_days[ok].max())


def field_phenology(
    field_id: str, cls: str, n_px: int, obs_days: FloatArray, obs_values: FloatArray, obs_unmasked: FloatArray,
    cfg: PhenologyConfig,
) -> FieldPhenology | None:
    """Smooth one parcel's curve and detect its seasons (``None`` with fewer than 4 valid observations)."""
    if np.isfinite(obs_values).sum() < 4:
        return None
    grid, smooth = smooth_curve(
        obs_days, obs_values, cfg.step_days, cfg.savgol_window_days, cfg.savgol_order, cfg.envelope_iterations,
        span=(float(np.floor(obs_days.min())), float(np.ceil(obs_days.max()))),
    )
    fp = FieldPhenology(field_id, cls, n_px, obs_days, obs_values, obs_unmasked, grid, smooth)
    for window in season_windows(float(obs_days.min()), float(obs_days.max()), cfg.season_start):
        season = detect_season(grid, smooth, window, fp.observed, cfg)
        if season is not None:
            fp.seasons.append(season)
    return fp


def analyse_parcels(scan: StackScan, parcels: gpd.GeoDataFrame, cfg: PhenologyConfig) -> dict[str, FieldPhenology]:
    """Phenology of every parcel of ``cfg.classes`` with at least ``cfg.min_pixels`` pixels.

    ``parcels`` is the frame of :func:`agrivlm.recipes.sources.load_parcels`, in the scan's parcel order.
    Returns ``{field_id: FieldPhenology}`` in ``field_id`` order.
    """
    days = to_days(scan.times)
    clear = scan.clear_mean(cfg.min_clear_fraction)
    unmasked = scan.data_mean()
    out: dict[str, FieldPhenology] = {}
    for j, row in enumerate(parcels.itertuples(index=False)):
        if cfg.classes is not None and row.cls not in cfg.classes:
            continue
        if scan.parcel_px[j] < cfg.min_pixels:
            continue
        fp = field_phenology(
            str(row.field_id), str(row.cls), int(scan.parcel_px[j]), days, clear[:, j], unmasked[:, j], cfg
        )
        if fp is not None:
            out[fp.field_id] = fp
    return out


# -- labels and reference tables -----------------------------------------------------------------------------
def _read_table(spec: str, base_dir: Path | None, what: str) -> tuple[pd.DataFrame, Path]:
    path = Path(resolve_spec(spec, base_dir))
    if not path.is_file():
        raise ConfigError(f"{path}: no such {what} file")
    frame = read_table(path, what, IngestError)
    return frame.drop(columns="geometry", errors="ignore").astype(str), path


def _iso_date(value: str, path: Path, row: int, column: str) -> str:
    try:
        return str(np.datetime64(pd.Timestamp(value).to_datetime64(), "D"))
    except (ValueError, TypeError) as exc:
        raise IngestError(f"{path}: row {row + 2}: column {column!r}: {value!r} is not a date (YYYY-MM-DD)") from exc


@dataclass
class GrowthTruth:
    """Stages and key dates per field: from label tables for labelled fields, derived from the curves elsewhere.

    Labels and derived values are never mixed within a field: a field in the stage table takes its stages
    only from it (a date it lacks has no stage), a field in the key-date table takes its key dates only
    from it. With ``derive`` False nothing is derived at all (only labelled fields are asked about).
    """

    phenology: dict[str, FieldPhenology]
    #: ``{(field_id, YYYY-MM-DD): stage}`` from a label table.
    stage_labels: dict[tuple[str, str], str] = field(default_factory=dict)
    #: ``{(field_id, season): {"green_up"|"peak"|"senescence": YYYY-MM-DD}}`` from a label table.
    key_date_labels: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    #: Whether fields without labels get derived stages and key dates.
    derive: bool = True
    #: Fields in the stage table / in the key-date table (filled by :func:`load_growth_truth`).
    stage_fields: set[str] = field(default_factory=set)
    key_date_fields: set[str] = field(default_factory=set)

    def derived_for(self, field_id: str, kind: str) -> FieldPhenology | None:
        """The derived phenology a field may use for ``kind`` (``stages`` | ``key_dates``), or ``None``."""
        labelled = self.stage_fields if kind == "stages" else self.key_date_fields
        if not self.derive or field_id in labelled:
            return None
        return self.phenology.get(field_id)

    def has_field(self, field_id: str) -> bool:
        """Whether anything (a label or, where allowed, a derived curve) is known about the field."""
        return (field_id in self.stage_fields or field_id in self.key_date_fields
                or (self.derive and field_id in self.phenology))

    def stage(self, field_id: str, when: np.datetime64) -> tuple[str | None, str]:
        """``(stage, source)`` on an acquisition time; source is ``label`` or ``derived``."""
        if field_id in self.stage_fields:
            return self.stage_labels.get((field_id, day_str(when))), "label"
        fp = self.derived_for(field_id, "stages")
        return (fp.stage_at(float(to_days(when))) if fp is not None else None), "derived"

    def key_dates(self, field_id: str, season: str) -> dict[str, tuple[float, str]]:
        """``{"green_up"|"peak"|"senescence": (day, source)}`` for one field and season (what is known)."""
        if field_id in self.key_date_fields:
            return {key: (float(to_days(np.datetime64(iso))), "label")
                    for key, iso in self.key_date_labels.get((field_id, season), {}).items()}
        fp = self.derived_for(field_id, "key_dates")
        for s in fp.seasons if fp is not None else []:
            if s.label == season:
                return {"green_up": (s.sos, "derived"), "peak": (s.pos, "derived"),
                        "senescence": (s.senescence, "derived")}
        return {}

    def cycle_labels(self, field_id: str, season: str) -> list[str]:
        """A field's labelled cycles in one season window: its key-date rows ``season``, ``season-2`` ….

        ``agrivlm synth`` labels a second crop or a grass regrowth in one window ``YYYY-2``.
        """
        out = [season] if (field_id, season) in self.key_date_labels else []
        k = 2
        while (field_id, f"{season}-{k}") in self.key_date_labels:
            out.append(f"{season}-{k}")
            k += 1
        return out

    def derived_season(self, field_id: str, season: str) -> Season | None:
        """The derived season of an unlabelled field (for the growing-season segment), or ``None``."""
        fp = self.derived_for(field_id, "key_dates")
        if fp is None or field_id in self.stage_fields:
            return None
        return next((s for s in fp.seasons if s.label == season), None)

    def fields(self) -> list[str]:
        """Every field with a label or an allowed derived curve, sorted."""
        derived = set(self.phenology) if self.derive else set()
        return sorted(derived | self.stage_fields | self.key_date_fields)


def load_growth_truth(
    phenology: dict[str, FieldPhenology], labels: LabelsConfig | None, base_dir: Path | None
) -> GrowthTruth:
    """Combine derived phenology with label tables (a labelled field is answered from its labels only)."""
    truth = GrowthTruth(phenology, derive=labels is None or labels.derive != "never")
    if labels is None:
        return truth
    if labels.stages is not None:
        table, path = _read_table(labels.stages, base_dir, "stage label")
        for col in (labels.field_id_column, labels.date_column, labels.stage_column):
            if col not in table.columns:
                raise IngestError(f"{path}: no column {col!r}; columns are: {', '.join(table.columns)}")
        for i, row in enumerate(table.itertuples(index=False)):
            rec = row._asdict()
            stage = str(rec[labels.stage_column]).strip()
            if stage not in GROWTH_STAGES:
                raise IngestError(
                    f"{path}: row {i + 2}: stage {stage!r} is not one of {', '.join(GROWTH_STAGES)}"
                )
            day = _iso_date(str(rec[labels.date_column]), path, i, labels.date_column)
            fid = str(rec[labels.field_id_column]).strip()
            truth.stage_labels[(fid, day)] = stage
            truth.stage_fields.add(fid)
    if labels.key_dates is not None:
        table, path = _read_table(labels.key_dates, base_dir, "key-date label")
        missing = [c for c in KEY_DATE_COLUMNS if c not in table.columns]
        if missing:
            raise IngestError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(KEY_DATE_COLUMNS)}")
        for i, row in enumerate(table.itertuples(index=False)):
            rec = row._asdict()
            dates = {
                k: _iso_date(str(rec[k]), path, i, k) for k in KEY_DATE_COLUMNS[2:] if str(rec[k]).strip()
            }
            fid = str(rec["field_id"]).strip()
            truth.key_date_labels[(fid, str(rec["season"]).strip())] = dates
            truth.key_date_fields.add(fid)
    return truth


def stage_table(truth: GrowthTruth, times: Sequence[np.datetime64]) -> pd.DataFrame:
    """Long table (:data:`agrivlm.schema.STAGE_COLUMNS`): one row per field and acquisition date with a stage.

    Labelled (field, date) pairs appear with their label even where nothing was derived. Same-day
    acquisitions give one row (the first).
    """
    rows: dict[tuple[str, str], str] = {}
    for fid in truth.fields():
        for when in times:
            day = day_str(when)
            if (fid, day) in rows:
                continue
            stage, _ = truth.stage(fid, when)
            if stage is not None:
                rows[(fid, day)] = stage
    for (fid, day), stage in truth.stage_labels.items():
        rows.setdefault((fid, day), stage)
    frame = pd.DataFrame([(f, d, s) for (f, d), s in sorted(rows.items())], columns=list(STAGE_COLUMNS))
    return frame


def key_date_table(truth: GrowthTruth, seasons: Sequence[str]) -> pd.DataFrame:
    """Key dates (:data:`agrivlm.schema.KEY_DATE_COLUMNS`): a row per analysed field and season, empty = not reached.

    A labelled field also gets its labelled seasons outside ``seasons`` (a second cycle ``2021-2``).
    """
    rows = []
    extra: dict[str, set[str]] = {}
    for fid, season in truth.key_date_labels:
        if season not in seasons:
            extra.setdefault(fid, set()).add(season)
    fields = [f for f in truth.fields() if f in truth.key_date_fields or truth.derived_for(f, "key_dates")]
    for fid in fields:
        for season in [*seasons, *sorted(extra.get(fid, ()))]:
            known = truth.key_dates(fid, season)
            rows.append([fid, season] + [iso_day(known[k][0]) if k in known else "" for k in KEY_DATE_COLUMNS[2:]])
    return pd.DataFrame(rows, columns=list(KEY_DATE_COLUMNS))


def phenology_detail_table(phenology: dict[str, FieldPhenology]) -> pd.DataFrame:
    """Every detected season with all its dates and levels (for inspection; not an evaluator contract)."""
    rows = []
    for fp in phenology.values():
        for s in fp.seasons:
            rows.append({
                "field_id": fp.field_id, "class": fp.cls, "n_px": fp.n_px, "season": s.label,
                "sos": iso_day(s.sos), "peak_start": iso_day(s.peak_start), "pos": iso_day(s.pos),
                "senescence": iso_day(s.senescence), "eos": iso_day(s.eos),
                "base_left": round(s.base_left, 4), "base_right": round(s.base_right, 4),
                "peak_value": round(s.peak_value, 4), "post_stage": s.post_stage,
                "valid_obs": int(np.isfinite(fp.obs_values).sum()),
            })
    cols = ["field_id", "class", "n_px", "season", "sos", "peak_start", "pos", "senescence", "eos",
            "base_left", "base_right", "peak_value", "post_stage", "valid_obs"]
    return pd.DataFrame(rows, columns=cols)
