"""agrivlm: multitemporal satellite GeoTIFFs in, field boundaries and growth stages out."""

__version__ = "0.1.0"
