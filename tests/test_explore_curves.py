"""A field's NDVI curve: the mean over its clear pixels on each date, clouds and gaps left out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rasters import UTM_TRANSFORM, write_raster
from shapely.geometry import box

from agrivlm.explore.curves import field_pixels, ndvi_curve, stages_for
from agrivlm.explore.inputs import ExploreError
from agrivlm.geo import open_stack


def test_curve_is_the_clear_pixel_mean(tmp_path: Path) -> None:
    h, w = 20, 20
    values = [0.2, 0.5, 0.8]
    for k, v in enumerate(values):
        data = np.full((1, h, w), v, dtype=np.float32)
        data[0, 5:10, 5:7] = v + 0.1  # part of the field is greener
        mask = np.zeros((1, h, w), dtype=np.uint8)
        if k == 1:
            mask[0, 5:10, 5:10] = 1  # date 2: the whole field is cloudy
        if k == 2:
            mask[0, 5:10, 7:10] = 1  # date 3: 15 of 25 pixels cloudy
        write_raster(tmp_path / "ndvi" / f"S2_2021050{k + 1}.tif", data, descriptions=["NDVI"])
        write_raster(tmp_path / "clm" / f"CLM_2021050{k + 1}.tif", mask, nodata=None)
    stack = open_stack(tmp_path / "ndvi", masks=tmp_path / "clm")
    # the field: pixels rows 5..9, cols 5..9 (a box on pixel edges, shrunk so only those centres are inside)
    x0, y0 = UTM_TRANSFORM * (5, 5)
    x1, y1 = UTM_TRANSFORM * (10, 10)
    field = box(x0 + 1, y1 + 1, x1 - 1, y0 - 1)
    window, inside = field_pixels(stack, field)
    assert inside.sum() == 25
    curve = ndvi_curve(stack, field, {"ndvi": 0})
    assert list(curve["n_pixels"]) == [25, 25, 25]
    assert curve["ndvi"][0] == pytest.approx((15 * 0.2 + 10 * 0.3) / 25, abs=1e-6)
    assert np.isnan(curve["ndvi"][1]) and curve["clear_fraction"][1] == 0 and curve["cloud_fraction"][1] == 1
    # date 3: only the 10 greener pixels are clear, 40 % < 50 %: measured but not used
    assert curve["ndvi"][2] == pytest.approx(0.9, abs=1e-6) and curve["clear_fraction"][2] == pytest.approx(0.4)
    assert curve["used"].tolist() == [True, False, False]
    assert ndvi_curve(stack, field, {"ndvi": 0}, min_clear=0.4)["used"].tolist() == [True, False, True]


def test_tiny_and_outside_fields(tmp_path: Path) -> None:
    write_raster(tmp_path / "S2_20210501.tif", np.full((1, 10, 10), 0.5, dtype=np.float32))
    stack = open_stack(tmp_path)
    x, y = UTM_TRANSFORM * (3, 3)
    sliver = box(x + 1, y - 2, x + 3, y - 1)  # holds no pixel centre: every touched pixel counts
    _, inside = field_pixels(stack, sliver)
    assert inside.sum() == 1
    with pytest.raises(ExploreError, match="outside the stack"):
        field_pixels(stack, box(x + 5000, y, x + 5100, y + 100))


def test_curve_on_the_real_sample(sample_root: Path) -> None:
    import geopandas as gpd

    stack = open_stack(sample_root / "ndvi", masks=sample_root / "cloud_mask")
    parcels = gpd.read_file(sample_root / "parcels.gpkg")
    field = parcels.loc[parcels["index"].astype(str) == "37649"].geometry.iloc[0]  # a grassland parcel
    curve = ndvi_curve(stack, field, {"ndvi": 0})
    assert len(curve) == 68 and curve["n_pixels"].iloc[0] > 20
    used = curve[curve["used"]]
    assert 20 < len(used) < 68  # real clouds: many dates are left out
    summer = used[used["date"].dt.month.isin([6, 7, 8])]["ndvi"].median()
    winter = used[used["date"].dt.month.isin([12, 1, 2])]["ndvi"].median()
    assert summer > winter + 0.1  # grass greens up in summer


def test_stages_for_joins_predicted_and_true() -> None:
    pred = pd.DataFrame({"field_id": ["1", "2"], "date": pd.to_datetime(["2021-05-01", "2021-05-01"]),
                         "stage": ["peak", "dormant"]})
    true = pd.DataFrame({"field_id": ["1"], "date": pd.to_datetime(["2021-04-20"]), "stage": ["green-up"]})
    rows = stages_for("1", {"predicted": [pred], "true": [true]})
    assert rows[["stage", "source"]].values.tolist() == [["peak", "predicted"], ["green-up", "true"]]
    assert stages_for("9", {"predicted": [pred], "true": [true]}).empty
