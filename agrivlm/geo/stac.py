"""STAC Items, ItemCollections (saved searches) and catalogues as a stack: one raster per item, bands by asset.

The imagery users have (Sentinel-2, Landsat, HLS) is catalogued in STAC and stored as Cloud-Optimized GeoTIFFs,
one file per band. A STAC JSON given where a stack is accepted (``agrivlm ingest items.json --assets B04,B08``,
``agrivlm infer items.json --assets B04,B08 …``, :func:`agrivlm.geo.open_stack` with ``assets=``) becomes one
raster per item: its ``assets`` (in the order asked) as the bands of a GDAL VRT held in memory (nothing is
written, nothing downloaded but the headers), on the grid of the item's finest asset (coarser assets, a 20 m
band beside 10 m ones, are read with nearest-neighbour resampling, which keeps their values), dated by the
item's ``datetime`` (or ``start_datetime``) through the VRT's ``DATETIME`` tag. The stack then treats the items
as it treats files: it sorts them by date, applies the same-day rule, warps items of another tile or CRS to the
reference grid, and reads windows (GDAL fetches only the COG blocks a window needs).

Read with pystac: a single Item, an ItemCollection (what ``pystac-client``'s ``item_collection().save_object()``
writes for a search), or a Catalog/Collection walked for every item below it; from a local file or a URL.
Relative asset hrefs resolve against the JSON's own location; remote hrefs are read through GDAL's virtual file
systems (:mod:`agrivlm.geo.remote`).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
import rasterio
from affine import Affine

from agrivlm.errors import IngestError
from agrivlm.geo.remote import gdal_path, http_url, is_remote

#: Media types of raster assets (``image/tiff; application=geotiff; profile=cloud-optimized`` and kin).
_RASTER_TYPES = ("image/tiff", "image/vnd.stac.geotiff", "application/x-hdf", "image/jp2")


def is_stac(item: str | os.PathLike[str]) -> bool:
    """Whether an input names a STAC JSON (a ``.json`` / ``.geojson`` file or URL) rather than a raster."""
    text = str(item) if not isinstance(item, str) else item
    base = text.split("?", 1)[0].lower()
    return base.endswith((".json", ".geojson"))


@dataclass(frozen=True, eq=False)
class StacRaster:
    """One STAC item's assets as one raster: ``os.fspath`` gives its VRT (XML) for GDAL, ``str`` names it."""

    #: The STAC JSON it came from (a path or URL, as given).
    source: str
    #: The item's id.
    item_id: str
    #: The item's acquisition time (naive UTC).
    when: datetime
    #: The assets that are its bands, in order.
    assets: tuple[str, ...]
    #: The VRT document GDAL opens.
    vrt: str

    def __fspath__(self) -> str:
        return self.vrt

    def __str__(self) -> str:
        return f"{self.source}#{self.item_id}[{','.join(self.assets)}]"

    def __repr__(self) -> str:
        return f"StacRaster({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StacRaster) and (other.source, other.item_id, other.assets) == (
            self.source, self.item_id, self.assets)

    def __hash__(self) -> int:
        return hash((self.source, self.item_id, self.assets))

    def __lt__(self, other: object) -> bool:
        return str(self) < str(other)

    @property
    def name(self) -> str:
        """``<item id>.vrt``: what a stack shows as the file's name (chip indexes, messages)."""
        return f"{self.item_id}.vrt"

    @property
    def stem(self) -> str:
        """The item's id."""
        return self.item_id

    @property
    def suffix(self) -> str:
        """``.vrt``."""
        return ".vrt"

    def resolve(self) -> StacRaster:
        """Itself (the counterpart of ``Path.resolve``)."""
        return self


