"""Bands: sensor presets, scaling to reflectance, robust normalisation, spectral indices, false colour.

A vision encoder wants three channels in about ``[0, 1]``; a satellite chip has N bands of digital
numbers. The steps, each a small pure function on ``(T, C, H, W)`` float32 arrays with NaN = no data:

1. :func:`check_band_count` / :func:`match_bands` — the chip's bands against a :class:`SensorPreset`
   (a clear :class:`~agrivlm.errors.PipelineError` naming the preset and both counts).
2. :func:`to_reflectance` — ``value · scale + offset`` per band; the preset's nodata and out-of-range
   digital numbers become NaN. Sentinel-2 L2A's ``−0.1`` offset applies only from processing baseline
   04.00 (acquisitions from 2022-01-25), so ``sentinel2_l2a`` needs the frames' dates; archives shifted
   back to the old scale use ``sentinel2_l2a_harmonized``, ESA's Collection-1 reprocessing (offset on
   every date) ``sentinel2_l2a_c1``.
3. :func:`spectral_index` (NDVI, EVI, NDWI, NDMI, NBR, SAVI, NDRE) and :func:`composite` (true colour,
   colour infrared, agriculture, SWIR, NDVI grey; channels may be bands or indices).
4. :func:`robust_stats` + :func:`normalize` — per-band percentile clip to ``[0, 1]`` over *all* frames
   of a chip (or fixed dataset-wide stats), so changes over time survive normalisation.

:func:`prepare_bands` chains them. The learnable N-band → 3-channel adapter (a 1×1 conv) is part of the
model, not of this module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from agrivlm.errors import PipelineError

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class BandSpec:
    """One band of a sensor product.

    Attributes:
        name: the product's band name (``"B04"``, ``"SR_B4"``, ``"NDVI"``).
        common_name: STAC ``eo:common_name``-style role (``"red"``, ``"nir"``, ``"swir16"``, ``"ndvi"``).
        wavelength_nm: centre wavelength in nanometres (``None`` for index bands).
        scale: multiply the stored value by this ...
        offset: ... then add this, to get reflectance (unitless, 0–1) or the index value.
        nodata: stored value meaning "no data" (``None``: only NaN).
        valid_range: inclusive ``(min, max)`` of valid *stored* values; others become NaN.

    """

    name: str
    common_name: str
    wavelength_nm: float | None = None
    scale: float = 1.0
    offset: float = 0.0
    nodata: float | None = None
    valid_range: tuple[float, float] | None = None


@dataclass(frozen=True)
class SensorPreset:
    """A sensor product: its bands in file order and how to scale them.

    Attributes:
        name: preset key (``"sentinel2_l2a"``).
        title: human-readable product name.
        bands: the bands, in the order a file or stack holds them.
        offset_since: ISO date from which :attr:`BandSpec.offset` applies (earlier acquisitions get 0);
            ``None``: the offset always applies.

    """

    name: str
    title: str
    bands: tuple[BandSpec, ...]
    offset_since: str | None = None

    @property
    def band_names(self) -> list[str]:
        """Band names in file order."""
        return [b.name for b in self.bands]

    @property
    def common_names(self) -> list[str]:
        """Common names in file order."""
        return [b.common_name for b in self.bands]

    def band_index(self, role: str) -> int:
        """Index of the band with common name (or band name) ``role``; :class:`PipelineError` if absent."""
        for i, b in enumerate(self.bands):
            if role.lower() in (b.common_name.lower(), b.name.lower()):
                return i
        raise PipelineError(
            f"preset {self.name!r} has no {role!r} band (it has {', '.join(self.common_names)})")

    def has(self, role: str) -> bool:
        """Whether a band has common name (or band name) ``role``."""
        return any(role.lower() in (b.common_name.lower(), b.name.lower()) for b in self.bands)


def _s2(name: str, common: str, nm: float) -> BandSpec:
    return BandSpec(name, common, nm, scale=1e-4, offset=-0.1, nodata=0, valid_range=(1, 65534))


def _landsat(name: str, common: str, nm: float) -> BandSpec:
    return BandSpec(name, common, nm, scale=2.75e-5, offset=-0.2, nodata=0, valid_range=(7273, 43636))


_S2_BANDS = (
    ("B01", "coastal", 443), ("B02", "blue", 490), ("B03", "green", 560), ("B04", "red", 665),
    ("B05", "rededge1", 705), ("B06", "rededge2", 740), ("B07", "rededge3", 783), ("B08", "nir", 842),
    ("B8A", "nir08", 865), ("B09", "nir09", 945), ("B11", "swir16", 1610), ("B12", "swir22", 2190),
)

#: Every preset, by key.
PRESETS: dict[str, SensorPreset] = {
    p.name: p
    for p in (
        SensorPreset(
            "sentinel2_l2a",
            "Sentinel-2 L2A surface reflectance, 12 bands (B01…B12 without B10), DN/10000 − 0.1 from "
            "processing baseline 04.00 (2022-01-25) on",
            tuple(_s2(*b) for b in _S2_BANDS),
            offset_since="2022-01-25",
        ),
        SensorPreset(
            "sentinel2_l2a_c1",
            "Sentinel-2 L2A of ESA's Collection-1 reprocessing: DN/10000 − 0.1 on every date, 12 bands",
            tuple(_s2(*b) for b in _S2_BANDS),
        ),
        SensorPreset(
            "sentinel2_l2a_harmonized",
            "Sentinel-2 L2A already harmonised to the pre-2022 scale (DN/10000, no offset), 12 bands",
            tuple(BandSpec(n, c, w, scale=1e-4, nodata=0, valid_range=(1, 65534)) for n, c, w in _S2_BANDS),
        ),
        SensorPreset(
            "sentinel2_l2a_5band",
            "Sentinel-2 L2A B02 B03 B04 B08 B11 at the harmonised scale (DN/10000): the usual 10/20 m subset, "
            "and what `agrivlm synth --bands s2` writes",
            tuple(BandSpec(n, c, w, scale=1e-4, nodata=0, valid_range=(1, 65534))
                  for n, c, w in _S2_BANDS if n in ("B02", "B03", "B04", "B08", "B11")),
        ),
        SensorPreset(
            "landsat89_l2",
            "Landsat 8/9 Collection 2 Level-2 surface reflectance SR_B1…SR_B7 (DN·2.75e-5 − 0.2)",
            (
                _landsat("SR_B1", "coastal", 443), _landsat("SR_B2", "blue", 482), _landsat("SR_B3", "green", 562),
                _landsat("SR_B4", "red", 655), _landsat("SR_B5", "nir", 865), _landsat("SR_B6", "swir16", 1609),
                _landsat("SR_B7", "swir22", 2201),
            ),
        ),
        SensorPreset(
            "modis_vi",
            "MODIS MOD13/MYD13 vegetation indices: NDVI, EVI (DN/10000, fill −3000)",
            (
                BandSpec("NDVI", "ndvi", None, scale=1e-4, nodata=-3000, valid_range=(-2000, 10000)),
                BandSpec("EVI", "evi", None, scale=1e-4, nodata=-3000, valid_range=(-2000, 10000)),
            ),
        ),
        SensorPreset(
            "rgb",
            "Plain 8-bit RGB (value/255)",
            (BandSpec("red", "red", 665, scale=1 / 255), BandSpec("green", "green", 560, scale=1 / 255),
             BandSpec("blue", "blue", 490, scale=1 / 255)),
        ),
        SensorPreset(
            "ndvi",
            "A single NDVI band already in index units (like the embedded Slovenia sample)",
            (BandSpec("NDVI", "ndvi", None, valid_range=(-1.0, 1.0)),),
        ),
    )
}


def get_preset(name: str | SensorPreset) -> SensorPreset:
    """The preset called ``name`` (or ``name`` itself); :class:`PipelineError` naming the known ones."""
    if isinstance(name, SensorPreset):
        return name
    try:
        return PRESETS[name]
    except KeyError:
        raise PipelineError(f"unknown sensor preset {name!r}; use one of {', '.join(PRESETS)}") from None


def _frames(data: npt.ArrayLike, what: str = "frames") -> FloatArray:
    arr = np.asarray(data, dtype=np.float32)
    if arr.ndim != 4:
        raise PipelineError(f"{what} must be (T, C, H, W), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise PipelineError(f"{what} hold zero frames (T = 0)")
    return arr


def check_band_count(data: npt.ArrayLike, preset: str | SensorPreset, source: str = "frames") -> SensorPreset:
    """Check that ``data`` ``(T, C, H, W)`` has the preset's band count; return the preset.

    Raises:
        PipelineError: ``"<source>: preset 'sentinel2_l2a' expects 12 bands (B01, …), got 1"``.

    """
    p = get_preset(preset)
    shape = np.shape(data)
    if len(shape) != 4:
        raise PipelineError(f"{source}: frames must be (T, C, H, W), got shape {tuple(shape)}")
    if shape[1] != len(p.bands):
        raise PipelineError(
            f"{source}: preset {p.name!r} expects {len(p.bands)} bands ({', '.join(p.band_names)}), got "
            f"{shape[1]}; pick the preset that matches the files ({', '.join(PRESETS)}) or select its bands "
            "with match_bands")
    return p


def match_bands(band_names: Sequence[str], preset: str | SensorPreset, source: str = "stack") -> npt.NDArray[
        np.int64]:
    """Indices into ``band_names`` (e.g. a stack's band descriptions) of the preset's bands, in preset order.

    Names match case-insensitively on the band name or the common name (``"B04"`` or ``"red"``).

    Raises:
        PipelineError: naming the preset bands that are missing and the names that were given.

    """
    p = get_preset(preset)
    lower = [n.lower() for n in band_names]
    out, missing = [], []
    for b in p.bands:
        hit = next((i for i, n in enumerate(lower) if n in (b.name.lower(), b.common_name.lower())), None)
        if hit is None:
            missing.append(b.name)
        else:
            out.append(hit)
    if missing:
        raise PipelineError(
            f"{source}: preset {p.name!r} needs bands {', '.join(missing)} but the bands are named "
            f"{', '.join(band_names)}; set band descriptions in the files or pick another preset")
    return np.asarray(out, dtype=np.int64)


def to_reflectance(data: npt.ArrayLike, preset: str | SensorPreset, times: npt.ArrayLike | None = None,
                   source: str = "frames") -> FloatArray:
    """Stored values → reflectance (0–1) or index values: ``value · scale + offset`` per band.

    Values equal to the band's nodata, outside its valid range, or NaN become NaN.

    Args:
        data: ``(T, C, H, W)`` stored values (digital numbers), ``C`` = the preset's band count.
        preset: a :class:`SensorPreset` or its key.
        times: ``(T,)`` acquisition times; required when the preset's offset depends on the date
            (:attr:`SensorPreset.offset_since`, Sentinel-2 L2A).
        source: what to name in errors (a chip id, a file).

    Returns:
        ``(T, C, H, W)`` float32.

    """
    p = check_band_count(data, preset, source)
    raw = _frames(data).astype(np.float64)
    t = raw.shape[0]
    apply_offset = np.ones(t, dtype=bool)
    if p.offset_since is not None:
        if times is None:
            raise PipelineError(
                f"{source}: preset {p.name!r} applies its offset only to acquisitions from {p.offset_since} on; "
                "pass the frames' times")
        when = np.asarray(times, dtype="datetime64[us]").ravel()
        if when.size != t:
            raise PipelineError(f"{source}: {when.size} times for {t} frames")
        apply_offset = when >= np.datetime64(p.offset_since, "us")
    out = np.empty(raw.shape, dtype=np.float32)
    for c, b in enumerate(p.bands):
        v = raw[:, c]
        bad = np.isnan(v)
        if b.nodata is not None:
            bad |= v == b.nodata
        if b.valid_range is not None:
            bad |= (v < b.valid_range[0]) | (v > b.valid_range[1])
        scaled = v * b.scale + np.where(apply_offset, b.offset, 0.0)[:, None, None]
        out[:, c] = np.where(bad, np.nan, scaled)
    return out


# -- robust normalisation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BandStats:
    """Per-band clip range of :func:`normalize`.

    Attributes:
        low: ``(C,)`` value mapped to 0 (the ``percentiles[0]`` percentile).
        high: ``(C,)`` value mapped to 1.
        percentiles: the percentiles the range came from.

    """

    low: npt.NDArray[np.float64]
    high: npt.NDArray[np.float64]
    percentiles: tuple[float, float] = (2.0, 98.0)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (for a processor's saved config)."""
        return {"low": self.low.tolist(), "high": self.high.tolist(), "percentiles": list(self.percentiles)}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> BandStats:
        """Inverse of :meth:`to_dict`."""
        pct = d.get("percentiles", (2.0, 98.0))
        return cls(np.asarray(d["low"], dtype=np.float64), np.asarray(d["high"], dtype=np.float64),
                   (float(pct[0]), float(pct[1])))  # type: ignore[index]


def robust_stats(data: npt.ArrayLike, percentiles: tuple[float, float] = (2.0, 98.0),
                 source: str = "frames") -> BandStats:
    """Per-band ``(low, high)`` percentiles over every frame and pixel, ignoring NaN.

    Args:
        data: ``(T, C, H, W)``.
        percentiles: ``(lower, upper)`` in ``[0, 100]``, lower < upper.
        source: what to name in errors.

    Raises:
        PipelineError: a band with no valid value, or bad percentiles.

    """
    lo_p, hi_p = percentiles
    if not 0.0 <= lo_p < hi_p <= 100.0:
        raise PipelineError(f"percentiles must satisfy 0 ≤ lower < upper ≤ 100, got {percentiles}")
    arr = _frames(data)
    flat = np.moveaxis(arr, 1, 0).reshape(arr.shape[1], -1)
    empty = np.flatnonzero(np.isnan(flat).all(axis=1))
    if empty.size:
        raise PipelineError(f"{source}: band(s) {empty.tolist()} hold no valid value in any frame; cannot normalise")
    q = np.nanpercentile(flat.astype(np.float64), [lo_p, hi_p], axis=1)
    return BandStats(low=q[0], high=q[1], percentiles=(float(lo_p), float(hi_p)))


def normalize(data: npt.ArrayLike, stats: BandStats, clip: bool = True) -> FloatArray:
    """``(x − low) / (high − low)`` per band, clipped to ``[0, 1]``; NaN stays NaN.

    A band with ``high == low`` (constant) maps to 0.

    Returns:
        ``(T, C, H, W)`` float32.

    """
    arr = _frames(data)
    if stats.low.shape != (arr.shape[1],):
        raise PipelineError(f"stats are for {stats.low.size} bands, frames have {arr.shape[1]}")
    lo = stats.low[None, :, None, None]
    span = (stats.high - stats.low)[None, :, None, None]
    out = (arr - lo) / np.where(span > 0, span, 1.0)
    if clip:
        out = np.clip(out, 0.0, 1.0)
    return out.astype(np.float32)


# -- spectral indices and composites -------------------------------------------------------------------


def _nd(a: FloatArray, b: FloatArray) -> FloatArray:
    den = a + b
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den != 0, (a - b) / den, np.nan).astype(np.float32)


