"""A local HTTP server on 127.0.0.1 that serves a folder with range requests, as a COG store does.

GDAL's ``/vsicurl/`` reads a remote GeoTIFF by HTTP ``Range`` requests (the header, then the blocks a read
needs); Python's ``http.server`` ignores ``Range``, so this handler answers it (``206 Partial Content``) and
records every request (path, range, bytes sent) in a JSON-lines log, so a test can tell that a window read
fetched part of a file. It runs in its own process: ``rasterio.open`` holds the GIL while GDAL waits for the
answer, so a server thread of the test's process would never answer (a deadlock, seen).
"""

from __future__ import annotations

import http.server
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Served:
    """The server's address and what it sent."""

    url: str
    root: Path
    log: Path

    @property
    def requests(self) -> list[tuple[str, str | None, int]]:
        """``(path, Range header, bytes sent)`` of every request so far."""
        if not self.log.is_file():
            return []
        return [tuple(json.loads(line)) for line in self.log.read_text().splitlines() if line]  # type: ignore[misc]

    def clear(self) -> None:
        """Forget the requests so far."""
        self.log.write_text("")

    def bytes_sent(self, name: str) -> int:
        """Bytes sent of the file ``name`` (a path under the root, ``/``-separated)."""
        return sum(n for path, _, n in self.requests if path.lstrip("/") == name)


def _handler(root: Path, log: Path) -> type[http.server.SimpleHTTPRequestHandler]:
    class RangeHandler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

        def send_head(self) -> Any:  # noqa: ANN401 — the base class's file-like or None
            path = self.translate_path(self.path)
            if not os.path.isfile(path):
                self.send_error(404, "not found")
                return None
            size = os.path.getsize(path)
            start, end = 0, size - 1
            rng = self.headers.get("Range")
            m = re.match(r"bytes=(\d+)-(\d*)$", rng or "")
            if m:
                start = int(m.group(1))
                end = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            else:
                self.send_response(200)
            with open(path, "rb") as f:
                f.seek(start)
                body = f.read(end - start + 1)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{os.stat(path).st_mtime_ns:x}-{size:x}"')
            self.end_headers()
            sent = 0 if self.command == "HEAD" else len(body)
            with open(log, "a") as f:
                f.write(json.dumps([self.path.split("?", 1)[0], rng, sent]) + "\n")
            return io.BytesIO(body)

        def log_message(self, *args: Any) -> None:
            pass

    return RangeHandler


@contextmanager
def serve(root: Path) -> Iterator[Served]:
    """Serve ``root`` on ``http://127.0.0.1:<free port>`` from a child process until the block ends."""
    log = Path(tempfile.mkdtemp()) / "requests.jsonl"
    proc = subprocess.Popen([sys.executable, __file__, str(root), str(log)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield Served(f"http://127.0.0.1:{port}", root, log)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main(root: str, log: str) -> None:
    """The server process: print the port, serve until terminated."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(Path(root), Path(log)))
    print(server.server_address[1], flush=True)
    server.serve_forever()


def stac_item(item_id: str, when: str, assets: dict[str, str], bbox: list[float] | None = None,
              epsg: int = 32633) -> dict[str, Any]:
    """A STAC Item (1.0.0) with one GeoTIFF data asset per ``{key: href}``."""
    bbox = bbox or [14.5, 45.8, 14.6, 45.9]
    x0, y0, x1, y1 = bbox
    return {
        "type": "Feature", "stac_version": "1.0.0", "id": item_id,
        "stac_extensions": ["https://stac-extensions.github.io/projection/v1.1.0/schema.json"],
        "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
        "bbox": bbox, "properties": {"datetime": when, "proj:epsg": epsg},
        "links": [],
        "assets": {k: {"href": href, "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                       "roles": ["data"]} for k, href in assets.items()},
    }


def item_collection(items: list[dict[str, Any]]) -> dict[str, Any]:
    """A STAC ItemCollection (what pystac-client saves for a search)."""
    return {"type": "FeatureCollection", "features": items}


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])


def dated_catalogue(url: str, root: Path, data: str, masks: str | None, path: Path, mask_asset: str = "clouds",
                    limit: int | None = None) -> Path:
    """An ItemCollection of the dated files ``root/data/*.tif`` on the server at ``url``, one item per file.

    Each item's ``ndvi`` asset is the file; with ``masks``, its ``mask_asset`` is ``root/masks/<name>`` where the
    name has ``CLM`` for ``NDVI`` (the sample's and the recipe scenes' naming). Dates come from the file names.
    """
    from agrivlm.geo.dates import date_from_name

    feats = []
    for f in sorted((root / data).glob("*.tif"))[:limit]:
        when = date_from_name(f.name)
        assert when is not None, f
        assets = {"ndvi": f"{url}/{data}/{f.name}"}
        if masks is not None:
            mask = f.name.replace("NDVI", "CLM")
            assert (root / masks / mask).is_file(), mask
            assets[mask_asset] = f"{url}/{masks}/{mask}"
        feats.append(stac_item(f.stem, f"{when:%Y-%m-%dT%H:%M:%S}Z", assets))
    path.write_text(json.dumps(item_collection(feats)))
    return path
