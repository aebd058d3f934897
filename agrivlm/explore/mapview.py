"""The web map: field polygons and the chip grid as GeoJSON in lon/lat, the view, and the deck.gl spec.

The map is a pydeck ``Deck`` drawn by Streamlit's bundled deck.gl, with **no basemap by default** (no
tile can be fetched offline): the stack overlay, the polygons and the grid need nothing from the network.
A basemap is an option (:func:`basemap_style`). Field polygons are drawn twice: an outline layer (what
you see) and an invisible, pickable fill layer (what a click hits), so Streamlit's selection colouring
never paints over the overlay.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pydeck as pdk
from rasterio.crs import CRS

from agrivlm.explore.errors import ExploreError
from agrivlm.explore.overlay import Overlay
from agrivlm.geo.chips import chip_id, chip_windows
from agrivlm.geo.coords import WGS84, GeoGrid

#: Outline colours (RGBA): true fields cyan, predicted fields magenta, the selected field white, chip grid
#: dark grey, decoded answer positions orange. None of them occurs in the NDVI colour map.
TRUTH_RGBA: tuple[int, int, int, int] = (0, 229, 255, 255)
PREDICTED_RGBA: tuple[int, int, int, int] = (255, 0, 255, 255)
SELECTED_RGBA: tuple[int, int, int, int] = (255, 255, 255, 255)
GRID_RGBA: tuple[int, int, int, int] = (30, 30, 30, 190)
POSITION_RGBA: tuple[int, int, int, int] = (255, 140, 0, 255)

#: deck.gl layer ids; a click on the map reports the layer id with the picked feature.
PICK_LAYERS = {"true": "true-fields", "predicted": "predicted-fields"}

#: Map size in CSS pixels (height fixed; the width is the page's, this is the hint used to fit the view).
MAP_HEIGHT_PX, MAP_WIDTH_HINT_PX = 560, 720

#: Decimal places of degrees kept in GeoJSON (1e-7° ≈ 1 cm).
LONLAT_DECIMALS = 7


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float | np.floating):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    return str(value)


def to_geojson(frame: gpd.GeoDataFrame, properties: Sequence[str]) -> dict[str, Any]:
    """A GeoJSON FeatureCollection in lon/lat (EPSG:4326) with the chosen JSON-safe ``properties``.

    ``frame`` may be in any CRS (it is reprojected); coordinates are rounded to :data:`LONLAT_DECIMALS`.
    """
    if frame.crs is None:
        raise ExploreError("a layer without a CRS cannot be drawn; set its CRS first")
    lonlat = frame.to_crs(WGS84.to_wkt()) if CRS.from_user_input(frame.crs) != WGS84 else frame
    features = []
    for (_, row), geom in zip(lonlat.iterrows(), lonlat.geometry, strict=True):
        if geom is None or geom.is_empty:
            continue
        shape = json.loads(json.dumps(geom.__geo_interface__), parse_float=lambda s: round(float(s), LONLAT_DECIMALS))
        props = {name: _json_value(row[name]) for name in properties if name in lonlat.columns}
        features.append({"type": "Feature", "properties": props, "geometry": shape})
    return {"type": "FeatureCollection", "features": features}


def chip_grid_frame(grid: GeoGrid, chip_size: int, stride: int | None = None) -> gpd.GeoDataFrame:
    """The chip grid of a stack (same windows and ids as ``agrivlm ingest``), footprints in the stack's CRS.

    Columns: ``chip_id`` (``r{row:06d}_c{col:06d}``), ``row_off``, ``col_off``, ``size`` (px), geometry.
    """
    windows = chip_windows(grid.height, grid.width, chip_size, stride)
    return gpd.GeoDataFrame(
        {
            "chip_id": [chip_id(w) for w in windows],
            "row_off": [int(w.row_off) for w in windows],
            "col_off": [int(w.col_off) for w in windows],
            "size": [int(w.width) for w in windows],
        },
        geometry=[grid.subgrid(w).footprint() for w in windows],
        crs=grid.crs.to_wkt(),
    )


def fit_view(bounds: Sequence[float], width_px: int = MAP_WIDTH_HINT_PX, height_px: int = MAP_HEIGHT_PX,
             padding: float = 0.05) -> dict[str, float]:
    """The web-mercator view ``{longitude, latitude, zoom}`` that fits lon/lat ``bounds`` into a map.

    ``bounds`` are ``(west, south, east, north)`` in degrees; the map is ``width_px × height_px`` with
    ``padding`` (a fraction of each side) to spare.

    deck.gl's world is 512 px wide at zoom 0, so a span of ``Δx`` mercator units (of a [0, 1] world) fills
    ``Δx · 512 · 2^zoom`` pixels.
    """
    west, south, east, north = (float(b) for b in bounds)
    x0, y0 = lonlat_to_mercator(west, north)
    x1, y1 = lonlat_to_mercator(east, south)
    usable_w, usable_h = width_px * (1 - 2 * padding), height_px * (1 - 2 * padding)
    span_x, span_y = max(abs(x1 - x0), 1e-12), max(abs(y1 - y0), 1e-12)
    zoom = math.log2(min(usable_w / (span_x * 512), usable_h / (span_y * 512)))
    lon, lat = mercator_to_lonlat((x0 + x1) / 2, (y0 + y1) / 2)
    return {"longitude": lon, "latitude": lat, "zoom": min(max(zoom, 0.0), 22.0)}


def lonlat_to_mercator(lon: float, lat: float) -> tuple[float, float]:
    """Lon/lat (degrees) → web-mercator ``(x, y)`` in [0, 1] of the world, y down from the north."""
    x = (lon + 180.0) / 360.0
    y = 0.5 - math.log(math.tan(math.pi / 4 + math.radians(lat) / 2)) / (2 * math.pi)
    return x, y


def mercator_to_lonlat(x: float, y: float) -> tuple[float, float]:
    """Inverse of :func:`lonlat_to_mercator`."""
    lon = x * 360.0 - 180.0
    lat = math.degrees(2 * math.atan(math.exp((0.5 - y) * 2 * math.pi)) - math.pi / 2)
    return lon, lat


def lonlat_to_screen(lon: float, lat: float, view: dict[str, float], width_px: float, height_px: float
                     ) -> tuple[float, float]:
    """Where lon/lat lands on a ``width × height`` map showing ``view`` (CSS px from its top-left corner)."""
    scale = 512 * 2 ** view["zoom"]
    cx, cy = lonlat_to_mercator(view["longitude"], view["latitude"])
    x, y = lonlat_to_mercator(lon, lat)
    return width_px / 2 + (x - cx) * scale, height_px / 2 + (y - cy) * scale


def basemap_style(tiles: str | None) -> str | None:
    """The map style for an optional basemap.

    ``None`` (no basemap, the default), a style-JSON URL as given, or an XYZ raster template
    (``…/{z}/{x}/{y}.png``) wrapped in a one-layer style (as a ``data:`` URL).

    Raises:
        ExploreError: a value that is neither an http(s) URL nor a template.

    """
    if not tiles:
        return None
    if not tiles.startswith(("http://", "https://")):
        raise ExploreError(
            f"--tiles {tiles!r}: give an http(s) XYZ template with {{z}}/{{x}}/{{y}} or a style JSON URL"
        )
    if all(key in tiles for key in ("{z}", "{x}", "{y}")):
        style = {
            "version": 8,
            "sources": {"basemap": {"type": "raster", "tiles": [tiles], "tileSize": 256}},
            "layers": [{"id": "basemap", "type": "raster", "source": "basemap"}],
        }
        return "data:application/json;base64," + base64.b64encode(json.dumps(style).encode()).decode("ascii")
    return tiles


def _quoted(text: str) -> str:
    # pydeck turns plain string props into accessor expressions; quoted strings are passed as literals.
    return f"'{text}'"


def outline_layer(layer_id: str, geojson: dict[str, Any], rgba: Sequence[int], width_px: float) -> pdk.Layer:
    """Polygon outlines only (not pickable)."""
    return pdk.Layer(
        "GeoJsonLayer", data=geojson, id=layer_id, stroked=True, filled=False, pickable=False,
        get_line_color=list(rgba), line_width_units=_quoted("pixels"), get_line_width=width_px, line_width_min_pixels=1,
    )


def pick_layer(layer_id: str, geojson: dict[str, Any]) -> pdk.Layer:
    """Invisible filled polygons that catch clicks and hovers (opacity 0, still pickable)."""
    return pdk.Layer(
        "GeoJsonLayer", data=geojson, id=layer_id, stroked=False, filled=True, pickable=True, opacity=0.0,
        get_fill_color=[0, 0, 0, 255],
    )


def positions_layers(points: pd.DataFrame, boxes: dict[str, Any] | None = None,
                     prefix: str = "answer") -> list[pdk.Layer]:
    """Decoded answer positions (columns ``lon``, ``lat``, ``label``): numbered dots joined in order.

    ``boxes`` (GeoJSON in lon/lat: the answer's boxes and polygons) are drawn as outlines; layer ids start
    with ``prefix``.
    """
    layers = []
    if boxes is not None and boxes["features"]:
        layers.append(outline_layer(f"{prefix}-boxes", boxes, POSITION_RGBA, 2.0))
    if points.empty:
        return layers
    data = points[["lon", "lat", "label"]].to_dict("records")
    path = [[float(r["lon"]), float(r["lat"])] for r in data]
    return [
        *layers,
        pdk.Layer("PathLayer", data=[{"path": path}], id=f"{prefix}-path", get_path="path",
                  get_color=list(POSITION_RGBA), width_units=_quoted("pixels"), get_width=2, pickable=False),
        pdk.Layer("ScatterplotLayer", data=data, id=f"{prefix}-points", get_position=["lon", "lat"],
                  get_fill_color=list(POSITION_RGBA), radius_units=_quoted("pixels"), get_radius=6, pickable=False,
                  stroked=True, get_line_color=[0, 0, 0, 255], line_width_min_pixels=1),
    ]


def build_deck(
    view: dict[str, float],
    overlay: Overlay | None = None,
    true_fields: dict[str, Any] | None = None,
    predicted_fields: dict[str, Any] | None = None,
    chip_grid: dict[str, Any] | None = None,
    selected: dict[str, Any] | None = None,
    extra_layers: Iterable[pdk.Layer] = (),
    tiles: str | None = None,
) -> pdk.Deck:
    """The map: overlay, chip grid, true and predicted outlines, the selected field, answer positions.

    Hovering a field shows its id; a click selects it (Streamlit reports the picked feature of the layer
    :data:`PICK_LAYERS`).
    """
    layers: list[pdk.Layer] = []
    if overlay is not None:
        layers.append(pdk.Layer(
            "BitmapLayer", id="stack-overlay", image=_quoted(overlay.data_url()), bounds=list(overlay.bounds),
            _image_coordinate_system=_quoted("lnglat"), pickable=False,
            texture_parameters={"minFilter": "nearest", "magFilter": "nearest"},
        ))
    if chip_grid is not None:
        layers.append(outline_layer("chip-grid", chip_grid, GRID_RGBA, 1.0))
    for kind, data, rgba in (("true", true_fields, TRUTH_RGBA), ("predicted", predicted_fields, PREDICTED_RGBA)):
        if data is not None:
            layers.append(outline_layer(f"{kind}-outline", data, rgba, 2.0))
    # Pickable layers go last, so a hover or click finds them above the outlines.
    for kind, data in (("true", true_fields), ("predicted", predicted_fields)):
        if data is not None:
            layers.append(pick_layer(PICK_LAYERS[kind], data))
    if selected is not None:
        layers.append(outline_layer("selected-field", selected, SELECTED_RGBA, 4.0))
    layers.extend(extra_layers)
    style = basemap_style(tiles)
    # map_provider=None without a map_style is pydeck's "no basemap" (Streamlit then fetches no tiles).
    basemap: dict[str, Any] = {"map_provider": None} if style is None else {"map_provider": None, "map_style": style}
    return pdk.Deck(
        layers=layers,
        initial_view_state=pdk.ViewState(**view, pitch=0, bearing=0),
        tooltip={"text": "{kind} field {field_id}\n{label}"},
        **basemap,
    )
