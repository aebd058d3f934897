"""Per-field NDVI seasons of a synthetic scene and their exact truth: stages on every date, key dates.

A field's year is one or more **cycles** (a crop from sowing to harvest; a grassland growth between
cuts; a forest's leaf-on season). Each cycle's NDVI is a double logistic (Beck et al. 2006) on days
``d`` since 1970-01-01::

    v(d) = bare + (base_left − bare)·E(d) + (peak − base_left)·S((d − rise)/rise_days)
                                           − (peak − base_right)·S((d − fall)/fall_days)

(``S`` the logistic, ``E`` the autumn emergence of winter crops 20 days after sowing), and from the
harvest or cut day on it drops at once to the residue level, then decays to bare soil (tillage).

The truth follows from that generating curve, on a daily grid, with the same amplitude-threshold
definitions the recipes' own phenology extraction uses (:mod:`agrivlm.recipes.phenology`): with
``base_l`` = the cycle's pre-rise level, ``base_r`` = the curve's minimum after the peak inside the
cycle and ``max`` the peak value, **green-up** is the first up-crossing of ``base_l + 0.2·(max − base_l)``,
the **peak** stage starts at the up-crossing of 0.8 of it, the key date **peak** is the maximum,
**senescence** starts at the down-crossing of ``base_r + 0.8·(max − base_r)`` and the season ends (EOS)
at the down-crossing of 0.2 of it. A date's stage is ``dormant`` before green-up (``harvested`` for a
grass regrowth after a cut), then ``green-up``, ``peak``, ``senescence``, and after EOS ``harvested``
for a harvested crop (at most :attr:`PhenologyParams.harvested_days` after harvest, then ``dormant``)
or ``dormant``. Key dates are labelled by the season window holding the peak (the region's
``season_start``), a second cycle in one window gets ``-2`` (double cropping, grass regrowths).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from agrivlm.synth.regions import Calendar, Crop, Region

FloatArray = npt.NDArray[np.float64]

_EPOCH = np.datetime64("1970-01-01", "D")


@dataclass(frozen=True)
class PhenologyParams:
    """Per-field randomness of the seasons (a scene parameter; defaults from the crop calendars' spread)."""

    #: Standard deviation and clip (days) of a field's timing shift in one season (± 2–3 weeks).
    shift_sd_days: float = 9.0
    shift_max_days: float = 21.0
    #: Extra standard deviation (days) of harvest and cut dates beyond the shift.
    harvest_sd_days: float = 4.0
    #: Standard deviation of the peak NDVI and of the base levels.
    peak_sd: float = 0.035
    base_sd: float = 0.02
    #: Relative spread (uniform ± this) of rise/fall durations.
    duration_spread: float = 0.2
    #: NDVI of bare soil, of harvest residue (stubble) and just after a grass cut.
    bare: float = 0.17
    residue: float = 0.26
    cut_level: float = 0.38
    #: Days over which residue decays to bare soil (tillage), and the longest ``harvested`` stage.
    residue_days: float = 40.0
    harvested_days: float = 90.0
    #: Days from a cut to the inflection of the regrowth, and the regrowth's rise scale.
    regrowth_days: float = 14.0
    regrowth_rise_days: float = 5.0
    #: Share of grassland fields with 2, 3 and 4 cuts (where the region's calendar lists that many).
    cut_count_shares: tuple[float, float, float] = (0.3, 0.45, 0.25)


@dataclass
class Cycle:
    """One growth cycle of one field. Days are float days since 1970-01-01."""

    crop: str
    #: First day the cycle owns (sowing, the cut that starts a regrowth, or the perennial's year start).
    start: float
    sow: float
    rise: float
    rise_days: float
    fall: float
    fall_days: float
    #: Harvest or cut day (the NDVI drop), ``None`` when the cycle just senesces.
    harvest: float | None
    #: Whether ``harvest`` is a grass cut (the next cycle regrows) rather than a crop harvest.
    is_cut: bool
    base_left: float
    peak: float
    base_right: float
    #: Stage before green-up: ``dormant``, or ``harvested`` for a regrowth after a cut.
    pre_stage: str = "dormant"
    #: Whether the cycle starts with an autumn emergence from bare soil (winter crops).
    emergence: bool = False
    # -- truth, filled by :func:`cycle_truth` -------------------------------------------------------------
    end: float = np.inf
    green_up: float = np.nan
    peak_start: float = np.nan
    pos: float = np.nan
    senescence: float = np.nan
    eos: float = np.nan
    season: str = ""

    def curve(self, days: FloatArray, params: PhenologyParams) -> FloatArray:
        """NDVI on ``days`` (the cycle's own curve, also outside its span)."""
        d = np.asarray(days, dtype=np.float64)
        v = params.bare + (self.peak - self.base_left) * _logistic((d - self.rise) / self.rise_days)
        v = v - (self.peak - self.base_right) * _logistic((d - self.fall) / self.fall_days)
        lift = self.base_left - params.bare
        if self.emergence:
            v = v + lift * _logistic((d - (self.sow + 20.0)) / 6.0)
        else:
            v = v + lift
        if self.harvest is not None:
            after = d >= self.harvest
            if self.is_cut:
                v = np.where(after, params.cut_level, v)
            else:
                decay = np.exp(-np.clip(d - self.harvest, 0, None) / (params.residue_days / 3.0))
                v = np.where(after, params.bare + (params.residue - params.bare) * decay, v)
        return v


def _logistic(x: FloatArray) -> FloatArray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60.0, 60.0)))


