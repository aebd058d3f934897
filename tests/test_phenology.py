from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.windows import Window
from recipes_synth import EVERY_DAYS, FIELDS, dates, write_scene

from agrivlm.errors import IngestError
from agrivlm.geo import open_stack
from agrivlm.geo.dates import from_days, season_windows, to_days
from agrivlm.recipes.config import LabelsConfig, PhenologyConfig
from agrivlm.recipes.phenology import (
    GrowthTruth,
    analyse_parcels,
    detect_season,
    field_phenology,
    gap_fill,
    key_date_table,
    load_growth_truth,
    savgol_samples,
    smooth_curve,
    stage_table,
)
from agrivlm.recipes.scan import IndexBands, scan_stack
from agrivlm.recipes.sources import load_parcels
from agrivlm.schema import GROWTH_STAGES, KEY_DATE_COLUMNS, STAGE_COLUMNS

CFG = PhenologyConfig()
ONE_ACQUISITION = float(EVERY_DAYS)


def _days(when: datetime) -> float:
    return float(to_days(np.datetime64(when, "s")))


def _series(field, seed: int, cloud_rate: float = 0.3, noise: float = 0.01):
    """Observation days, the cloud-masked series (NaN = masked) and the raw one (clouds read 0.02)."""
    rng = np.random.default_rng(seed)
    days = to_days(np.array(dates(), dtype="datetime64[s]"))
    doy = days - _days(datetime(2021, 1, 1))
    values = field.ndvi(doy) + rng.normal(0, noise, days.size)
    cloudy = rng.random(days.size) < cloud_rate
    raw = np.where(cloudy, 0.02, values)
    return days, np.where(cloudy, np.nan, values), raw


def _tolerance(days: np.ndarray, masked: np.ndarray, true_day: float) -> float:
    """One acquisition: the spacing (10 d), or the gap between the clear acquisitions around the true date
    when clouds took the ones in between (nothing can place a date more finely than what was seen)."""
    clear = days[np.isfinite(masked)]
    i = int(np.searchsorted(clear, true_day))
    return max(ONE_ACQUISITION, float(clear[i] - clear[i - 1]))


@pytest.mark.parametrize("cloud_rate", [0.0, 0.3])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("field", [f for f in FIELDS if f.amp > 0.3], ids=lambda f: f.field_id)
def test_key_dates_of_a_known_curve_come_back_within_one_acquisition(field, seed, cloud_rate) -> None:
    days, masked, _ = _series(field, seed, cloud_rate)
    fp = field_phenology(field.field_id, field.cls, 100, days, masked, masked, CFG)
    assert fp is not None
    seasons = {s.label: s for s in fp.seasons}
    assert list(seasons) == ["2021"], "one season, and none in the partial winters around it"
    s, truth = seasons["2021"], field.truth()
    for key, got in (("green_up", s.sos), ("peak", s.pos), ("senescence", s.senescence), ("eos", s.eos)):
        true_day = _days(truth[key])
        err, tol = abs(got - true_day), _tolerance(days, masked, true_day)
        assert err <= tol, f"{field.field_id} seed {seed}: {key} off by {err:.1f} days (tolerance {tol:.0f})"
        if cloud_rate == 0.0:
            assert err <= ONE_ACQUISITION
    # stages follow the phenological order over the season's dates
    order = [s.stage_at(d) for d in days if s.start <= d < s.end]
    runs = [x for i, x in enumerate(order) if i == 0 or x != order[i - 1]]
    assert runs == ["dormant", "green-up", "peak", "senescence", s.post_stage]


def test_cloud_contamination_without_masks_breaks_the_dates_and_masking_fixes_them() -> None:
    field = FIELDS[0]
    days, masked, raw = _series(field, seed=2, cloud_rate=0.35)
    truth = {k: _days(v) for k, v in field.truth().items()}

    def errors(fp) -> dict[str, float]:
        (s,) = fp.seasons
        got = {"green_up": s.sos, "peak": s.pos, "senescence": s.senescence, "eos": s.eos}
        return {k: abs(got[k] - truth[k]) for k in got}

    good = field_phenology("A", "x", 100, days, masked, raw, CFG)
    assert all(e <= _tolerance(days, masked, truth[k]) for k, e in errors(good).items())
    # the cloud values (0.02) left in, without an envelope to lift them: the season's end moves by weeks
    bad = field_phenology("A", "x", 100, days, raw, raw, CFG.model_copy(update={"envelope_iterations": 0}))
    assert max(errors(bad).values()) > 2 * ONE_ACQUISITION


