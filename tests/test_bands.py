from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from rasters import smooth_field, write_raster

from agrivlm.errors import PipelineError
from agrivlm.geo import Chip, ChipStream, open_stack
from agrivlm.pipeline.bands import (
    COMPOSITES,
    INDICES,
    PRESETS,
    BandStats,
    available_composites,
    check_band_count,
    composite,
    match_bands,
    normalize,
    prepare_bands,
    robust_stats,
    spectral_index,
    to_reflectance,
)

S2_NAMES = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"]


@pytest.fixture(scope="module")
def sample_chip(sample_root: Path) -> Chip:
    stack = open_stack(sample_root / "ndvi", masks=sample_root / "cloud_mask")
    return next(iter(ChipStream(stack, chip_size=40)))


@pytest.fixture(scope="module")
def s2_chip(tmp_path_factory: pytest.TempPathFactory) -> Chip:
    """A 12-band uint16 Sentinel-2 L2A-like stack, one date before and one after baseline 04.00."""
    folder = tmp_path_factory.mktemp("s2")
    for k, day in enumerate(["20211220", "20220201"]):
        dn = (smooth_field(20, 24, bands=12, seed=k) * 5000 + 1000).astype(np.uint16)
        dn[:, 0, 0] = 0  # nodata
        dn[3, 1, 1] = 65535  # saturated red
        write_raster(folder / f"S2_{day}.tif", dn, nodata=0, descriptions=S2_NAMES)
    stack = open_stack(folder)
    assert stack.band_names == S2_NAMES
    return next(iter(ChipStream(stack, chip_size=(20, 24))))


def test_presets_are_well_formed() -> None:
    assert set(PRESETS) >= {"sentinel2_l2a", "sentinel2_l2a_c1", "sentinel2_l2a_harmonized", "landsat89_l2",
                            "modis_vi", "rgb", "ndvi"}
    for p in PRESETS.values():
        assert len(set(p.band_names)) == len(p.bands) and len(set(p.common_names)) == len(p.bands)
    assert PRESETS["sentinel2_l2a"].band_names == S2_NAMES
    assert available_composites("sentinel2_l2a") == list(COMPOSITES)  # EVI is computed from blue, red, nir
    assert available_composites("landsat89_l2") == list(COMPOSITES)
    assert available_composites("rgb") == ["true_color"]
    assert available_composites("ndvi") == ["ndvi_gray"]
    assert available_composites("modis_vi") == ["ndvi_gray", "ndvi_evi"]
    assert set(INDICES) >= {"ndvi", "evi", "ndwi", "ndmi", "nbr", "savi", "ndre"}


def test_wrong_band_count_names_the_preset(sample_chip: Chip) -> None:
    assert check_band_count(sample_chip.data, "ndvi").name == "ndvi"
    with pytest.raises(PipelineError, match=r"chip r000000_c000000: preset 'sentinel2_l2a' expects 12 bands "
                                            r"\(B01, .*B12\), got 1"):
        to_reflectance(sample_chip.data, "sentinel2_l2a", sample_chip.times, source="chip r000000_c000000")
    with pytest.raises(PipelineError, match="expects 3 bands"):
        composite(sample_chip.data, "rgb", "true_color")
    with pytest.raises(PipelineError, match="unknown sensor preset 'sentinel3'; use one of sentinel2_l2a"):
        check_band_count(sample_chip.data, "sentinel3")


def test_s2_reflectance_with_the_2022_offset(s2_chip: Chip) -> None:
    refl = to_reflectance(s2_chip.data, "sentinel2_l2a", s2_chip.times)
    dn = s2_chip.data.astype(np.float64)
    ok = ~np.isnan(dn)
    ok[:, 3, 1, 1] = False
    # 2021-12-20: DN / 10000; 2022-02-01 (baseline 04.00): DN / 10000 − 0.1
    np.testing.assert_allclose(refl[0][ok[0]], (dn[0] / 1e4)[ok[0]], rtol=1e-6)
    np.testing.assert_allclose(refl[1][ok[1]], (dn[1] / 1e4 - 0.1)[ok[1]], rtol=1e-5, atol=1e-7)
    assert np.isnan(refl[:, :, 0, 0]).all()  # the files' nodata
    assert np.isnan(refl[:, 3, 1, 1]).all() and not np.isnan(refl[:, 2, 1, 1]).any()  # saturated red only
    harmonized = to_reflectance(s2_chip.data, "sentinel2_l2a_harmonized")
    np.testing.assert_allclose(harmonized[1][ok[1]], (dn[1] / 1e4)[ok[1]], rtol=1e-6)
    c1 = to_reflectance(s2_chip.data, "sentinel2_l2a_c1")
    np.testing.assert_allclose(c1[0][ok[0]], (dn[0] / 1e4 - 0.1)[ok[0]], rtol=1e-5, atol=1e-7)
    with pytest.raises(PipelineError, match="preset 'sentinel2_l2a' applies its offset only to acquisitions from "
                                            "2022-01-25 on; pass the frames' times"):
        to_reflectance(s2_chip.data, "sentinel2_l2a")