def _crossing(days: FloatArray, values: FloatArray, thr: float, rising: bool) -> float:
    """First day where ``values`` crosses ``thr`` (up if ``rising``), linearly interpolated; NaN if never."""
    above = values >= thr if rising else values < thr
    idx = np.flatnonzero(above)
    if idx.size == 0:
        return float("nan")
    i = int(idx[0])
    if i == 0:
        return float(days[0])
    a, b = values[i - 1], values[i]
    if a == b:
        return float(days[i])
    return float(days[i - 1] + (thr - a) / (b - a) * (days[i] - days[i - 1]))


def cycle_truth(cycle: Cycle, params: PhenologyParams, sos_fraction: float = 0.2, peak_fraction: float = 0.8,
                eos_fraction: float = 0.2) -> None:
    """Fill the cycle's key dates from its own curve on a 0.25-day grid (see the module docstring)."""
    end = cycle.end if np.isfinite(cycle.end) else cycle.fall + 6 * cycle.fall_days
    if cycle.harvest is not None:
        end = min(end, cycle.harvest + 1.0)
    lo = cycle.sow if cycle.emergence else min(cycle.start, cycle.rise - 8 * cycle.rise_days)
    grid = np.arange(lo, end, 0.25)
    v = cycle.curve(grid, params)
    ipk = int(np.argmax(v))
    vmax = float(v[ipk])
    cycle.pos = float(grid[ipk])
    # the pre-rise level: the parameter, not the minimum (the bare soil before a winter crop's emergence)
    base_l = cycle.base_left if cycle.emergence else min(cycle.base_left, float(v[: ipk + 1].min()))
    amp_l = vmax - base_l
    rising_days, rising = grid[: ipk + 1], v[: ipk + 1]
    if cycle.emergence:
        keep = rising_days >= cycle.sow + 40.0  # past the autumn emergence plateau
        rising_days, rising = rising_days[keep], rising[keep]
    cycle.green_up = _crossing(rising_days, rising, base_l + sos_fraction * amp_l, True)
    cycle.peak_start = _crossing(rising_days, rising, base_l + peak_fraction * amp_l, True)
    falling_days, falling = grid[ipk:], v[ipk:]
    base_r = float(falling.min())
    amp_r = vmax - base_r
    cycle.senescence = _crossing(falling_days, falling, base_r + peak_fraction * amp_r, False)
    cycle.eos = _crossing(falling_days, falling, base_r + eos_fraction * amp_r, False)
    if cycle.harvest is not None:
        for name in ("senescence", "eos"):
            if not np.isfinite(getattr(cycle, name)) or getattr(cycle, name) > cycle.harvest:
                setattr(cycle, name, cycle.harvest)