def test_post_season_stage_harvested_after_an_abrupt_fall_dormant_after_a_slow_one() -> None:
    slow, abrupt = FIELDS[0], FIELDS[1]
    for field, expected in ((slow, "dormant"), (abrupt, "harvested")):
        days, masked, _ = _series(field, seed=0, cloud_rate=0.0)
        fp = field_phenology(field.field_id, field.cls, 100, days, masked, masked, CFG)
        assert fp is not None and fp.seasons[0].post_stage == expected
        assert fp.stage_at(_days(datetime(2021, 12, 1))) == expected
    days, masked, _ = _series(slow, seed=0, cloud_rate=0.0)
    forced = field_phenology("A", "x", 100, days, masked, masked, CFG.model_copy(update={"post_season": "harvested"}))
    assert forced is not None and forced.seasons[0].post_stage == "harvested"


def test_flat_curve_and_low_amplitude_have_no_season() -> None:
    days = to_days(np.array(dates(), dtype="datetime64[s]"))
    flat = np.full(days.size, 0.7) + np.random.default_rng(0).normal(0, 0.005, days.size)
    fp = field_phenology("f", "forest", 50, days, flat, flat, CFG)
    assert fp is not None and fp.seasons == []
    assert fp.stage_at(float(days[20])) is None
    assert field_phenology("f", "x", 5, days[:3], flat[:3], flat[:3], CFG) is None  # too few observations


def test_gap_fill_is_exact_on_lines_and_holds_the_ends() -> None:
    d = np.array([0.0, 10, 20, 30, 40])
    v = np.array([1.0, np.nan, 3.0, 4.0, np.nan])
    grid, filled = gap_fill(d, v, 5.0)
    assert grid[0] == 0 and grid[-1] == 40 and np.allclose(np.diff(grid), 5)
    assert np.allclose(filled, np.interp(grid, [0, 20, 30], [1, 3, 4]))
    assert filled[-1] == 4.0  # held after the last valid value
    with pytest.raises(ValueError, match="at least two"):
        gap_fill(d, np.array([1.0, np.nan, np.nan, np.nan, np.nan]), 5.0)


@settings(max_examples=40)
@given(
    step=st.integers(1, 20), window=st.integers(1, 200), order=st.integers(0, 4), n=st.integers(1, 300)
)
def test_savgol_window_is_odd_longer_than_the_order_and_fits(step: int, window: int, order: int, n: int) -> None:
    wl = savgol_samples(step, window, order, n)
    assert wl == 0 or (wl % 2 == 1 and order < wl <= n)


@settings(max_examples=15, deadline=None)
@given(shift=st.floats(-400, 400), seed=st.integers(0, 1000))
def test_key_dates_shift_with_the_curve(shift: float, seed: int) -> None:
    """Moving every observation by ``shift`` days moves SOS/POS/senescence by the same (grid-aligned) amount."""
    field = FIELDS[3]
    days, masked, _ = _series(field, seed, cloud_rate=0.2)
    shift = float(np.round(shift / CFG.step_days) * CFG.step_days)  # the curve's grid moves with the data
    base_span = (float(np.floor(days.min())), float(np.ceil(days.max())))
    g0, c0 = smooth_curve(days, masked, CFG.step_days, CFG.savgol_window_days, CFG.savgol_order, 2, base_span)
    g1, c1 = smooth_curve(days + shift, masked, CFG.step_days, CFG.savgol_window_days, CFG.savgol_order, 2,
                          (base_span[0] + shift, base_span[1] + shift))
    assert np.allclose(g1 - shift, g0) and np.allclose(c1, c0)
    obs = (float(days[np.isfinite(masked)].min()), float(days[np.isfinite(masked)].max()))
    win = ("x", _days(datetime(2021, 1, 1)), _days(datetime(2022, 1, 1)))
    s0 = detect_season(g0, c0, win, obs, CFG)
    s1 = detect_season(g1, c1, ("x", win[1] + shift, win[2] + shift), (obs[0] + shift, obs[1] + shift), CFG)
    assert s0 is not None and s1 is not None
    for a, b in ((s0.sos, s1.sos), (s0.pos, s1.pos), (s0.senescence, s1.senescence), (s0.eos, s1.eos)):
        assert b - a == pytest.approx(shift, abs=1e-6)