def test_ndvi_and_other_indices_against_direct_formulas(s2_chip: Chip) -> None:
    refl = to_reflectance(s2_chip.data, "sentinel2_l2a", s2_chip.times).astype(np.float64)
    red, nir, blue, green = refl[:, 3], refl[:, 7], refl[:, 1], refl[:, 2]
    swir16, swir22, re1 = refl[:, 10], refl[:, 11], refl[:, 4]
    expected = {
        "ndvi": (nir - red) / (nir + red),
        "ndwi": (green - nir) / (green + nir),
        "ndmi": (nir - swir16) / (nir + swir16),
        "nbr": (nir - swir22) / (nir + swir22),
        "ndre": (nir - re1) / (nir + re1),
        "evi": 2.5 * (nir - red) / (nir + 6 * red - 7.5 * blue + 1),
        "savi": 1.5 * (nir - red) / (nir + red + 0.5),
    }
    for name, want in expected.items():
        got = spectral_index(refl, "sentinel2_l2a", name)
        assert got.shape == (2, 20, 24) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, equal_nan=True, err_msg=name)
    ndvi = spectral_index(refl, "sentinel2_l2a", "ndvi")
    assert np.isnan(ndvi[:, 1, 1]).all() and np.isnan(ndvi[:, 0, 0]).all()
    assert np.nanmin(ndvi) >= -1 and np.nanmax(ndvi) <= 1


def test_index_stored_as_a_band_and_missing_bands(sample_chip: Chip) -> None:
    refl = to_reflectance(sample_chip.data, "ndvi")
    np.testing.assert_array_equal(spectral_index(refl, "ndvi", "ndvi"), sample_chip.data[:, 0])
    with pytest.raises(PipelineError, match="index 'evi' needs nir, red, blue but preset 'ndvi' has no nir, red, blue"):
        spectral_index(refl, "ndvi", "evi")
    rgb = np.full((1, 3, 2, 2), 128, np.float32)
    with pytest.raises(PipelineError, match="preset 'rgb' has no nir"):
        spectral_index(to_reflectance(rgb, "rgb"), "rgb", "ndvi")
    with pytest.raises(PipelineError, match="unknown spectral index 'gndvi'"):
        spectral_index(to_reflectance(rgb, "rgb"), "rgb", "gndvi")


def test_landsat_modis_rgb_scaling() -> None:
    dn = np.array([0, 7273, 43636, 43637, 20000], np.float32)
    land = np.broadcast_to(dn[None, None, None, :], (1, 7, 1, 5)).copy()
    refl = to_reflectance(land, "landsat89_l2")[0, 0, 0]
    assert np.isnan(refl[0]) and np.isnan(refl[3])
    np.testing.assert_allclose(refl[[1, 2, 4]], [7273 * 2.75e-5 - 0.2, 43636 * 2.75e-5 - 0.2, 0.35], rtol=1e-5)
    vi = np.array([[[[-3000, -2000, 5000, 10001]], [[4000, 0, 10000, -2001]]]], np.float32)
    out = to_reflectance(vi, "modis_vi")[0]
    np.testing.assert_allclose(out, [[[np.nan, -0.2, 0.5, np.nan]], [[0.4, 0.0, 1.0, np.nan]]], equal_nan=True)
    rgb = to_reflectance(np.array([[[[0, 255]], [[51, 102]], [[255, 0]]]], np.float32), "rgb")[0]
    np.testing.assert_allclose(rgb[:, 0], [[0, 1], [0.2, 0.4], [1, 0]], rtol=1e-6)


