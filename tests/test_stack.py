from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import Resampling, reproject
from rasters import UTM33, UTM_TRANSFORM, smooth_field, truncate, write_dated_stack, write_raster

from agrivlm.errors import IngestError
from agrivlm.geo import open_stack, validate_file
from agrivlm.geo.stack import resolve_inputs


def _sample_stamps(sample_root: Path) -> list[datetime]:
    files = (sample_root / "ndvi").glob("*.tif")
    return sorted(datetime.strptime(p.stem.split("_")[-1], "%Y%m%dT%H%M%S") for p in files)


def test_sample_stack_dates_from_tags(sample_root: Path) -> None:
    stack = open_stack(sample_root / "ndvi", masks=sample_root / "cloud_mask")
    assert stack.shape == (68, 1, 101, 100)
    assert stack.band_names == ["NDVI"]
    assert stack.crs == CRS.from_epsg(32633)
    assert stack.grid.bounds == pytest.approx((465181.05, 5079244.89, 466180.53, 5080254.63), abs=0.01)
    expected = _sample_stamps(sample_root)
    assert [t.astype(datetime) for t in stack.times] == expected
    assert np.all(np.diff(stack.times.astype("int64")) > 0)
    assert {s.date_source for step in stack.steps for s in step.sources} == {"tag:TIFFTAG_DATETIME"}
    # the two acquisitions of 2015-12-08 stay distinct time steps
    same_day = [t for t in stack.times if str(t).startswith("2015-12-08")]
    assert [str(t) for t in same_day] == ["2015-12-08T10:04:09", "2015-12-08T10:11:25"]


def test_sample_dates_from_names_match_tags(tmp_path: Path, sample_root: Path) -> None:
    # rewrite every file without its TIFFTAG_DATETIME: the date must now come from the name
    for src in sorted((sample_root / "ndvi").glob("*.tif")):
        with rasterio.open(src) as ds:
            write_raster(tmp_path / src.name, ds.read(), transform=ds.transform, crs=ds.crs, nodata=ds.nodata)
    stack = open_stack(sorted(tmp_path.glob("*.tif")))
    assert {s.date_source for step in stack.steps for s in step.sources} == {"name"}
    assert [t.astype(datetime) for t in stack.times] == _sample_stamps(sample_root)


def test_sample_data_and_cloud_masks_match_the_files(sample_root: Path) -> None:
    stack = open_stack(str(sample_root / "ndvi" / "*.tif"), masks=str(sample_root / "cloud_mask" / "*.tif"))
    k = 40
    name = stack.steps[k].sources[0].path.name
    with rasterio.open(sample_root / "ndvi" / name) as ds:
        ndvi = ds.read(1)
    with rasterio.open(sample_root / "cloud_mask" / name.replace("NDVI", "CLM")) as ds:
        clouds = ds.read(1)
    arr = stack.data.isel(time=k, band=0).values
    np.testing.assert_array_equal(arr, ndvi)
    np.testing.assert_array_equal(stack.mask.isel(time=k).values, clouds != 0)
    # cloudy dates are real: some dates are fully clear, some have clouds
    per_date = stack.mask.sum(("y", "x")).values
    assert (per_date == 0).any() and (per_date > 0).any()
    assert stack.data.rio.crs == stack.crs and stack.data.rio.transform() == stack.transform
    assert stack.data.chunks is not None  # lazy, dask-backed


def test_same_day_rules(sample_root: Path) -> None:
    first = open_stack(sample_root / "ndvi", same_day="first")
    assert first.shape[0] == 67
    assert [s.path.name for s in first.dropped] == ["S2_NDVI_20151208T101125.tif"]
    mosaic = open_stack(sample_root / "ndvi", same_day="mosaic")
    assert mosaic.shape[0] == 67
    step = next(s for s in mosaic.steps if s.time.date() == datetime(2015, 12, 8).date())
    assert len(step.sources) == 2


def test_nodata_becomes_a_mask_not_zeros(tmp_path: Path) -> None:
    data = smooth_field(20, 24, bands=2)
    data[:, :5, :7] = -9999.0
    data[1, 10, 10] = -9999.0
    write_raster(tmp_path / "a_20200101.tif", data)
    stack = open_stack(tmp_path)
    values, nodata, _ = stack.read_window(rasterio.windows.Window(0, 0, 24, 20))
    assert nodata[0, :, :5, :7].all() and nodata[0, 1, 10, 10] and not nodata[0, 0, 10, 10]
    assert np.isnan(values[0][nodata[0]]).all()
    assert not (values[0][~nodata[0]] == 0).any()
    assert int(stack.data.isnull().sum()) == 2 * 35 + 1


