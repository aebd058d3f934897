from __future__ import annotations

from datetime import datetime

import pytest
from rasters import smooth_field, write_raster

from agrivlm.errors import IngestError
from agrivlm.geo.dates import date_from_name, date_from_tags, resolve_date


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("S2_NDVI_20150711T100008.tif", datetime(2015, 7, 11, 10, 0, 8)),
        ("field_2020-05-03.tif", datetime(2020, 5, 3)),
        ("x_2020-05-03T11:22:33_y.tif", datetime(2020, 5, 3, 11, 22, 33)),
        ("LC08_L2SP_190028_20210612_02_T1.tif", datetime(2021, 6, 12)),
        ("MOD13Q1.A2016145.h19v04.061.tif", datetime(2016, 5, 24)),  # day 145 of a leap year
        ("MOD13Q1.A2015001.tif", datetime(2015, 1, 1)),
    ],
)
def test_dates_from_names(name: str, expected: datetime) -> None:
    assert date_from_name(name) == expected


@pytest.mark.parametrize("name", ["tile_1.tif", "S2_20151332.tif", "x_1234567890.tif", "A2015400.tif"])
def test_names_without_a_valid_date(name: str) -> None:
    assert date_from_name(name) is None


def test_tag_formats() -> None:
    assert date_from_tags({"TIFFTAG_DATETIME": "2015:07:11 10:00:08"}) == (
        datetime(2015, 7, 11, 10, 0, 8), "TIFFTAG_DATETIME")
    # ACQUISITIONDATE is preferred over the generic TIFF timestamp
    got = date_from_tags({"TIFFTAG_DATETIME": "2015:07:11 10:00:08", "acquisitiondate": "2016-01-02"})
    assert got == (datetime(2016, 1, 2), "ACQUISITIONDATE")
    assert date_from_tags({"AREA_OR_POINT": "Area"}) is None


def test_precedence_mapping_then_tag_then_name(tmp_path) -> None:
    path = write_raster(tmp_path / "S2_20200101.tif", smooth_field(4, 4),
                        tags={"TIFFTAG_DATETIME": "2020:02:02 00:00:00"})
    assert resolve_date(path).time == datetime(2020, 2, 2)
    assert resolve_date(path).source == "tag:TIFFTAG_DATETIME"
    assert resolve_date(path, {"S2_20200101.tif": "2020-03-03"}).time == datetime(2020, 3, 3)
    plain = write_raster(tmp_path / "S2_20200101b.tif", smooth_field(4, 4))
    assert resolve_date(plain).source == "name"
    assert resolve_date(plain).time == datetime(2020, 1, 1)


def test_no_date_is_an_error_naming_the_file(tmp_path) -> None:
    path = write_raster(tmp_path / "tile.tif", smooth_field(4, 4))
    with pytest.raises(IngestError, match=r"tile\.tif: no acquisition date"):
        resolve_date(path)
    with pytest.raises(IngestError, match=r"tile\.tif: the date mapping gives 'soon'"):
        resolve_date(path, {"tile.tif": "soon"})