def test_season_windows_follow_season_start() -> None:
    first, last = _days(datetime(2015, 7, 11)), _days(datetime(2017, 12, 22))
    assert [w[0] for w in season_windows(first, last, "01-01")] == ["2015", "2016", "2017"]
    wins = season_windows(first, last, "10-01")
    assert [w[0] for w in wins] == ["2014", "2015", "2016", "2017"]
    assert str(from_days(wins[1][1]))[:10] == "2015-10-01" and wins[1][2] - wins[1][1] == 366  # 2016 is a leap year


def test_curves_from_a_real_geotiff_stack_with_cloud_masks(tmp_path: Path) -> None:
    """The whole path: GeoTIFFs + masks → scan (cloud-masked parcel means) → dates within one acquisition."""
    paths = write_scene(tmp_path)
    stack = open_stack(paths["ndvi"], masks=paths["masks"])
    parcels, counts = load_parcels(str(paths["parcels"]), None, stack.crs, id_column="fid", class_column="landuse")
    assert counts["read"] == len(FIELDS) and parcels.crs == stack.crs
    windows = [Window(0, 0, 32, 32), Window(20, 30, 25, 20), Window(39, 39, 25, 25)]  # across tile edges
    scan = scan_stack(stack, IndexBands(), windows, list(parcels.geometry), tile_px=40, progress=False)  # 4 tiles
    for j, win in enumerate(windows):
        data, nodata, cloud = stack.read_window(win)
        direct = (~nodata[:, 0] & ~cloud & np.isfinite(data[:, 0])).mean(axis=(1, 2))
        assert np.allclose(scan.chip_clear[:, j], direct)
    assert (scan.chip_clear < 1).any() and (scan.chip_clear == 1).any()
    by_id = {fid: j for j, fid in enumerate(parcels.field_id)}
    # pixel counts: rectangles on pixel edges (F is cut by the raster edge at column 64)
    for f in FIELDS:
        cols = min(f.cols[1], 64) - f.cols[0]
        assert scan.parcel_px[by_id[f.field_id]] == (f.rows[1] - f.rows[0]) * cols
    # masked dates are gaps, and the unmasked mean shows the cloud value they would have had
    clear = scan.clear_mean(0.5)
    cloud_any = scan.parcel_clear[:, by_id["A"]] == 0
    assert cloud_any.any() and np.isnan(clear[cloud_any, by_id["A"]]).all()
    assert np.allclose(scan.data_mean()[cloud_any, by_id["A"]], 0.02, atol=1e-6)
    phen = analyse_parcels(scan, parcels, CFG)
    assert {fid for fid, fp in phen.items() if fp.seasons} == {"A", "B", "D", "E", "F"}, "evergreen C: no season"
    for f in FIELDS:
        if f.amp < 0.3:
            continue
        fp = phen[f.field_id]
        (s,) = fp.seasons
        t = f.truth()
        for key, got in (("green_up", s.sos), ("peak", s.pos), ("senescence", s.senescence)):
            tol = _tolerance(fp.obs_days, fp.obs_values, _days(t[key]))
            assert abs(got - _days(t[key])) <= tol, (f.field_id, key, got - _days(t[key]))


def _truth_for_labels() -> GrowthTruth:
    field = FIELDS[0]
    days, masked, _ = _series(field, seed=0, cloud_rate=0.0)
    fp = field_phenology("A", field.cls, 100, days, masked, masked, CFG)
    assert fp is not None
    return GrowthTruth({"A": fp})


