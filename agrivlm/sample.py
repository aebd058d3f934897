"""The embedded sample: a real Sentinel-2 NDVI stack over ~1 km² in Slovenia (see its PROVENANCE.md)."""

from __future__ import annotations

import os
from pathlib import Path

from agrivlm.errors import ConfigError
from agrivlm.geo.remote import is_remote

#: Root of the embedded sample (68 NDVI dates, cloud masks, 88 parcels), shipped inside the package.
SAMPLE_ROOT = Path(__file__).parent / "sample_data" / "slovenia_s2_ndvi"


def sample_ndvi_dir() -> Path:
    """Folder of the sample's NDVI GeoTIFFs, one file per acquisition (float32, nodata −9999)."""
    return SAMPLE_ROOT / "ndvi"


def sample_cloud_mask_dir() -> Path:
    """Folder of the sample's cloud masks, one per acquisition (uint8: 1 = cloud, 0 = clear, 255 = no data)."""
    return SAMPLE_ROOT / "cloud_mask"


def sample_parcels() -> Path:
    """The sample's 88 land-use parcels (GeoPackage, EPSG:32633)."""
    return SAMPLE_ROOT / "parcels.gpkg"


#: Prefix of specs that point into the embedded sample (``sample:ndvi`` → ``agrivlm/sample_data/…/ndvi``).
SAMPLE_SCHEME = "sample:"


def resolve_spec(spec: str, base_dir: str | os.PathLike[str] | None = None) -> str:
    """A source spec → a path or glob pattern usable by ``open_stack``/``geopandas``.

    ``sample:<rel>`` resolves inside the embedded sample; a relative path resolves against ``base_dir``
    (the recipe file's folder); ``~`` is expanded. Globs are returned as patterns.

    Raises:
        ConfigError: a ``sample:`` spec naming nothing in the sample.

    """
    if spec.startswith(SAMPLE_SCHEME):
        rel = spec[len(SAMPLE_SCHEME):].lstrip("/")
        path = SAMPLE_ROOT / rel
        if not path.exists():
            have = ", ".join(sorted(p.name for p in SAMPLE_ROOT.iterdir() if not p.name.startswith(".")))
            raise ConfigError(f"{spec}: not in the embedded sample ({SAMPLE_ROOT}); it has: {have}")
        return str(path)
    if is_remote(spec):  # a URL or /vsi…/ path: as written
        return spec
    path = Path(os.path.expanduser(spec))
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return str(path)


def portable_spec(spec: str, base_dir: str | os.PathLike[str] | None = None) -> str:
    """The spec written into records: ``sample:`` specs as they are, anything else as an absolute path."""
    if spec.startswith(SAMPLE_SCHEME) or is_remote(spec):
        return spec
    return str(Path(resolve_spec(spec, base_dir)).resolve())