def _ratio(num: FloatArray, den: FloatArray) -> FloatArray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den != 0, num / den, np.nan).astype(np.float32)


@dataclass(frozen=True)
class IndexSpec:
    """A spectral index: the bands it needs (common names) and its formula on reflectance."""

    name: str
    needs: tuple[str, ...]
    formula: Callable[..., FloatArray] = field(repr=False)
    title: str = ""


#: Spectral indices on reflectance, by key.
INDICES: dict[str, IndexSpec] = {
    s.name: s
    for s in (
        IndexSpec("ndvi", ("nir", "red"), _nd, "(NIR − Red) / (NIR + Red)"),
        IndexSpec("ndwi", ("green", "nir"), _nd, "McFeeters: (Green − NIR) / (Green + NIR)"),
        IndexSpec("ndmi", ("nir", "swir16"), _nd, "(NIR − SWIR1) / (NIR + SWIR1)"),
        IndexSpec("nbr", ("nir", "swir22"), _nd, "(NIR − SWIR2) / (NIR + SWIR2)"),
        IndexSpec("ndre", ("nir", "rededge1"), _nd, "(NIR − RedEdge1) / (NIR + RedEdge1)"),
        IndexSpec("evi", ("nir", "red", "blue"),
                  lambda n, r, b: _ratio(2.5 * (n - r), n + 6.0 * r - 7.5 * b + 1.0),
                  "2.5 (NIR − Red) / (NIR + 6 Red − 7.5 Blue + 1)"),
        IndexSpec("savi", ("nir", "red"), lambda n, r: _ratio(1.5 * (n - r), n + r + 0.5),
                  "1.5 (NIR − Red) / (NIR + Red + 0.5)"),
    )
}


