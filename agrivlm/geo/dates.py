"""Acquisition dates of GeoTIFFs: from an explicit mapping, the file's tags, or its name.

Order of precedence for one file:

1. an explicit mapping the caller passes (``{"a.tif": "2020-05-01"}``, keyed by file name or path):
   the user said so, so it wins over anything in the file;
2. GeoTIFF tags: ``ACQUISITIONDATE``, ``ACQUISITION_DATE``, ``DATE_ACQUIRED``, ``SENSING_TIME``,
   ``DATETIME``, then ``TIFFTAG_DATETIME`` (the TIFF baseline tag, ``YYYY:MM:DD HH:MM:SS``);
3. the file name: ``YYYY-MM-DD`` (optionally ``THH:MM:SS`` / ``THHMMSS``), ``YYYYMMDD`` (optionally
   ``THHMMSS``), then MODIS-style day of year ``YYYYDDD`` (e.g. ``MOD13Q1.A2016145...``).

A file whose date none of these gives is an :class:`~agrivlm.errors.IngestError` naming the file.
Times are naive UTC ``numpy.datetime64[s]``-compatible :class:`datetime.datetime` objects.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import numpy.typing as npt
import rasterio

from agrivlm.errors import IngestError
from agrivlm.geo.rasters import RasterPath, raster_path

#: Dataset-level tags read for a date, in order; the first that parses wins.
DATE_TAGS: tuple[str, ...] = (
    "ACQUISITIONDATE",
    "ACQUISITION_DATE",
    "DATE_ACQUIRED",
    "SENSING_TIME",
    "DATETIME",
    "TIFFTAG_DATETIME",
)

_TAG_FORMATS = (
    "%Y:%m:%d %H:%M:%S",
    "%Y-%m-%dT%H:%M:%S.%fZ",
    "%Y-%m-%dT%H:%M:%S.%f",
    "%Y-%m-%dT%H:%M:%SZ",
    "%Y-%m-%dT%H:%M:%S",
    "%Y-%m-%d %H:%M:%S",
    "%Y-%m-%d",
    "%Y%m%dT%H%M%S",
    "%Y%m%d",
)

# Digits never glued to other digits on either side, so "120150711" is not read as a date.
_ISO = re.compile(r"(?<!\d)(\d{4})-(\d{2})-(\d{2})(?:[T_ ](\d{2})[:\-]?(\d{2})[:\-]?(\d{2}))?(?!\d)")
_COMPACT = re.compile(r"(?<!\d)(\d{4})(\d{2})(\d{2})(?:T(\d{2})(\d{2})(\d{2}))?(?!\d)")
_DOY = re.compile(r"(?<!\d)(\d{4})(\d{3})(?!\d)")


@dataclass(frozen=True)
class DatedFile:
    """A raster file with its acquisition time and where that time came from."""

    #: Path of the GeoTIFF (local, or a remote address: :mod:`agrivlm.geo.remote`).
    path: RasterPath
    #: Acquisition time (naive, UTC).
    time: datetime
    #: "mapping", "tag:<NAME>" or "name".
    source: str


def parse_date_string(text: str) -> datetime | None:
    """Parse one tag value in any of the usual formats; ``None`` when it is not a date."""
    text = text.strip()
    for fmt in _TAG_FORMATS:
        try:
            return datetime.strptime(text, fmt)
        except ValueError:
            continue
    return date_from_name(text)


def _build(y: str, m: str, d: str, hh: str | None, mm: str | None, ss: str | None) -> datetime | None:
    try:
        return datetime(int(y), int(m), int(d), int(hh or 0), int(mm or 0), int(ss or 0))
    except ValueError:
        return None


def date_from_name(name: str) -> datetime | None:
    """Date in a file name: ``YYYY-MM-DD``, ``YYYYMMDD`` (each with an optional time), then ``YYYYDDD``.

    Returns ``None`` when no pattern gives a valid calendar date.
    """
    stem = Path(name).name
    for pattern in (_ISO, _COMPACT):
        for match in pattern.finditer(stem):
            when = _build(*match.groups())
            if when is not None and 1950 <= when.year <= 2200:
                return when
    for match in _DOY.finditer(stem):
        year, doy = int(match.group(1)), int(match.group(2))
        if 1950 <= year <= 2200 and 1 <= doy <= 366:
            when = datetime(year, 1, 1) + timedelta(days=doy - 1)
            if when.year == year:
                return when
    return None


def date_from_tags(tags: Mapping[str, str]) -> tuple[datetime, str] | None:
    """Date from a GeoTIFF's dataset tags (see :data:`DATE_TAGS`); ``(time, tag name)`` or ``None``."""
    upper = {k.upper(): v for k, v in tags.items()}
    for tag in DATE_TAGS:
        if tag in upper:
            when = parse_date_string(str(upper[tag]))
            if when is not None:
                return when, tag
    return None


