"""The sensor of a synthetic scene: acquisition dates, clouds and shadows, haze, noise, and the spectra.

* **Dates.** Sentinel-2's 5-day revisit (``revisit_days``) with a per-acquisition overpass time; each
  date draws a scene cloud cover from a Beta distribution whose mean is the region's monthly cloud
  fraction (U-shaped: many clear and many overcast days, as in the MODIS climatology); dates above
  ``max_cloud_cover`` are dropped (what a user's catalogue query for ``eo:cloud_cover < 80`` keeps) and
  ``missing_share`` of the rest are missing (data gaps), so the series is irregular.
* **Clouds.** A spatially correlated field (two octaves of smoothed noise, ``cloud_scale_m``) thresholded
  at the date's cover; optical thickness ramps up over ``cloud_edge`` of the field beyond the threshold,
  so cloud edges are thin and semi-transparent. Shadows are the cloud field shifted by ``shadow_shift_m``
  (sun from the south-east in the morning overpass), darkening by up to ``shadow_darkening``. The mask
  marks cloud of opacity above ``mask_min_opacity`` and shadow — thinner edges stay unmasked (residual
  contamination, as in real L2A masks). ``edge_nodata_share`` of dates lose a swath-edge wedge (nodata).
* **Haze** adds a smooth path-radiance term, strongest in blue; **noise** is Gaussian per band.
* **Spectra** (reflectance of B02, B03, B04, B08, B11): a pixel is a linear mix of green vegetation
  and its background (soil of the parcel's own brightness, water, built-up) with the vegetation fraction
  that gives the parcel's NDVI of the date, each sub-pixel cover weighted by its area; NDVI written by
  ``--bands ndvi`` is computed from these mixed reflectances, so both band sets tell the same story.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy.ndimage import gaussian_filter, map_coordinates

FloatArray = npt.NDArray[np.float32]

#: Band names of ``--bands s2`` (Sentinel-2 L2A names) and the endmember spectra (reflectance 0–1).
S2_BANDS: tuple[str, ...] = ("B02", "B03", "B04", "B08", "B11")
VEGETATION = np.array([0.03, 0.075, 0.04, 0.48, 0.22], dtype=np.float32)
SOIL = np.array([0.08, 0.11, 0.15, 0.21, 0.3], dtype=np.float32)
WATER = np.array([0.06, 0.05, 0.03, 0.02, 0.01], dtype=np.float32)
URBAN = np.array([0.1, 0.11, 0.12, 0.16, 0.2], dtype=np.float32)
CLOUD = np.array([0.55, 0.55, 0.56, 0.6, 0.42], dtype=np.float32)
HAZE = np.array([0.05, 0.035, 0.025, 0.012, 0.004], dtype=np.float32)
RED, NIR = 2, 3


@dataclass(frozen=True)
class SensorParams:
    """Acquisition and atmosphere settings (see the module docstring)."""

    revisit_days: int = 5
    max_cloud_cover: float = 0.8
    missing_share: float = 0.08
    #: Concentration of the Beta cloud-cover draw (a + b); below 2 it is U-shaped.
    cloud_concentration: float = 1.4
    cloud_scale_m: float = 1500.0
    cloud_edge: float = 0.35
    mask_min_opacity: float = 0.15
    shadow_shift_m: tuple[float, float] = (-600.0, -500.0)
    shadow_darkening: float = 0.55
    haze_mean: float = 0.3
    noise_sd: float = 0.006
    edge_nodata_share: float = 0.06


def veg_fraction(ndvi: npt.ArrayLike, background: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Vegetation fraction ``fv`` whose mix ``fv·VEGETATION + (1 − fv)·background`` has the given NDVI.

    Args:
        ndvi: ``(...)`` target NDVI.
        background: ``(..., 5)`` background reflectances.

    Returns ``(...)`` in ``[0, 1]`` (NDVI outside what the mix can reach is clipped).
    """
    n = np.asarray(ndvi, dtype=np.float32)
    rs, ns = background[..., RED], background[..., NIR]
    rv, nv = VEGETATION[RED], VEGETATION[NIR]
    num = n * (ns + rs) - (ns - rs)
    den = (nv - rv) - (ns - rs) - n * ((nv + rv) - (ns + rs))
    return np.clip(num / np.where(np.abs(den) < 1e-6, 1e-6, den), 0.0, 1.0).astype(np.float32)