def test_false_colour_composites(s2_chip: Chip) -> None:
    refl = to_reflectance(s2_chip.data, "sentinel2_l2a", s2_chip.times)
    tc = composite(refl, "sentinel2_l2a", "true_color")
    np.testing.assert_array_equal(tc, refl[:, [3, 2, 1]])  # B04, B03, B02
    np.testing.assert_array_equal(composite(refl, "sentinel2_l2a", "color_infrared"), refl[:, [7, 3, 2]])
    np.testing.assert_array_equal(composite(refl, "sentinel2_l2a", "agriculture"), refl[:, [10, 7, 1]])
    ng = composite(refl, "sentinel2_l2a", "ndvi_gray")
    assert ng.shape == (2, 3, 20, 24)
    np.testing.assert_array_equal(ng[:, 0], spectral_index(refl, "sentinel2_l2a", "ndvi"))
    assert COMPOSITES["swir"] == ("swir22", "nir", "red")
    with pytest.raises(PipelineError, match="composite 'color_infrared' needs nir, red, green; preset 'rgb' supports "
                                            "true_color"):
        composite(np.zeros((1, 3, 2, 2), np.float32), "rgb", "color_infrared")


def test_robust_stats_and_normalize_against_direct_percentiles(sample_chip: Chip) -> None:
    stats = robust_stats(sample_chip.data, (2, 98))
    vals = sample_chip.data[:, 0][~np.isnan(sample_chip.data[:, 0])]
    assert stats.low[0] == pytest.approx(np.percentile(vals, 2)) and stats.high[0] == pytest.approx(
        np.percentile(vals, 98))
    out = normalize(sample_chip.data, stats)
    assert out.shape == sample_chip.data.shape and out.dtype == np.float32
    assert np.nanmin(out) == 0.0 and np.nanmax(out) == 1.0
    np.testing.assert_array_equal(np.isnan(out), np.isnan(sample_chip.data))
    inside = (sample_chip.data >= stats.low[0]) & (sample_chip.data <= stats.high[0])
    span = stats.high[0] - stats.low[0]
    np.testing.assert_allclose(out[inside], (sample_chip.data[inside] - stats.low[0]) / span, rtol=1e-5, atol=1e-6)
    # about 2 % of the values clip at each end
    assert 0.01 < (out == 0).sum() / vals.size < 0.03 and 0.01 < (out == 1).sum() / vals.size < 0.03
    again = BandStats.from_dict(stats.to_dict())
    np.testing.assert_array_equal(normalize(sample_chip.data, again), out)


@settings(max_examples=60, deadline=None)
@given(x=arrays(np.float32, (3, 2, 4, 5), elements=st.floats(-1e3, 1e3, width=32)))
def test_normalize_properties(x: np.ndarray) -> None:
    stats = robust_stats(x, (5, 95))
    out = normalize(x, stats)
    assert np.all((out >= 0) & (out <= 1))
    for c in range(2):
        # monotone per band: a larger input never gives a smaller output
        flat, res = x[:, c].ravel(), out[:, c].ravel()
        order = np.argsort(flat, kind="stable")
        assert np.all(np.diff(res[order]) >= -1e-6)


def test_normalize_errors_and_constant_bands() -> None:
    x = np.ones((2, 2, 3, 3), np.float32)
    x[:, 1] = np.nan
    with pytest.raises(PipelineError, match=r"band\(s\) \[1\] hold no valid value"):
        robust_stats(x)
    const = np.ones((2, 1, 3, 3), np.float32)
    assert (normalize(const, robust_stats(const)) == 0).all()
    with pytest.raises(PipelineError, match="percentiles must satisfy"):
        robust_stats(const, (50, 50))


def test_prepare_bands_on_the_real_sample_and_a_stack(sample_chip: Chip, s2_chip: Chip) -> None:
    out, stats = prepare_bands(sample_chip.data, "ndvi", composite_name="ndvi_gray")
    assert out.shape == (68, 3, 40, 40) and np.nanmin(out) == 0 and np.nanmax(out) == 1
    np.testing.assert_array_equal(out[:, 0], out[:, 2])
    s2, _ = prepare_bands(s2_chip.data, "sentinel2_l2a", times=s2_chip.times, composite_name="color_infrared")
    assert s2.shape == (2, 3, 20, 24)
    # the same stats reused on another chip give the same mapping
    again, used = prepare_bands(sample_chip.data[:5], "ndvi", composite_name="ndvi_gray", stats=stats)
    assert used is stats
    np.testing.assert_array_equal(again, out[:5])


def test_match_bands_by_name_or_role() -> None:
    names = ["B12", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B01", "SCL"]
    idx = match_bands(names, "sentinel2_l2a")
    assert [names[i] for i in idx] == S2_NAMES
    assert match_bands(["Blue", "green", "RED"], "rgb").tolist() == [2, 1, 0]
    with pytest.raises(PipelineError, match="preset 'sentinel2_l2a' needs bands B01, .* but the bands are named NDVI"):
        match_bands(["NDVI"], "sentinel2_l2a")