def _lookup(mapping: Mapping[str, object], path: RasterPath) -> object | None:
    for key in (str(path), path.name, path.stem, str(path.resolve())):
        if key in mapping:
            return mapping[key]
    return None


def resolve_date(
    path: str | RasterPath, mapping: Mapping[str, object] | None = None, tags: Mapping[str, str] | None = None
) -> DatedFile:
    """Acquisition time of one GeoTIFF (precedence in the module docstring).

    ``tags``: the file's dataset tags when the caller has the file open already (else it is opened).

    Raises:
        IngestError: when no source gives a date, or the mapping's value is not a date.

    """
    path = raster_path(path)
    if mapping:
        given = _lookup(mapping, path)
        if given is not None:
            if isinstance(given, datetime):
                return DatedFile(path, given, "mapping")
            when = parse_date_string(str(given))
            if when is None:
                raise IngestError(
                    f"{path.name}: the date mapping gives {given!r}, which is not a date (use YYYY-MM-DD)"
                )
            return DatedFile(path, when, "mapping")
    if tags is None:
        try:
            with rasterio.open(path) as ds:
                tags = ds.tags()
        except rasterio.errors.RasterioIOError as exc:
            raise IngestError(f"{path}: cannot be opened as a raster ({exc}); check the file") from exc
    from_tags = date_from_tags(tags)
    if from_tags is not None:
        return DatedFile(path, from_tags[0], f"tag:{from_tags[1]}")
    from_name = date_from_name(path.name)
    if from_name is not None:
        return DatedFile(path, from_name, "name")
    raise IngestError(
        f"{path}: no acquisition date in its tags ({', '.join(DATE_TAGS)}) or its name "
        "(YYYY-MM-DD, YYYYMMDD, YYYYDDD); rename it or pass a date mapping (--date FILE=YYYY-MM-DD)"
    )


# -- float days and calendar days (the recipes', inference's and evaluation's one rule) ---------------------
_EPOCH = np.datetime64("1970-01-01T00:00:00", "s")


def to_days(times: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Times (``datetime64`` or ISO strings) → float days since 1970-01-01."""
    arr = np.asarray(times, dtype="datetime64[s]")
    return (arr - _EPOCH).astype(np.float64) / 86400.0


def from_days(days: npt.ArrayLike) -> npt.NDArray[np.datetime64]:
    """Float days since 1970-01-01 → ``datetime64[s]`` (rounded to the second)."""
    secs = np.rint(np.asarray(days, dtype=np.float64) * 86400.0).astype(np.int64)
    return _EPOCH + secs.astype("timedelta64[s]")


def day_str(when: object) -> str:
    """A time (``datetime64``, ``datetime`` or ISO string) → its calendar day ``YYYY-MM-DD``."""
    return str(np.asarray(when, dtype="datetime64[s]").astype("datetime64[D]"))


def iso_day(day: float) -> str:
    """A float day → ``YYYY-MM-DD``."""
    return str(from_days(day).astype("datetime64[D]"))


def season_windows(first_day: float, last_day: float, season_start: str) -> list[tuple[str, float, float]]:
    """Yearly windows ``(label, start, end)`` starting on ``season_start`` (``MM-DD``) that overlap the range."""
    month, day = (int(x) for x in season_start.split("-"))
    y0 = int(str(from_days(first_day))[:4]) - 1
    y1 = int(str(from_days(last_day))[:4]) + 1
    out = []
    for year in range(y0, y1 + 1):
        start = to_days(np.datetime64(f"{year:04d}-{month:02d}-{day:02d}"))
        end = to_days(np.datetime64(f"{year + 1:04d}-{month:02d}-{day:02d}"))
        if end > first_day and start <= last_day:
            out.append((str(year), float(start), float(end)))
    return out
