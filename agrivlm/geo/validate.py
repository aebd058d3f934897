"""Read every block of every file once, so a damaged file is named before anything is written.

A truncated GeoTIFF opens fine (its header is intact) and fails only when a damaged block is read,
with ``RasterioIOError`` chained from GDAL's error. ``validate_files`` finds that block up front.
"""

from __future__ import annotations

from collections.abc import Iterable

import rasterio
from tqdm.auto import tqdm

from agrivlm.errors import IngestError
from agrivlm.geo.rasters import RasterPath, raster_path
from agrivlm.geo.stack import gdal_cache_cap


def validate_file(path: str | RasterPath) -> int:
    """Decode every block of every band of one raster; return the number of blocks read.

    Memory stays at one block. Raises:
        IngestError: naming the file and the first damaged block (block row/col and pixel window).
    """
    path = raster_path(path)  # a remote file is read whole (every block), as a local one
    try:
        ds = rasterio.open(path)
    except rasterio.errors.RasterioIOError as exc:
        raise IngestError(f"{path}: cannot be opened as a raster ({exc}); re-download or re-export it") from exc
    n = 0
    with ds:
        for (brow, bcol), window in ds.block_windows(1):
            try:
                ds.read(window=window)
            except rasterio.errors.RasterioIOError as exc:
                raise IngestError(
                    f"{path}: damaged block (row {brow}, col {bcol}) at pixel window "
                    f"col_off={window.col_off} row_off={window.row_off} {window.width}x{window.height} "
                    f"({exc}); the file is truncated or corrupt — re-download or re-export it"
                ) from exc
            n += 1
    return n


#: GDAL block cache while validating: each block is read once, so a few MiB do; GDAL's default would
#: keep a whole file's decoded blocks until the file is closed.
VALIDATE_CACHE_BYTES = 16 * 2**20


def validate_files(paths: Iterable[str | RasterPath], progress: bool = True) -> int:
    """Validate several rasters (see :func:`validate_file`); return the total number of blocks read."""
    items = list(paths)
    with gdal_cache_cap(VALIDATE_CACHE_BYTES):
        return sum(validate_file(p) for p in tqdm(items, desc="validate", unit="file", disable=not progress))