def _read_json(source: str) -> dict[str, Any]:
    import pystac

    try:
        if is_remote(source):
            url = http_url(source)
            if url is None:
                raise IngestError(f"{source}: a STAC JSON is read from a local file or an http(s) URL")
            data = pystac.StacIO.default().read_json(url)
        else:
            data = json.loads(Path(source).read_text())
    except IngestError:
        raise
    except (OSError, ValueError) as exc:
        raise IngestError(f"{source}: cannot be read as STAC JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise IngestError(f"{source}: not a STAC JSON object")
    return data


def read_items(source: str) -> list[Any]:
    """The STAC items of an Item, ItemCollection or Catalog/Collection JSON (a path or an http(s) URL).

    Raises:
        IngestError: naming the file, when it is not STAC or holds no item.
    """
    import pystac

    data = _read_json(source)
    href = source if is_remote(source) else str(Path(source).resolve())
    href = http_url(href) or href
    kind = data.get("type")
    try:
        if kind == "Feature":
            item = pystac.Item.from_dict(data, href=href)
            item.set_self_href(href)
            items = [item]
        elif kind == "FeatureCollection":
            items = list(pystac.ItemCollection.from_dict(data, preserve_dict=False))
            for it in items:
                if it.get_self_href() is None:
                    it.set_self_href(href)  # relative asset hrefs resolve against the collection's file
        elif kind in ("Catalog", "Collection"):
            cat = pystac.read_dict(data, href=href)  # the JSON read above; links resolve against href
            if not isinstance(cat, pystac.Catalog):
                raise IngestError(f"{source}: not a STAC Catalog or Collection")
            items = list(cat.get_items(recursive=True))
        else:
            raise IngestError(f"{source}: not a STAC Item, ItemCollection, Catalog or Collection (type {kind!r})")
    except IngestError:
        raise
    except Exception as exc:  # noqa: BLE001 — pystac raises many types for malformed STAC
        raise IngestError(f"{source}: not valid STAC ({type(exc).__name__}: {exc})") from exc
    if not items:
        raise IngestError(f"{source}: the STAC JSON holds no item")
    return items


def _item_time(item: Any, source: str) -> datetime:
    when = item.datetime or item.common_metadata.start_datetime
    if when is None:
        raise IngestError(f"{source}#{item.id}: the item has no datetime nor start_datetime")
    if when.tzinfo is not None:
        when = when.astimezone(timezone.utc).replace(tzinfo=None)
    return when


def _raster_assets(item: Any) -> list[str]:
    out = []
    for key, asset in item.assets.items():
        roles = asset.roles or []
        media = (asset.media_type or "").lower()
        if media.startswith(_RASTER_TYPES) and ("data" in roles or not roles):
            out.append(key)
    return out


def _asset_path(item: Any, key: str) -> str:
    href = item.assets[key].get_absolute_href() or item.assets[key].href
    if is_remote(href):
        return gdal_path(href)
    if href.startswith("file://"):
        href = href[len("file://"):]
    return str(Path(href).resolve())


@dataclass(frozen=True)
class _Band:
    path: str
    band: int
    width: int
    height: int
    transform: Affine
    crs: Any
    dtype: str
    nodata: float | None


def _open_asset(path: str, label: str) -> list[_Band]:
    try:
        with rasterio.open(path) as ds:
            if ds.crs is None:
                raise IngestError(f"{label}: the asset has no CRS")
            return [_Band(path, b, ds.width, ds.height, ds.transform, ds.crs, ds.dtypes[b - 1], ds.nodata)
                    for b in range(1, ds.count + 1)]
    except rasterio.errors.RasterioIOError as exc:
        raise IngestError(f"{label}: cannot be opened as a raster ({exc})") from exc


def item_vrt(item: Any, assets: Sequence[str], source: str) -> StacRaster:
    """One item's ``assets`` as the bands of a VRT on the grid of its finest asset (see the module docstring).

    Raises:
        IngestError: naming the item: an asset it lacks, assets in different CRSs, an asset that cannot be opened.
    """
    when = _item_time(item, source)
    missing = [a for a in assets if a not in item.assets]
    if missing:
        raise IngestError(f"{source}#{item.id}: no asset {', '.join(missing)} (the item has "
                          f"{', '.join(sorted(item.assets))}); choose the bands with --assets")
    bands: list[tuple[str, _Band]] = []
    for key in assets:
        bands.extend((key, b) for b in _open_asset(_asset_path(item, key), f"{source}#{item.id} asset {key}"))
    crs = {b.crs.to_string() for _, b in bands}
    if len(crs) > 1:
        raise IngestError(f"{source}#{item.id}: the assets are in different CRSs ({', '.join(sorted(crs))}); a "
                          "raster's bands must share one grid")
    finest = min((b for _, b in bands), key=lambda b: abs(b.transform.a))
    grid, width, height = finest.transform, finest.width, finest.height
    dtype = str(np.result_type(*[np.dtype(b.dtype) for _, b in bands]))
    gdal_type = {"uint8": "Byte", "int8": "Int8", "uint16": "UInt16", "int16": "Int16", "uint32": "UInt32",
                 "int32": "Int32", "float32": "Float32", "float64": "Float64", "int64": "Int64",
                 "uint64": "UInt64"}[dtype]
    parts = [f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">',
             f"<SRS>{escape(finest.crs.to_wkt())}</SRS>",
             f"<GeoTransform>{', '.join(repr(float(v)) for v in grid.to_gdal())}</GeoTransform>",
             f'<Metadata><MDI key="DATETIME">{when:%Y-%m-%dT%H:%M:%S}</MDI>'
             f"<MDI key=\"STAC_ITEM\">{escape(item.id)}</MDI></Metadata>"]
    per_asset = Counter(key for key, _ in bands)
    for k, (key, b) in enumerate(bands, start=1):
        # where the asset lies on the finest grid (a coarser band covers the same ground with fewer pixels)
        x0 = (b.transform.c - grid.c) / grid.a
        y0 = (b.transform.f - grid.f) / grid.e
        w = b.width * b.transform.a / grid.a
        h = b.height * b.transform.e / grid.e
        desc = key if per_asset[key] == 1 else f"{key}_{b.band}"
        parts.append(f'<VRTRasterBand dataType="{gdal_type}" band="{k}">'
                     f"<Description>{escape(desc)}</Description>"
                     + (f"<NoDataValue>{b.nodata!r}</NoDataValue>" if b.nodata is not None else "")
                     + '<ComplexSource resampling="nearest">'
                     f"<SourceFilename relativeToVRT=\"0\">{escape(b.path)}</SourceFilename>"
                     f"<SourceBand>{b.band}</SourceBand>"
                     f'<SrcRect xOff="0" yOff="0" xSize="{b.width}" ySize="{b.height}"/>'
                     f'<DstRect xOff="{x0!r}" yOff="{y0!r}" xSize="{w!r}" ySize="{h!r}"/>'
                     + (f"<NODATA>{b.nodata!r}</NODATA>" if b.nodata is not None else "")
                     + "</ComplexSource></VRTRasterBand>")
    parts.append("</VRTDataset>")
    return StacRaster(source, item.id, when, tuple(assets), "".join(parts))


def stac_rasters(source: str, assets: Sequence[str] | None) -> list[StacRaster]:
    """Every item of a STAC JSON as a :class:`StacRaster` of ``assets`` (in time order).

    ``assets`` None: the items' one raster data asset, when they have exactly one.

    Raises:
        IngestError: no item, an item without the assets, or ``assets`` None with several raster assets.
    """
    items = read_items(source)
    if not assets:
        found = _raster_assets(items[0])
        if len(found) != 1:
            raise IngestError(f"{source}: name the bands to read with --assets (e.g. --assets "
                              f"{','.join(found[:2]) or 'B04,B08'}); the items hold "
                              f"{', '.join(sorted(items[0].assets))}")
        assets = found
    out = [item_vrt(item, list(assets), source) for item in items]
    return sorted(out, key=lambda r: (r.when, r.item_id))
