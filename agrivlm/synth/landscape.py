"""The parcel tessellation of a synthetic scene: roads, blocks, fields, margins; polygons in metres.

1. **Blocks.** The scene (plus a border, so edges look like any other place) is cut recursively across
   its longer side, at 35–65 % and at the region's orientation ± its jitter, until a block is under a
   log-normal draw around ``block_median_ha``. The cuts are roads (``road_width_m``).
2. **Land use.** Each block is fields, grassland, forest, built-up or water (``block_use`` shares).
   Forest and water blocks are one parcel with a wobbly outline; built-up blocks are cut into small lots.
3. **Fields.** A field block is cut recursively: each piece draws a target area (log-normal,
   ``field_median_ha``, ``field_sigma``) and a target length/width ratio around ``field_aspect``; a piece
   longer than its target ratio is cut across, otherwise along, at the fraction that leaves about the
   target area; cuts tilt by a few degrees (trapezoids, not only rectangles). With ``l_shape_share`` a
   final pair is re-cut so one field takes a corner of its neighbour (L-shapes).
4. **Margins.** Each parcel is shrunk by half a margin width (``margin_width_m``): what remains between
   parcels is a hedge (woody) or a grass strip/track, and roads between blocks are built-up.

Coordinates are metres in a local frame with ``(0, 0)`` at the scene's upper-left corner and ``y``
growing *down* (rows); :mod:`agrivlm.synth.scene` maps them to the UTM grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import shapely
from shapely import affinity
from shapely.geometry import MultiPolygon, Polygon, box

from agrivlm.synth.regions import Region

_HA = 10_000.0


@dataclass
class Parcel:
    """One parcel of the tessellation (metres, local frame)."""

    geometry: Polygon
    #: Land use: ``fields``, ``grassland``, ``forest``, ``built-up``, ``water``.
    use: str
    block: int


def _extent_along(poly: Polygon, angle: float) -> tuple[float, float, float, float]:
    """``(minx, miny, maxx, maxy)`` of ``poly`` in a frame rotated by ``-angle`` degrees about the origin."""
    rot = affinity.rotate(poly, -angle, origin=(0, 0))
    return rot.bounds


def _cut(poly: Polygon, angle: float, frac: float, tilt: float) -> list[Polygon]:
    """Cut ``poly`` by a line across its extent along direction ``angle`` (degrees) at ``frac`` of it.

    The line is perpendicular to ``angle`` and tilted by ``tilt`` degrees. Returns the pieces (polygons
    only, slivers under 1 m² dropped).
    """
    rot = affinity.rotate(poly, -angle, origin=(0, 0))
    minx, miny, maxx, maxy = rot.bounds
    x = minx + frac * (maxx - minx)
    cy = 0.5 * (miny + maxy)
    h = (maxy - miny) + (maxx - minx) + 10.0
    slope = math.tan(math.radians(tilt))
    left = Polygon([(minx - h, cy - h), (x - slope * h, cy - h), (x + slope * h, cy + h), (minx - h, cy + h)])
    pieces = []
    for part in (rot.intersection(left), rot.difference(left)):
        for g in getattr(part, "geoms", [part]):
            if isinstance(g, Polygon) and g.area > 1.0:
                pieces.append(affinity.rotate(g, angle, origin=(0, 0)))
    return pieces


def _dims(poly: Polygon, angle: float) -> tuple[float, float]:
    """Length along ``angle`` and along ``angle + 90``."""
    minx, miny, maxx, maxy = _extent_along(poly, angle)
    return maxx - minx, maxy - miny


def _lognormal(rng: np.random.Generator, median: float, sigma: float) -> float:
    return float(median * math.exp(rng.normal(0.0, sigma)))


def _blocks(extent: Polygon, region: Region, rng: np.random.Generator) -> list[tuple[Polygon, float]]:
    """Road blocks with their orientation (degrees)."""
    todo = [(extent, region.orientation_deg + float(rng.normal(0, region.orientation_jitter_deg / 2)))]
    out = []
    while todo:
        poly, angle = todo.pop()
        target = _lognormal(rng, region.block_median_ha, 0.5) * _HA
        if poly.area <= target:
            out.append((poly, angle))
            continue
        along, across = _dims(poly, angle)
        cut_angle = angle if along >= across else angle + 90.0
        frac = float(rng.uniform(0.35, 0.65))
        tilt = float(rng.normal(0, region.orientation_jitter_deg / 6))
        pieces = _cut(poly, cut_angle, frac, tilt)
        if len(pieces) < 2:
            out.append((poly, angle))
            continue
        for p in pieces:
            todo.append((p, angle + float(rng.normal(0, region.orientation_jitter_deg / 3))))
    return out


@dataclass(frozen=True)
class Tiling:
    """How a block is cut: median piece area (ha), its log-sd, median length/width ratio, L-shape share."""

    median_ha: float
    sigma: float
    aspect: float
    l_shape_share: float

    @classmethod
    def fields_of(cls, region: Region) -> Tiling:
        """The region's field tiling."""
        return cls(region.field_median_ha, region.field_sigma, region.field_aspect, region.l_shape_share)


