"""Rasters GDAL reads remotely: ``https://``, ``s3://``, ``gs://``, ``az://`` URLs and ``/vsi…/`` paths.

A stack may mix local files and remote ones (Cloud-Optimized GeoTIFFs read by HTTP range requests, through
GDAL's virtual file systems: ``/vsicurl/``, ``/vsis3/``, ``/vsigs/``, ``/vsiaz/``). :class:`RemotePath` keeps
the address exactly as given (``pathlib.Path`` would fold ``https://`` into ``https:/``), gives GDAL its
``/vsi…/`` form through ``os.fspath`` (so ``rasterio.open(remote)`` works) and the few ``Path`` attributes a
stack uses (``name``, ``stem``, ``suffix``: dates are read from the file name as for local files).

Credentials and HTTP settings are GDAL's own (``AWS_*``, ``GS_*``, ``GDAL_HTTP_*`` environment variables, or a
``rasterio.Env`` around the call): agrivlm passes nothing of its own.

A remote folder cannot be listed (HTTP has no directory listing), so remote inputs are files, one per date, or
a STAC catalogue of them (:mod:`agrivlm.geo.stac`). A remote file has no modification time: its fingerprint
(``agrivlm infer``'s journal) is its address, its HTTP ``ETag`` / ``Last-Modified`` / size where the server
gives them, and its header (grid, bands, data type), so a changed file under the same address is caught when
any of these change.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath

#: URL schemes and the GDAL virtual file system that reads them.
SCHEMES: dict[str, str] = {
    "http": "/vsicurl/",
    "https": "/vsicurl/",
    "ftp": "/vsicurl/",
    "s3": "/vsis3/",
    "gs": "/vsigs/",
    "az": "/vsiaz/",
    "azure": "/vsiaz/",
}

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://(.+)$")
#: GDAL virtual file systems that read over a network (``/vsizip/`` of a local file is local: not here).
_VSI_REMOTE = ("/vsicurl/", "/vsis3/", "/vsigs/", "/vsiaz/", "/vsiadls/", "/vsioss/", "/vsiswift/",
               "/vsiwebhdfs/", "/vsihdfs/")


def is_remote(text: str | os.PathLike[str]) -> bool:
    """Whether ``text`` is an address GDAL reads over a network (a URL of :data:`SCHEMES` or a ``/vsi…/`` path)."""
    if isinstance(text, RemotePath):
        return True
    if not isinstance(text, str):
        return False
    m = _URL.match(text)
    if m is not None:
        return m.group(1).lower() in SCHEMES
    return text.startswith(_VSI_REMOTE) or (text.startswith("/vsi") and "://" in text)


def gdal_path(address: str) -> str:
    """The ``/vsi…/`` path GDAL opens for a URL (a ``/vsi…/`` path as given).

    ``https://host/a.tif`` → ``/vsicurl/https://host/a.tif``; ``s3://bucket/key.tif`` → ``/vsis3/bucket/key.tif``.

    Raises:
        ValueError: a URL scheme GDAL has no virtual file system for.
    """
    if address.startswith("/vsi"):
        return address
    m = _URL.match(address)
    if m is None:
        raise ValueError(f"{address}: not a URL (scheme://…) nor a GDAL /vsi…/ path")
    scheme = m.group(1).lower()
    if scheme not in SCHEMES:
        raise ValueError(f"{address}: GDAL reads no {scheme}:// URLs; use one of "
                         f"{', '.join(s + '://' for s in SCHEMES)} or a /vsi…/ path")
    vsi = SCHEMES[scheme]
    return vsi + (address if vsi == "/vsicurl/" else m.group(2))


def http_url(address: str) -> str | None:
    """The ``http(s)://`` URL behind an address, or None for other schemes (s3, gs, …)."""
    text = address[len("/vsicurl/"):] if address.startswith("/vsicurl/") else address
    text = re.sub(r"^/vsicurl\?.*url=", "", text)
    return text if re.match(r"^https?://", text, re.IGNORECASE) else None


@dataclass(frozen=True, eq=False)
class RemotePath:
    """A raster read over a network: the address as given, GDAL's path, and a file name (dates come from it).

    ``os.fspath`` gives the GDAL path (``rasterio.open`` opens it), ``str`` the address as the user wrote it
    (messages, JSON outputs). Equal when the GDAL paths are.
    """

    address: str

    def __post_init__(self) -> None:
        self.gdal  # noqa: B018 — refuses an unknown scheme here, not at the first read

    @cached_property
    def gdal(self) -> str:
        """The ``/vsi…/`` path GDAL opens (computed once: it keys the stack's per-read handle lookups)."""
        return gdal_path(self.address)

    def __fspath__(self) -> str:
        return self.gdal

    def __str__(self) -> str:
        return self.address

    def __repr__(self) -> str:
        return f"RemotePath({self.address!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other.gdal == self.gdal

    def __hash__(self) -> int:
        return hash(self.gdal)

    def __lt__(self, other: RemotePath | Path) -> bool:
        return str(self) < str(other)

    @property
    def _pure(self) -> PurePosixPath:
        return PurePosixPath(self.address.split("?", 1)[0].split("#", 1)[0])

    @property
    def name(self) -> str:
        """The file name (the last path segment, without a query string)."""
        return self._pure.name

    @property
    def stem(self) -> str:
        """The file name without its suffix."""
        return self._pure.stem

    @property
    def suffix(self) -> str:
        """The file name's suffix (``.tif``)."""
        return self._pure.suffix

    def resolve(self) -> RemotePath:
        """Itself: a remote address is already absolute (the counterpart of ``Path.resolve``)."""
        return self






def remote_stamp(path: RemotePath, timeout: float = 30.0) -> list[str | int | None]:
    """What the server says about a remote file: ``[size, ETag, Last-Modified]`` (None where not given).

    An HTTP ``HEAD`` for http(s) URLs; other schemes (and a server that refuses ``HEAD``) give Nones, and
    the file's header in the fingerprint stands for it (:mod:`agrivlm.infer.fingerprint`).
    """
    import urllib.error
    import urllib.request

    url = http_url(path.address)
    if url is None:
        return [None, None, None]
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as resp:
            size = resp.headers.get("Content-Length")
            return [int(size) if size and size.isdigit() else None, resp.headers.get("ETag"),
                    resp.headers.get("Last-Modified")]
    except (urllib.error.URLError, OSError, ValueError):
        return [None, None, None]