def test_mismatched_grids_are_warped_to_the_reference(tmp_path: Path) -> None:
    ref = smooth_field(60, 60, bands=1, seed=1)
    write_raster(tmp_path / "ref_20200101.tif", ref)
    # the same field reprojected to Web Mercator at a finer resolution
    dst_crs = CRS.from_epsg(3857)
    from rasterio.warp import calculate_default_transform

    transform, w, h = calculate_default_transform(UTM33, dst_crs, 60, 60,
                                                  *rasterio.transform.array_bounds(60, 60, UTM_TRANSFORM),
                                                  resolution=7.0)
    merc = np.full((1, h, w), -9999.0, dtype=np.float32)
    reproject(ref, merc, src_transform=UTM_TRANSFORM, src_crs=UTM33, dst_transform=transform, dst_crs=dst_crs,
              resampling=Resampling.bilinear, dst_nodata=-9999.0)
    write_raster(tmp_path / "merc_20200111.tif", merc, transform=transform, crs=dst_crs)
    # and a coarser UTM file covering only the top-left quarter
    coarse = ref[:, :30:2, :30:2]
    write_raster(tmp_path / "coarse_20200121.tif", coarse, transform=UTM_TRANSFORM @ Affine.scale(2))

    stack = open_stack(tmp_path)
    assert stack.grid.transform == UTM_TRANSFORM and (stack.grid.height, stack.grid.width) == (60, 60)
    assert sorted(p.name for p in stack.warped_files) == ["coarse_20200121.tif", "merc_20200111.tif"]
    data = stack.data.values
    interior = np.s_[5:-5, 5:-5]
    # two resamplings of a smooth field: close to the original in the interior
    assert np.nanmax(np.abs(data[1, 0][interior] - ref[0][interior])) < 0.02
    # outside the coarse file's extent there is no data (NaN), never zeros
    assert np.isnan(data[2, 0, 40:, 40:]).all()
    assert not np.isnan(data[2, 0, 2:28, 2:28]).any()


def test_bad_inputs_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match="holds no GeoTIFF"):
        resolve_inputs(tmp_path / "empty")
    with pytest.raises(IngestError, match="matches no file"):
        resolve_inputs(str(tmp_path / "empty" / "*.tif"))

    nocrs = tmp_path / "nocrs"
    write_dated_stack(nocrs, n_dates=2)
    write_raster(nocrs / "S2_20210501.tif", smooth_field(40, 48, 2), crs=None)
    with pytest.raises(IngestError, match=r"S2_20210501\.tif: no CRS"):
        open_stack(nocrs)

    mixed = tmp_path / "mixed"
    write_dated_stack(mixed, n_dates=2, bands=2)
    write_raster(mixed / "S2_20210501.tif", smooth_field(40, 48, 3))
    with pytest.raises(IngestError, match=r"S2_20210501\.tif: has 3 band\(s\) but S2_20210301\.tif has 2"):
        open_stack(mixed)

    garbage = tmp_path / "garbage"
    write_dated_stack(garbage, n_dates=1)
    (garbage / "S2_20210601.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(IngestError, match=r"S2_20210601\.tif: cannot be opened"):
        open_stack(garbage)


def test_truncated_file_is_found_by_validation_and_by_reads(tmp_path: Path) -> None:
    path = write_raster(tmp_path / "big_20200101.tif", smooth_field(256, 256, seed=3), tiled=True, blocksize=32)
    good_blocks = validate_file(path)
    assert good_blocks == 64
    truncate(path)
    with rasterio.open(path) as ds:  # the header is intact: it opens fine
        assert ds.width == 256
    with pytest.raises(IngestError, match=r"big_20200101\.tif: damaged block \(row \d+, col \d+\)"):
        validate_file(path)
    stack = open_stack(path)
    with pytest.raises(IngestError, match=r"big_20200101\.tif: damaged data in window"):
        stack.data.values  # noqa: B018


def test_masks_must_match_dates(tmp_path: Path) -> None:
    write_dated_stack(tmp_path / "data", n_dates=2, height=10, width=10)
    mask = np.zeros((1, 10, 10), dtype=np.uint8)
    mask[0, :3] = 1
    write_raster(tmp_path / "m" / "CLM_20210301.tif", mask, nodata=255)
    stack = open_stack(tmp_path / "data", masks=tmp_path / "m")
    assert stack.mask.values[0, :3].all() and not stack.mask.values[0, 3:].any()
    assert not stack.mask.values[1].any()  # no mask file for the second date: nothing masked
    write_raster(tmp_path / "m" / "CLM_20220101.tif", mask, nodata=255)
    with pytest.raises(IngestError, match=r"CLM_20220101\.tif: mask file dated 2022-01-01 .* matches no data file"):
        open_stack(tmp_path / "data", masks=tmp_path / "m")


def test_copying_the_sample_keeps_it_intact(tmp_path: Path, sample_root: Path) -> None:
    # sanity: the embedded sample equals what PROVENANCE.md describes (68 + 68 files, 88 parcels)
    import geopandas as gpd

    assert len(list((sample_root / "ndvi").glob("*.tif"))) == 68
    assert len(list((sample_root / "cloud_mask").glob("*.tif"))) == 68
    parcels = gpd.read_file(sample_root / "parcels.gpkg")
    assert len(parcels) == 88 and parcels.crs.to_epsg() == 32633
    shutil.copytree(sample_root / "ndvi", tmp_path / "ndvi")
    assert open_stack(tmp_path / "ndvi").shape == (68, 1, 101, 100)