#: Built-up blocks are cut into lots of about 0.15 ha.
LOTS = Tiling(median_ha=0.15, sigma=0.5, aspect=1.5, l_shape_share=0.0)


def _fields(block: Polygon, angle: float, region: Tiling, rng: np.random.Generator) -> list[Polygon]:
    """Fields tiling one block (see the module docstring, step 3)."""
    out: list[Polygon] = []
    todo = [block]
    while todo:
        poly = todo.pop()
        target = _lognormal(rng, region.median_ha, region.sigma) * _HA
        target = max(target, 0.15 * _HA)
        if poly.area <= 1.4 * target:
            out.append(poly)
            continue
        aspect = max(1.0, _lognormal(rng, region.aspect, 0.35))
        along, across = _dims(poly, angle)
        long_angle, long_len, short_len = (angle, along, across) if along >= across else (angle + 90, across, along)
        ratio = long_len / max(short_len, 1.0)
        cut_angle = long_angle if ratio > aspect else long_angle + 90.0
        frac = float(np.clip(target / poly.area + rng.normal(0, 0.05), 0.2, 0.8))
        if rng.uniform() < 0.5:
            frac = 1.0 - frac
        tilt = float(rng.normal(0, 3.0))
        pieces = _cut(poly, cut_angle, frac, tilt)
        if len(pieces) != 2:
            out.append(poly)
            continue
        a, b = pieces
        if poly.area <= 3.0 * target and rng.uniform() < region.l_shape_share:
            # L-shape: cut b the other way and give a piece of it to a
            sub = _cut(b, cut_angle + 90.0, float(rng.uniform(0.3, 0.6)), 0.0)
            if len(sub) == 2:
                for i in (0, 1):
                    merged = shapely.union(a, sub[i])
                    if isinstance(merged, Polygon) and merged.is_valid:
                        out.extend([merged, sub[1 - i]])
                        break
                else:
                    out.extend([a, b])
                continue
        todo.extend([a, b])
    return out


def _wobble(poly: Polygon, rng: np.random.Generator, amount: float) -> Polygon:
    """A rounder, irregular outline (forest edges, ponds) inside the block."""
    inner = poly.buffer(-amount)
    if inner.is_empty:
        return poly
    pts = np.asarray(inner.exterior.coords)[:-1]
    if len(pts) > 64:
        pts = pts[np.linspace(0, len(pts) - 1, 64).astype(int)]
    c = np.asarray(inner.centroid.coords[0])
    scale = 1.0 + rng.normal(0, 0.08, size=(len(pts), 1))
    new = Polygon(c + (pts - c) * scale).buffer(amount * 0.5).intersection(poly)
    if isinstance(new, MultiPolygon):
        new = max(new.geoms, key=lambda g: g.area)
    return new if isinstance(new, Polygon) and new.area > 0.3 * poly.area else poly


def tessellate(width_m: float, height_m: float, region: Region, rng: np.random.Generator,
               border_m: float = 300.0) -> tuple[list[Parcel], list[Polygon]]:
    """Parcels over a ``width_m`` × ``height_m`` scene (local frame, y down), each shrunk by its margin.

    Returns the parcels that overlap the scene (unclipped: a field cut by the scene edge stays whole, as a
    user's parcel layer would hold it) and the road blocks (what is not a block is road).
    """
    extent = box(-border_m, -border_m, width_m + border_m, height_m + border_m)
    scene = box(0, 0, width_m, height_m)
    uses = list(region.block_use)
    probs = np.asarray([region.block_use[u] for u in uses])
    probs = probs / probs.sum()
    parcels: list[Parcel] = []
    blocks: list[Polygon] = []
    for bi, (block, angle) in enumerate(_blocks(extent, region, rng)):
        block = block.buffer(-region.road_width_m / 2, join_style="mitre")
        if block.is_empty or not isinstance(block, Polygon):
            continue
        blocks.append(block)
        use = str(rng.choice(uses, p=probs))
        if use in ("forest", "water"):
            pieces = [_wobble(block, rng, 15.0)]
        elif use == "built-up":
            pieces = _fields(block, angle, LOTS, rng)
        else:
            pieces = _fields(block, angle, Tiling.fields_of(region), rng)
        for p in pieces:
            margin = float(rng.uniform(*region.margin_width_m)) if use in ("fields", "grassland") else 1.0
            shrunk = p.buffer(-margin / 2, join_style="mitre")
            if isinstance(shrunk, MultiPolygon):
                shrunk = max(shrunk.geoms, key=lambda g: g.area)
            if not isinstance(shrunk, Polygon) or shrunk.area < 200.0 or not shrunk.intersects(scene):
                continue
            shrunk = shapely.set_precision(shrunk, 0.01)
            if isinstance(shrunk, Polygon) and shrunk.is_valid and not shrunk.is_empty:
                parcels.append(Parcel(geometry=shrunk, use=use, block=bi))
    return parcels, blocks