def ndvi_of(refl: FloatArray) -> FloatArray:
    """``(..., 5)`` reflectances → ``(...)`` NDVI."""
    r, n = refl[..., RED], refl[..., NIR]
    return ((n - r) / np.maximum(n + r, 1e-6)).astype(np.float32)


def acquisitions(start: np.datetime64, end: np.datetime64, cloud_monthly: tuple[float, ...],
                 params: SensorParams, rng: np.random.Generator) -> tuple[list[np.datetime64], list[float]]:
    """Acquisition times (``datetime64[s]``) and their scene cloud cover, irregular (see the module docstring)."""
    day = start.astype("datetime64[D]")
    stop = end.astype("datetime64[D]")
    times, covers = [], []
    k = params.cloud_concentration
    while day <= stop:
        month = int(str(day)[5:7])
        mean = float(np.clip(cloud_monthly[month - 1], 0.02, 0.98))
        cover = float(rng.beta(mean * k, (1 - mean) * k))
        missing = rng.uniform() < params.missing_share
        seconds = int(rng.integers(9 * 3600 + 50 * 60, 10 * 3600 + 30 * 60))
        if cover <= params.max_cloud_cover and not missing:
            times.append(day.astype("datetime64[s]") + np.timedelta64(seconds, "s"))
            covers.append(cover)
        day = day + np.timedelta64(params.revisit_days, "D")
    return times, covers


class SmoothField:
    """A zero-mean, unit-sd, spatially correlated random field over a scene, sampled window by window.

    Built at a coarse ``cell_m`` (a quarter of ``scale_m``) for the whole scene, so its memory does not
    grow with the pixel count; a window is bilinearly interpolated from it. Two octaves: ``scale_m`` and
    a quarter of it with weight ``detail``.
    """

    def __init__(self, width_px: int, height_px: int, pixel_m: float, scale_m: float,
                 rng: np.random.Generator, detail: float = 0.35) -> None:
        self.cell_px = max(scale_m / 8.0 / pixel_m, 1.0)
        ny = int(np.ceil(height_px / self.cell_px)) + 8
        nx = int(np.ceil(width_px / self.cell_px)) + 8
        sigma = scale_m / pixel_m / self.cell_px / 2.0
        big = gaussian_filter(rng.normal(size=(ny, nx)), sigma, mode="wrap")
        small = gaussian_filter(rng.normal(size=(ny, nx)), max(sigma / 4.0, 0.7), mode="wrap")
        f = big / (big.std() + 1e-12) + detail * small / (small.std() + 1e-12)
        self.coarse = ((f - f.mean()) / (f.std() + 1e-12)).astype(np.float32)

    def window(self, row0: int, col0: int, height: int, width: int, shift_px: tuple[float, float] = (0, 0)
               ) -> FloatArray:
        """``(height, width)`` values of the window at pixel ``(row0, col0)``, optionally shifted by pixels."""
        rows = (np.arange(height, dtype=np.float32) + row0 + 0.5 - shift_px[0]) / self.cell_px + 4
        cols = (np.arange(width, dtype=np.float32) + col0 + 0.5 - shift_px[1]) / self.cell_px + 4
        rr, cc = np.meshgrid(rows, cols, indexing="ij")
        return map_coordinates(self.coarse, [rr, cc], order=1, mode="grid-wrap").astype(np.float32)

    def quantile(self, q: float) -> float:
        """The ``q`` quantile of the field's values (the cloud threshold of a cover)."""
        return float(np.quantile(self.coarse[4:-4, 4:-4], q))