@dataclass
class FieldSeasons:
    """Every cycle of one field, in time order, and its NDVI."""

    field_id: str
    crops: list[str]
    cycles: list[Cycle] = field(default_factory=list)

    def ndvi(self, days: FloatArray, params: PhenologyParams) -> FloatArray:
        """``(len(days),)`` NDVI of the field's generating curve (each day from the cycle that owns it)."""
        d = np.asarray(days, dtype=np.float64)
        out = np.full(d.shape, params.bare)
        for c in self.cycles:
            sel = (d >= c.start) & (d < c.end)
            if sel.any():
                out[sel] = c.curve(d[sel], params)
        return out

    def stage(self, day: float, params: PhenologyParams) -> str:
        """The stage on ``day`` (see the module docstring)."""
        owner = None
        for c in self.cycles:
            if c.start <= day < c.end:
                owner = c
                break
        if owner is None:
            return "dormant"
        c = owner
        if not day >= c.green_up:
            return c.pre_stage
        if day < c.peak_start:
            return "green-up"
        if day < c.senescence:
            return "peak"
        if day < c.eos:
            return "senescence"
        if c.is_cut or (c.harvest is not None and day < c.harvest + params.harvested_days):
            return "harvested"
        return "dormant"


@dataclass(frozen=True)
class _Drawn:
    """A calendar's days for one field in one year (days since epoch), shifted and jittered."""

    sow: float
    rise: float
    rise_days: float
    fall: float
    fall_days: float
    harvest: float | None
    base_left: float
    peak: float
    base_right: float
    shift: float


def _jitter_calendar(cal: Calendar, year_day0: float, rng: np.random.Generator, params: PhenologyParams) -> _Drawn:
    """Draw one field's version of a calendar in the year starting on ``year_day0``."""
    shift = float(np.clip(rng.normal(0.0, params.shift_sd_days), -params.shift_max_days, params.shift_max_days))
    spread = params.duration_spread

    def dur(x: float) -> float:
        return x * float(rng.uniform(1 - spread, 1 + spread))

    harvest = None
    if cal.harvest_doy is not None:
        harvest = year_day0 + cal.harvest_doy + shift + float(rng.normal(0.0, params.harvest_sd_days))
    return _Drawn(
        sow=year_day0 + cal.sow_doy + shift,
        rise=year_day0 + cal.rise_doy + shift,
        rise_days=dur(cal.rise_days),
        fall=year_day0 + cal.fall_doy + shift,
        fall_days=dur(cal.fall_days),
        harvest=harvest,
        base_left=float(np.clip(cal.base_left + rng.normal(0.0, params.base_sd), 0.1, 0.7)),
        peak=float(np.clip(cal.peak + rng.normal(0.0, params.peak_sd), max(cal.base_left + 0.15, 0.35), 0.92)),
        base_right=float(np.clip(cal.base_right + rng.normal(0.0, params.base_sd), 0.1, 0.7)),
        shift=shift,
    )


def _day0(year: int) -> float:
    return float((np.datetime64(f"{year:04d}-01-01", "D") - _EPOCH).astype(np.int64))


def field_seasons(field_id: str, crop_by_year: dict[int, Crop], rng: np.random.Generator,
                  params: PhenologyParams, region: Region) -> FieldSeasons:
    """The cycles of one field over the years of ``crop_by_year`` (each year's crop; perennials repeat)."""
    fs = FieldSeasons(field_id=field_id, crops=[crop_by_year[y].name for y in sorted(crop_by_year)])
    cycles: list[Cycle] = []
    for year in sorted(crop_by_year):
        crop = crop_by_year[year]
        cal = crop.calendar
        if cal is None:
            continue
        if _year_cycles(crop, cal, _day0(year), rng, params, cycles):
            fs.crops[-1] = f"{crop.name}+maize"
    _sequence(cycles)
    for c in cycles:
        cycle_truth(c, params)
    fs.cycles = cycles
    _label_seasons(cycles, region.season_start)
    return fs