def test_a_labelled_field_is_answered_from_its_labels_only(tmp_path: Path) -> None:
    truth = _truth_for_labels()
    when = np.datetime64(dates()[25], "s")  # 2021-07-09: derived "peak"
    assert truth.stage("A", when) == ("peak", "derived")
    (tmp_path / "stages.csv").write_text("parcel,day,label\nA,2021-07-09,senescence\nZ,2021-07-09,harvested\n")
    (tmp_path / "keys.csv").write_text(
        ",".join(KEY_DATE_COLUMNS) + "\nA,2021,2021-05-05,,\n"
    )
    labels = LabelsConfig(stages="stages.csv", field_id_column="parcel", date_column="day", stage_column="label",
                          key_dates="keys.csv")
    merged = load_growth_truth(truth.phenology, labels, tmp_path)
    assert merged.stage("A", when) == ("senescence", "label")
    # a date the labels lack has no stage (derived would say "peak"): labels and curves are never mixed
    assert truth.stage("A", np.datetime64(dates()[26], "s"))[0] is not None
    assert merged.stage("A", np.datetime64(dates()[26], "s")) == (None, "label")
    keys = merged.key_dates("A", "2021")
    assert keys == {"green_up": (_days(datetime(2021, 5, 5)), "label")}, "no derived peak or senescence"
    assert merged.derived_season("A", "2021") is None and truth.derived_season("A", "2021") is not None
    stages = stage_table(merged, [np.datetime64(d, "s") for d in dates()])
    assert list(stages.columns) == list(STAGE_COLUMNS) and set(stages.stage) <= set(GROWTH_STAGES)
    row = stages[(stages.field_id == "A") & (stages.date == "2021-07-09")]
    assert list(row.stage) == ["senescence"]
    assert list(stages[stages.field_id == "Z"].stage) == ["harvested"], "a labelled-only field is listed too"
    kd = key_date_table(merged, ["2020", "2021"])
    assert list(kd.columns) == list(KEY_DATE_COLUMNS)
    a21 = kd[(kd.field_id == "A") & (kd.season == "2021")].iloc[0]
    assert (a21.green_up, a21.peak, a21.senescence) == ("2021-05-05", "", "")
    assert key_date_table(truth, ["2021"]).peak.item() == str(from_days(truth.phenology["A"].seasons[0].pos))[:10]
    assert list(stages[stages.field_id == "A"].date) == ["2021-07-09"], "no derived stage for a labelled field"
    # derive: never (synthetic truth): an unlabelled field with a clear derived season is not asked about
    (tmp_path / "z.csv").write_text("field_id,date,stage\nZ,2021-07-09,harvested\n")
    only = load_growth_truth(truth.phenology, LabelsConfig(stages="z.csv", derive="never"), tmp_path)
    assert only.fields() == ["Z"] and only.stage("A", when) == (None, "derived") and not only.has_field("A")
    assert only.key_dates("A", "2021") == {} and key_date_table(only, ["2021"]).empty
    a20 = kd[(kd.field_id == "A") & (kd.season == "2020")].iloc[0]
    assert (a20.green_up, a20.peak, a20.senescence) == ("", "", ""), "empty where not reached"


def test_bad_labels_are_errors_naming_the_file_and_row(tmp_path: Path) -> None:
    truth = _truth_for_labels()
    (tmp_path / "bad.csv").write_text("field_id,date,stage\nA,2021-07-09,flowering\n")
    with pytest.raises(IngestError, match=r"bad.csv: row 2: stage 'flowering' is not one of dormant"):
        load_growth_truth(truth.phenology, LabelsConfig(stages="bad.csv"), tmp_path)
    (tmp_path / "baddate.csv").write_text("field_id,date,stage\nA,yesterday,peak\n")
    with pytest.raises(IngestError, match=r"baddate.csv: row 2: column 'date': 'yesterday' is not a date"):
        load_growth_truth(truth.phenology, LabelsConfig(stages="baddate.csv"), tmp_path)
    (tmp_path / "nocol.csv").write_text("id,date,stage\nA,2021-07-09,peak\n")
    with pytest.raises(IngestError, match=r"nocol.csv: no column 'field_id'"):
        load_growth_truth(truth.phenology, LabelsConfig(stages="nocol.csv"), tmp_path)


def test_labels_from_a_geopackage_column(tmp_path: Path) -> None:
    truth = _truth_for_labels()
    from shapely.geometry import Point

    gpd.GeoDataFrame(
        {"field_id": ["A"], "date": ["2021-07-09"], "stage": ["harvested"]}, geometry=[Point(0, 0)], crs=4326
    ).to_file(tmp_path / "labels.gpkg", driver="GPKG")
    merged = load_growth_truth(truth.phenology, LabelsConfig(stages="labels.gpkg"), tmp_path)
    assert merged.stage("A", np.datetime64(dates()[25] + timedelta(hours=3), "s")) == ("harvested", "label")