def spectral_index(reflectance: npt.ArrayLike, preset: str | SensorPreset, name: str) -> FloatArray:
    """A spectral index of every frame.

    If the preset *stores* the index as a band (``modis_vi``'s NDVI, the ``ndvi`` preset) that band is
    returned; otherwise it is computed from the bands it needs. Zero denominators give NaN.

    Args:
        reflectance: ``(T, C, H, W)`` output of :func:`to_reflectance`.
        preset: the bands' preset.
        name: a key of :data:`INDICES`.

    Returns:
        ``(T, H, W)`` float32.

    Raises:
        PipelineError: unknown index, or the preset lacks a band the index needs.

    """
    p = check_band_count(reflectance, preset)
    arr = _frames(reflectance)
    key = name.lower()
    if p.has(key):
        return arr[:, p.band_index(key)].copy()
    spec = INDICES.get(key)
    if spec is None:
        raise PipelineError(f"unknown spectral index {name!r}; use one of {', '.join(INDICES)}")
    missing = [n for n in spec.needs if not p.has(n)]
    if missing:
        raise PipelineError(
            f"index {key!r} needs {', '.join(spec.needs)} but preset {p.name!r} has no {', '.join(missing)} band")
    return spec.formula(*(arr[:, p.band_index(n)] for n in spec.needs))


