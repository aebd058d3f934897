"""The embedded sample: a real Sentinel-2 NDVI stack over ~1 km² in Slovenia (see its PROVENANCE.md)."""

from __future__ import annotations

from pathlib import Path

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
