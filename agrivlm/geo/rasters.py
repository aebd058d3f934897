"""A raster of a stack, whichever kind it is, and what stands for the content of one with no local file.

A local file, a remote file (:mod:`agrivlm.geo.remote`) or a STAC item's assets (:mod:`agrivlm.geo.stac`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from agrivlm.geo.remote import RemotePath, is_remote, remote_stamp
from agrivlm.geo.stac import StacRaster

#: A raster of a stack: a local file, a remote one, or a STAC item's assets (:class:`agrivlm.geo.stac.StacRaster`).
RasterPath = Path | RemotePath | StacRaster


def raster_path(item: str | os.PathLike[str] | RasterPath) -> RasterPath:
    """A :class:`RemotePath` for a remote address, else a :class:`~pathlib.Path` (a raster path as it is)."""
    if isinstance(item, RemotePath | StacRaster | Path):
        return item
    text = os.fspath(item)
    return RemotePath(text) if is_remote(text) else Path(text)


def network_stamp(path: RemotePath | StacRaster) -> str:
    """What stands for the content of a raster with no local file to hash (recipe manifests, infer journals).

    A remote file: the server's size, ETag and Last-Modified (:func:`remote_stamp`; a COG is not read whole for a
    digest, reading parts is its point). A STAC item's raster: the digest of its VRT, which names its assets'
    addresses, grids and bands.
    """
    if isinstance(path, RemotePath):
        size, etag, modified = remote_stamp(path)
        return f"remote size={size} etag={etag} modified={modified}"
    return "stac vrt " + hashlib.sha256(path.vrt.encode()).hexdigest()