def _year_cycles(crop: Crop, cal: Calendar, d0: float, rng: np.random.Generator, params: PhenologyParams,
                 cycles: list[Cycle]) -> bool:
    """Append the cycles of one year's crop (the main one, regrowth after each cut, a second crop) to ``cycles``.

    ``cal`` is the crop's calendar, ``d0`` the year's first day; draws come from ``rng`` in a fixed order. True
    when a second crop follows.
    """
    j = _jitter_calendar(cal, d0, rng, params)
    perennial = cal.sow_doy <= -300
    base_right = j.base_left if perennial else j.base_right  # perennials: continuous from year to year
    winter = not perennial and cal.sow_doy < 0 and cal.base_left > params.bare + 0.05
    # a perennial's year runs from 120 days before its rise; a crop's from sowing
    start = d0 + cal.rise_doy - 120.0 if perennial else j.sow
    cuts = list(cal.cuts)
    if cuts:
        n_cuts = int(rng.choice([2, 3, 4], p=np.asarray(params.cut_count_shares)))
        cuts = cuts[: min(n_cuts, len(cuts))]
    cut_days = [d0 + c + j.shift * 0.5 + float(rng.normal(0, params.harvest_sd_days)) for c in cuts]
    first_harvest = cut_days[0] if cuts else j.harvest
    main = Cycle(
        crop=crop.name, start=start, sow=j.sow, rise=j.rise, rise_days=j.rise_days, fall=j.fall,
        fall_days=j.fall_days, harvest=first_harvest, is_cut=bool(cuts), base_left=j.base_left, peak=j.peak,
        base_right=base_right, emergence=winter,
    )
    cycles.append(main)
    prev_cut = first_harvest
    for k in range(1, len(cuts) + 1):
        assert prev_cut is not None
        nxt = cut_days[k] if k < len(cuts) else None
        cycles.append(Cycle(
            crop=crop.name, start=prev_cut, sow=prev_cut, rise=prev_cut + params.regrowth_days,
            rise_days=params.regrowth_rise_days, fall=j.fall, fall_days=j.fall_days, harvest=nxt,
            is_cut=nxt is not None, base_left=params.cut_level, peak=j.peak - 0.03, base_right=base_right,
            pre_stage="harvested",
        ))
        prev_cut = nxt
    if crop.second is not None and rng.uniform() < crop.second_share:
        j2 = _jitter_calendar(crop.second, d0, rng, params)
        sow2 = max(j2.sow, (main.harvest if main.harvest is not None else main.fall) + 3.0)
        delta = sow2 - j2.sow
        cycles.append(Cycle(
            crop=f"{crop.name}+maize", start=sow2, sow=sow2, rise=j2.rise + delta, rise_days=j2.rise_days,
            fall=j2.fall + delta, fall_days=j2.fall_days,
            harvest=None if j2.harvest is None else j2.harvest + delta, is_cut=False,
            base_left=max(params.residue, j2.base_left), peak=j2.peak, base_right=j2.base_right,
        ))
        return True
    return False


def _sequence(cycles: list[Cycle]) -> None:
    """Sort the cycles by start and end each where the next begins, moving a crop sown too early."""
    cycles.sort(key=lambda c: c.start)
    for a, b in zip(cycles, cycles[1:], strict=False):
        # a crop is sown only after the previous one is off the field: move the later cycle as a whole
        busy_until = (a.harvest if a.harvest is not None else a.start) + 5.0
        if b.start < busy_until and not a.is_cut:
            _shift_cycle(b, busy_until - b.start)
        a.end = b.start


def _shift_cycle(c: Cycle, delta: float) -> None:
    """Move every day of a cycle by ``delta`` days."""
    c.start += delta
    c.sow += delta
    c.rise += delta
    c.fall += delta
    if c.harvest is not None:
        c.harvest += delta


def _label_seasons(cycles: list[Cycle], season_start: str) -> None:
    """Season labels: the year of the season window holding the peak, ``-2``, ``-3`` for later cycles in it."""
    month, day = (int(x) for x in season_start.split("-"))
    seen: dict[str, int] = {}
    for c in cycles:
        when = str(_EPOCH + np.timedelta64(int(np.floor(c.pos)), "D"))
        year = int(when[:4])
        if (int(when[5:7]), int(when[8:10])) < (month, day):
            year -= 1
        base = str(year)
        seen[base] = seen.get(base, 0) + 1
        c.season = base if seen[base] == 1 else f"{base}-{seen[base]}"


def iso(day: float) -> str:
    """Float days since 1970-01-01 → ``YYYY-MM-DD`` (the day that holds it); empty for NaN."""
    if not np.isfinite(day):
        return ""
    return str(_EPOCH + np.timedelta64(int(np.floor(day)), "D"))


def to_day(date: np.datetime64) -> float:
    """A ``datetime64`` → float days since 1970-01-01."""
    return float((date.astype("datetime64[s]") - np.datetime64("1970-01-01T00:00:00", "s")).astype(np.int64)) / 86400.0