#: False-colour composites: three channels, each a band common name or an index key.
COMPOSITES: dict[str, tuple[str, str, str]] = {
    "true_color": ("red", "green", "blue"),
    "color_infrared": ("nir", "red", "green"),
    "agriculture": ("swir16", "nir", "blue"),
    "swir": ("swir22", "nir", "red"),
    "ndvi_gray": ("ndvi", "ndvi", "ndvi"),
    "ndvi_evi": ("ndvi", "evi", "ndvi"),
}


def available_composites(preset: str | SensorPreset) -> list[str]:
    """Composites whose every channel the preset has (as a band or a computable index)."""
    p = get_preset(preset)

    def ok(ch: str) -> bool:
        return p.has(ch) or (ch in INDICES and all(p.has(n) for n in INDICES[ch].needs))

    return [k for k, chans in COMPOSITES.items() if all(ok(c) for c in chans)]


def composite(reflectance: npt.ArrayLike, preset: str | SensorPreset, name: str) -> FloatArray:
    """A three-channel false-colour composite of every frame (values not yet normalised).

    Args:
        reflectance: ``(T, C, H, W)`` output of :func:`to_reflectance`.
        preset: the bands' preset.
        name: a key of :data:`COMPOSITES`.

    Returns:
        ``(T, 3, H, W)`` float32.

    """
    p = check_band_count(reflectance, preset)
    chans = COMPOSITES.get(name)
    if chans is None:
        raise PipelineError(f"unknown composite {name!r}; use one of {', '.join(COMPOSITES)}")
    if name not in available_composites(p):
        raise PipelineError(
            f"composite {name!r} needs {', '.join(chans)}; preset {p.name!r} supports "
            f"{', '.join(available_composites(p)) or 'none'}")
    arr = _frames(reflectance)
    cache: dict[str, FloatArray] = {}
    out = []
    for ch in chans:
        if ch not in cache:
            cache[ch] = arr[:, p.band_index(ch)] if p.has(ch) else spectral_index(arr, p, ch)
        out.append(cache[ch])
    return np.stack(out, axis=1).astype(np.float32)


