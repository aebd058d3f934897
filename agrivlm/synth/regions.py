"""Regions of the synthetic landscapes: field sizes, shapes, land use, crop mixes and crop calendars.

Every number here is a documented default a scene can override (``scene.json`` records them all). They
are rounded from published figures, to give scenes of the right order, not to reproduce one place:

* **Field sizes.** Central Europe: median parcel about 1–2 ha with a long tail to tens of ha — the
  Austrian INVEKOS and Slovenian GERK open parcel registers (the embedded sample's 88 parcels: median
  0.6 ha) and the per-country field-size statistics of Fields of The World (Kerner et al. 2024,
  arXiv:2409.16252). Pannonian plain (Hungary, Vojvodina): about 3–10 ha (Fritz et al. 2015, "Mapping
  global cropland and field size", Global Change Biology 21:1980). US Corn Belt: the PLSS quarter-quarter
  section is 40 acres = 16.2 ha, fields of 15–65 ha (Yan & Roy 2016, "Conterminous United States crop
  field size quantification", Remote Sensing of Environment 172:67). Mato Grosso: commercial soy
  fields of tens to hundreds of ha (Picoli et al. 2018, ISPRS J. 145:328). Sizes are log-normal.
* **Crop mixes.** Eurostat crop statistics (apro_cpsh1, AT/SI/DE-BY and HU) for the European regions,
  USDA NASS Cropland Data Layer shares for Iowa (maize ≈ soy), CONAB for Mato Grosso (soy on most
  cropland, second-crop "safrinha" maize after about 60–70 % of it).
* **Calendars** (day of year of the *inflection* of the rise and of the fall of a double-logistic NDVI
  curve, and of harvest): the JRC MARS crop calendars for Europe, USDA NASS "Usual planting and
  harvesting dates" (Agricultural Handbook 628, 2010) for Iowa, CONAB's Mato Grosso calendar (soy sown
  mid-September–October, harvested January–February; safrinha maize sown February, harvested
  June–July). Per-field shifts of ± 2–3 weeks follow the spread of sowing dates in those calendars.
  Grassland is cut 2–4 times in Central Europe (Kolecka et al. 2018, "Mapping mowing events",
  Remote Sensing 10:1221).
* **Clouds.** Monthly mean cloud fraction from the MODIS cloud climatology (Wilson & Jetz 2016, PLoS
  Biology 14:e1002415), rounded: Central Europe 0.75 in winter to 0.45 in summer; Mato Grosso 0.8 in
  the wet season (November–March) to 0.1 in the dry season (June–August).
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Land-use classes written to ``parcels.gpkg`` (the embedded sample's LULC names) and their codes in
#: ``landcover.tif`` (the sample's ``lulc.tif`` codes where the class exists there).
LANDCOVER_CODES: dict[str, int] = {
    "cultivated land": 1,
    "forest": 2,
    "grassland": 3,
    "shrubland": 4,
    "water": 5,
    "artificial surface": 8,
}


@dataclass(frozen=True)
class Calendar:
    """One crop's growth cycle in a year, as days of year (may exceed 365 or be negative: next/previous year).

    The cycle's NDVI is a double logistic (Beck et al. 2006) from ``base_left`` up to ``peak`` with
    inflection ``rise_doy`` and scale ``rise_days``, down to ``base_right`` with inflection ``fall_doy`` and
    scale ``fall_days``; on ``harvest_doy`` (if any) it drops at once to the residue level.
    """

    #: Sowing day of year (negative: autumn of the previous year, for winter crops).
    sow_doy: float
    rise_doy: float
    rise_days: float
    fall_doy: float
    fall_days: float
    #: Day of year of harvest; ``None``: no harvest (the cycle senesces).
    harvest_doy: float | None
    #: NDVI before the rise (winter level of winter crops, bare soil of spring crops), at the top, after.
    base_left: float
    peak: float
    base_right: float
    #: Mowing days of year (grassland): each cut drops NDVI to ``cut_level`` and the sward regrows.
    cuts: tuple[float, ...] = ()


@dataclass(frozen=True)
class Crop:
    """A crop (or land cover) with its class and calendar."""

    name: str
    cls: str
    calendar: Calendar | None
    #: A second crop in the same season window (double cropping), sown after this one's harvest.
    second: Calendar | None = None
    #: Share of this crop's fields that carry ``second``.
    second_share: float = 0.0


@dataclass(frozen=True)
class Region:
    """A region preset: where the scene lies, its landscape, crops and sky."""

    name: str
    #: ``(lon, lat)`` of the scene's reference point (the UTM zone follows).
    lonlat: tuple[float, float]
    #: Median and log-sd of field area (ha), and the median length/width ratio of fields.
    field_median_ha: float
    field_sigma: float
    field_aspect: float
    #: Median area (ha) of a block between roads; fields tile blocks.
    block_median_ha: float
    #: Dominant orientation of roads and fields (degrees from east) and its per-block spread.
    orientation_deg: float
    orientation_jitter_deg: float
    #: Share of fields that are L-shaped (a piece of a neighbour merged in).
    l_shape_share: float
    #: Share of blocks by land use: fields, grassland, forest, built-up, water.
    block_use: dict[str, float]
    #: Crop shares on cultivated blocks.
    crop_mix: dict[str, float]
    #: Crops of the region.
    crops: dict[str, Crop]
    #: Monthly mean cloud fraction, January … December.
    cloud_monthly: tuple[float, ...]
    #: First day (``MM-DD``) of the season window a season's peak is labelled by.
    season_start: str = "01-01"
    #: Widths (m) of roads, hedges and field margins.
    road_width_m: float = 6.0
    margin_width_m: tuple[float, float] = (2.0, 8.0)
    #: Share of field margins that are hedges (woody) rather than grass strips or tracks.
    hedge_share: float = 0.3
    extra: dict[str, float] = field(default_factory=dict)


def _grass(cuts: tuple[float, ...]) -> Calendar:
    return Calendar(sow_doy=-365, rise_doy=95, rise_days=10, fall_doy=290, fall_days=12, harvest_doy=None,
                    base_left=0.45, peak=0.82, base_right=0.5, cuts=cuts)


_FOREST = Crop("forest", "forest", Calendar(sow_doy=-365, rise_doy=115, rise_days=7, fall_doy=290, fall_days=9,
                                              harvest_doy=None, base_left=0.5, peak=0.88, base_right=0.5))
_EUROPE_CROPS: dict[str, Crop] = {
    "winter_cereal": Crop("winter_cereal", "cultivated land", Calendar(
        sow_doy=-85, rise_doy=88, rise_days=9, fall_doy=178, fall_days=7, harvest_doy=198,
        base_left=0.34, peak=0.85, base_right=0.3)),
    "maize": Crop("maize", "cultivated land", Calendar(
        sow_doy=118, rise_doy=165, rise_days=8, fall_doy=255, fall_days=9, harvest_doy=280,
        base_left=0.18, peak=0.86, base_right=0.32)),
    "soybean": Crop("soybean", "cultivated land", Calendar(
        sow_doy=128, rise_doy=170, rise_days=7, fall_doy=245, fall_days=7, harvest_doy=268,
        base_left=0.18, peak=0.86, base_right=0.28)),
    "rapeseed": Crop("rapeseed", "cultivated land", Calendar(
        sow_doy=-125, rise_doy=75, rise_days=9, fall_doy=165, fall_days=7, harvest_doy=192,
        base_left=0.5, peak=0.84, base_right=0.3)),
    "sunflower": Crop("sunflower", "cultivated land", Calendar(
        sow_doy=108, rise_doy=155, rise_days=8, fall_doy=222, fall_days=7, harvest_doy=255,
        base_left=0.18, peak=0.8, base_right=0.28)),
    "fallow": Crop("fallow", "cultivated land", Calendar(
        sow_doy=-365, rise_doy=110, rise_days=14, fall_doy=245, fall_days=14, harvest_doy=None,
        base_left=0.22, peak=0.48, base_right=0.25)),
    "grassland": Crop("grassland", "grassland", _grass((140.0, 185.0, 235.0, 280.0))),
    "forest": _FOREST,
}


def _shifted(crops: dict[str, Crop], days: float) -> dict[str, Crop]:
    """The same crops with every calendar day moved by ``days`` (earlier springs of the Pannonian plain)."""
    out = {}
    for name, crop in crops.items():
        cal = crop.calendar
        if cal is None:
            out[name] = crop
            continue
        moved = Calendar(
            sow_doy=cal.sow_doy + days, rise_doy=cal.rise_doy + days, rise_days=cal.rise_days,
            fall_doy=cal.fall_doy + days, fall_days=cal.fall_days,
            harvest_doy=None if cal.harvest_doy is None else cal.harvest_doy + days,
            base_left=cal.base_left, peak=cal.peak, base_right=cal.base_right,
            cuts=tuple(c + days for c in cal.cuts))
        out[name] = Crop(crop.name, crop.cls, moved, crop.second, crop.second_share)
    return out


_EUROPE_CLOUDS = (0.75, 0.7, 0.62, 0.55, 0.5, 0.45, 0.42, 0.42, 0.48, 0.6, 0.72, 0.78)

REGIONS: dict[str, Region] = {
    "central_europe": Region(
        name="central_europe", lonlat=(15.3, 46.4), field_median_ha=1.6, field_sigma=0.85, field_aspect=2.5,
        block_median_ha=25.0, orientation_deg=20.0, orientation_jitter_deg=30.0, l_shape_share=0.15,
        block_use={"fields": 0.62, "grassland": 0.18, "forest": 0.14, "built-up": 0.04, "water": 0.02},
        crop_mix={"winter_cereal": 0.36, "maize": 0.28, "rapeseed": 0.1, "soybean": 0.08, "sunflower": 0.04,
                  "fallow": 0.04, "grassland": 0.1},
        crops=_EUROPE_CROPS, cloud_monthly=_EUROPE_CLOUDS, hedge_share=0.35,
    ),
    "pannonian": Region(
        name="pannonian", lonlat=(19.8, 46.9), field_median_ha=5.0, field_sigma=0.9, field_aspect=3.0,
        block_median_ha=80.0, orientation_deg=5.0, orientation_jitter_deg=12.0, l_shape_share=0.1,
        block_use={"fields": 0.8, "grassland": 0.08, "forest": 0.07, "built-up": 0.03, "water": 0.02},
        crop_mix={"winter_cereal": 0.38, "maize": 0.3, "sunflower": 0.15, "rapeseed": 0.08, "soybean": 0.05,
                  "fallow": 0.04},
        crops=_shifted(_EUROPE_CROPS, -7.0),
        cloud_monthly=(0.7, 0.65, 0.55, 0.48, 0.45, 0.38, 0.32, 0.3, 0.38, 0.5, 0.68, 0.74),
        road_width_m=8.0, hedge_share=0.15,
    ),
    "corn_belt": Region(
        name="corn_belt", lonlat=(-93.5, 42.0), field_median_ha=18.0, field_sigma=0.6, field_aspect=1.8,
        block_median_ha=259.0, orientation_deg=0.0, orientation_jitter_deg=1.0, l_shape_share=0.12,
        block_use={"fields": 0.88, "grassland": 0.05, "forest": 0.04, "built-up": 0.02, "water": 0.01},
        crop_mix={"maize": 0.5, "soybean": 0.45, "grassland": 0.05},
        crops={
            "maize": Crop("maize", "cultivated land", Calendar(
                sow_doy=122, rise_doy=175, rise_days=8, fall_doy=255, fall_days=9, harvest_doy=285,
                base_left=0.18, peak=0.88, base_right=0.3)),
            "soybean": Crop("soybean", "cultivated land", Calendar(
                sow_doy=135, rise_doy=185, rise_days=7, fall_doy=250, fall_days=6, harvest_doy=276,
                base_left=0.18, peak=0.88, base_right=0.28)),
            "grassland": Crop("grassland", "grassland", _grass((160.0, 215.0))),
            "forest": _FOREST,
        },
        cloud_monthly=(0.68, 0.65, 0.62, 0.58, 0.55, 0.45, 0.38, 0.36, 0.4, 0.48, 0.62, 0.7),
        road_width_m=8.0, margin_width_m=(2.0, 4.0), hedge_share=0.05,
    ),
    "mato_grosso": Region(
        name="mato_grosso", lonlat=(-55.8, -12.9), field_median_ha=40.0, field_sigma=0.8, field_aspect=1.6,
        block_median_ha=400.0, orientation_deg=-10.0, orientation_jitter_deg=15.0, l_shape_share=0.1,
        block_use={"fields": 0.8, "grassland": 0.1, "forest": 0.08, "built-up": 0.01, "water": 0.01},
        crop_mix={"soybean": 0.85, "grassland": 0.1, "fallow": 0.05},
        crops={
            # days of year counted from 1 January of the year the season starts (August): soy sown late
            # September, peak December, harvest late January (day 390 = 25 January of the next year)
            "soybean": Crop("soybean", "cultivated land", Calendar(
                sow_doy=272, rise_doy=305, rise_days=7, fall_doy=375, fall_days=6, harvest_doy=392,
                base_left=0.3, peak=0.88, base_right=0.32),
                second=Calendar(sow_doy=400, rise_doy=430, rise_days=7, fall_doy=500, fall_days=8,
                                harvest_doy=535, base_left=0.32, peak=0.84, base_right=0.3),
                second_share=0.65),
            # pasture (Brachiaria) greening with the rains, browning in the dry season, grazed not cut
            "grassland": Crop("grassland", "grassland", Calendar(
                sow_doy=-365, rise_doy=295, rise_days=12, fall_doy=490, fall_days=15, harvest_doy=None,
                base_left=0.38, peak=0.72, base_right=0.38)),
            "fallow": Crop("fallow", "cultivated land", Calendar(
                sow_doy=-365, rise_doy=300, rise_days=12, fall_doy=470, fall_days=14, harvest_doy=None,
                base_left=0.25, peak=0.5, base_right=0.25)),
            "forest": Crop("forest", "forest", Calendar(
                sow_doy=-365, rise_doy=290, rise_days=15, fall_doy=520, fall_days=15, harvest_doy=None,
                base_left=0.62, peak=0.86, base_right=0.62)),
        },
        cloud_monthly=(0.82, 0.8, 0.75, 0.55, 0.3, 0.12, 0.08, 0.1, 0.3, 0.55, 0.72, 0.8),
        season_start="08-01", road_width_m=10.0, margin_width_m=(4.0, 20.0), hedge_share=0.2,
    ),
}