def fill_nodata(data: npt.ArrayLike, value: float = 0.0) -> tuple[FloatArray, npt.NDArray[np.bool_]]:
    """Replace NaN by ``value`` for the encoder; return ``(filled, valid)`` with ``valid`` True where data was."""
    arr = np.asarray(data, dtype=np.float32)
    valid = ~np.isnan(arr)
    return np.where(valid, arr, np.float32(value)).astype(np.float32), valid


def prepare_bands(
    data: npt.ArrayLike,
    preset: str | SensorPreset,
    *,
    composite_name: str | None = None,
    times: npt.ArrayLike | None = None,
    stats: BandStats | None = None,
    percentiles: tuple[float, float] = (2.0, 98.0),
    source: str = "frames",
) -> tuple[FloatArray, BandStats]:
    """Stored values → normalised channels in ``[0, 1]`` (NaN = no data).

    :func:`to_reflectance`, then :func:`composite` (if ``composite_name``; else every band), then
    :func:`normalize` with ``stats`` or, if none, :func:`robust_stats` of these frames.

    Returns:
        ``((T, 3 or C, H, W) float32, the stats used)``.

    """
    refl = to_reflectance(data, preset, times, source)
    chans = composite(refl, preset, composite_name) if composite_name else refl
    used = stats if stats is not None else robust_stats(chans, percentiles, source)
    return normalize(chans, used), used
