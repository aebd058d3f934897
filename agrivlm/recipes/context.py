"""What every task family sees: the chip (grid, frames, parcels clipped to it) and how records are made.

Positions come only from :class:`agrivlm.geo.coords.GeoGrid` (``crs_to_norm`` of clipped parcel
geometry in the chip's own grid, ``pixel_to_norm`` of pixel edges) and times only from
:meth:`agrivlm.geo.coords.TimeAxis.of_seasons` of the record's frame dates (its ``time_range``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import shapely
from rasterio.windows import Window

from agrivlm.geo.coords import GeoGrid, TimeAxis
from agrivlm.geo.dates import from_days
from agrivlm.recipes.schema import ChipRef, Record, StackRef
from agrivlm.recipes.schema import Window as WindowModel
from agrivlm.tasks.turns import Turn

#: Short family tags used in sample ids.
FAMILY_TAGS = {"field_boundaries": "fb", "growth_stages": "gs", "general_rs": "rs", "spatial_reasoning": "sr"}


def rng_for(seed: int, *keys: object) -> np.random.Generator:
    """A generator that depends only on ``seed`` and ``keys`` (never on iteration order)."""
    digest = hashlib.sha256(("|".join([str(seed), *map(str, keys)])).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    """One of ``options``, drawn with ``rng``."""
    return options[int(rng.integers(len(options)))]




def _drop_to(coords: npt.NDArray[np.float64], max_vertices: int) -> npt.NDArray[np.float64]:
    """Visvalingam–Whyatt: drop the vertex of least triangle area with its neighbours until ``max_vertices`` remain.

    ``coords``: ``(n, 2)`` an open ring. Returns ``(min(n, max_vertices), 2)``, vertices in their order.
    """
    keep = list(range(len(coords)))
    while len(keep) > max_vertices:
        pts = coords[keep]
        prev, nxt = np.roll(pts, 1, axis=0), np.roll(pts, -1, axis=0)
        area = 0.5 * np.abs((prev[:, 0] - pts[:, 0]) * (nxt[:, 1] - pts[:, 1])
                            - (nxt[:, 0] - pts[:, 0]) * (prev[:, 1] - pts[:, 1]))
        del keep[int(np.argmin(area))]
    return coords[keep]


def norm_ring(grid: GeoGrid, geom: shapely.Geometry, max_vertices: int, pixel_size: float) -> list[tuple[float, float]]:
    """The outline of a geometry's largest part as at most ``max_vertices`` normalized points.

    The ring is simplified in the CRS: Douglas–Peucker at a quarter pixel (drops collinear and sub-pixel
    vertices), then, while it has too many, Visvalingam–Whyatt (the vertex spanning the least area goes
    first), which keeps ``max_vertices`` and the most area; where that would make the ring cross itself,
    Douglas–Peucker with a growing tolerance instead. It is then ordered clockwise as seen on the image
    (``v`` grows downwards), starting at the top-most, then left-most vertex; it is not closed.
    """
    parts = list(getattr(geom, "geoms", [geom]))
    poly = max(parts, key=lambda g: g.area)
    ring = poly.exterior
    tol = 0.25 * pixel_size
    coords = np.asarray(ring.coords)[:-1]
    if len(coords) > max_vertices:
        simple = ring.simplify(tol, preserve_topology=False)
        coords = np.asarray(simple.coords)[:-1] if simple.length > 0 else coords
    if len(coords) > max_vertices:
        dropped = _drop_to(coords, max_vertices)
        if shapely.Polygon(dropped).is_valid:
            coords = dropped
    while len(coords) > max_vertices:
        simple = ring.simplify(tol, preserve_topology=False)
        coords = np.asarray(simple.coords)[:-1] if simple.length > 0 else coords[:0]
        tol *= 1.5
        if len(coords) < 3:  # over-simplified a sliver: fall back to its oriented rectangle
            coords = np.asarray(poly.minimum_rotated_rectangle.exterior.coords)[:-1]
            break
    u, v = grid.crs_to_norm(coords[:, 0], coords[:, 1])
    u, v = np.clip(u, 0.0, 1.0), np.clip(v, 0.0, 1.0)
    signed = float(np.sum(u * np.roll(v, -1) - np.roll(u, -1) * v))
    if signed < 0:  # counter-clockwise on the image: reverse
        u, v = u[::-1], v[::-1]
    start = int(np.lexsort((u, v))[0])
    u, v = np.roll(u, -start), np.roll(v, -start)
    return [(float(a), float(b)) for a, b in zip(u, v, strict=True)]


def select_frames(
    days: npt.NDArray[np.float64],
    clear: npt.NDArray[np.float64],
    min_clear: float,
    max_frames: int,
    min_frames: int,
    span: tuple[float, float] | None = None,
) -> list[int] | None:
    """Indices of the frames for one record: clear dates (in ``span`` = ``[start, end)`` days), evenly thinned.

    Returns ``None`` when fewer than ``min_frames`` dates qualify.
    """
    ok = clear >= min_clear
    if span is not None:
        ok &= (days >= span[0]) & (days < span[1])
    cand = np.flatnonzero(ok)
    if cand.size < min_frames:
        return None
    if cand.size > max_frames:
        cand = cand[np.unique(np.round(np.linspace(0, cand.size - 1, max_frames)).astype(int))]
    return [int(i) for i in cand]


@dataclass
class ParcelInChip:
    """A parcel clipped to one chip."""

    #: Position in the recipe's parcel frame.
    row: int
    field_id: str
    cls: str
    #: Clipped geometry in the stack's CRS.
    geom: shapely.Geometry
    #: Clipped area in pixels of the chip's grid.
    area_px: float
    #: ``(u1, v1, u2, v2)`` of the clipped geometry in the chip.
    box: tuple[float, float, float, float]
    #: True when the chip's edge cuts the parcel (part of it lies outside the chip).
    cut: bool

    @property
    def center(self) -> tuple[float, float]:
        """Centre ``(u, v)`` of the box."""
        return (0.5 * (self.box[0] + self.box[2]), 0.5 * (self.box[1] + self.box[3]))


@dataclass
class ChipContext:
    """One chip of the recipe's grid with everything the families ask about."""

    chip_id: str
    window: Window
    grid: GeoGrid
    split: str
    #: ``(T,)`` fraction of the chip's pixels clear on each date.
    clear: npt.NDArray[np.float64]
    #: Parcels overlapping the chip (any size), sorted top-to-bottom then left-to-right.
    parcels: list[ParcelInChip] = field(default_factory=list)
    #: Land-cover class codes ``(h, w)`` (−1 = none) and the code → word table.
    classes: npt.NDArray[np.int64] | None = None
    class_names: dict[int, str] = field(default_factory=dict)

    @property
    def pixel_area(self) -> float:
        """Area of one pixel in CRS units²."""
        t = self.grid.transform
        return abs(t.a * t.e - t.b * t.d)

    @property
    def pixel_size(self) -> float:
        """Side of one pixel in CRS units (geometric mean for non-square pixels)."""
        return float(np.sqrt(self.pixel_area))


@dataclass
class RecordFactory:
    """Builds records for one recipe: stack reference, chip reference, ids."""

    recipe: str
    seed: int
    data_spec: str
    mask_spec: str | None
    #: Per stack time step: data file name(s) and mask file name.
    step_files: list[str]
    step_masks: list[str | None]
    times: npt.NDArray[np.datetime64]
    crs: str
    band_names: list[str]
    #: A STAC stack's assets, its masks' assets and mask values (:class:`~agrivlm.recipes.schema.StackRef`).
    assets: list[str] | None = None
    mask_assets: list[str] | None = None
    mask_values: list[int] | None = None
    #: ``MM-DD`` the yearly season windows of the records' time axes start on (``phenology.season_start``).
    season_start: str = "01-01"

    def time_axis(self, frames: Sequence[int]) -> TimeAxis:
        """A record's time axis (its ``time_range``): the season windows its frames fall in, t ∈ [0, 1]."""
        return TimeAxis.of_seasons(self.times[list(frames)], self.season_start)

    def norm_time(self, frames: Sequence[int], when: np.datetime64 | float) -> float | None:
        """``t`` of a time on the frames' axis (``when`` as datetime64 or float days); ``None`` outside [0, 1]."""
        stamp = from_days(float(when)) if isinstance(when, float | np.floating) else np.asarray(when, "datetime64[s]")
        return self.norm_times(frames, [stamp])[0]

    def norm_times(self, frames: Sequence[int], when: npt.ArrayLike) -> list[float | None]:
        """:meth:`norm_time` of many times, the frames' axis built once (a season's acquisitions for a timeline)."""
        ts = self.time_axis(frames).to_norm(np.asarray(when, "datetime64[s]"))
        return [float(t) if 0.0 <= t <= 1.0 else None for t in ts]

    def _time_range(self, frames: Sequence[int]) -> tuple[str, str]:
        axis = self.time_axis(frames)
        return (str(axis.start.astype("datetime64[s]")), str(axis.end.astype("datetime64[s]")))

    def record(
        self,
        chip: ChipContext,
        frames: Sequence[int],
        family: str,
        task: str,
        subject: str,
        turns: Sequence[Turn],
        meta: dict[str, Any] | None = None,
    ) -> Record:
        """A validated record; ``subject`` makes the id unique within (family, chip, task)."""
        frames = list(frames)
        has_masks = any(m is not None for m in self.step_masks)
        return Record(
            sample_id=f"{FAMILY_TAGS[family]}:{chip.chip_id}:{task}:{subject}",
            recipe=self.recipe,
            family=family,  # type: ignore[arg-type]
            task=task,
            split=chip.split,  # type: ignore[arg-type]
            stack=StackRef(
                data=self.data_spec,
                masks=self.mask_spec,
                frame_files=[self.step_files[i] for i in frames],
                frame_mask_files=[self.step_masks[i] for i in frames] if has_masks else [],
                bands=self.band_names,
                assets=self.assets,
                mask_assets=self.mask_assets,
                mask_values=self.mask_values,
            ),
            chip=ChipRef(
                chip_id=chip.chip_id,
                window=WindowModel(
                    col_off=int(chip.window.col_off), row_off=int(chip.window.row_off),
                    width=int(chip.window.width), height=int(chip.window.height),
                ),
                transform=tuple(float(x) for x in list(chip.grid.transform)[:6]),  # type: ignore[arg-type]
                crs=self.crs,
                frame_dates=[str(self.times[i]) for i in frames],
                frame_indices=frames,
                time_range=self._time_range(frames),
            ),
            conversation=list(turns),
            meta=meta or {},
        )


def user(text: str, **positions: Any) -> Turn:
    """A user turn."""
    return Turn(role="user", text=text, **positions)


def assistant(text: str, **positions: Any) -> Turn:
    """An assistant turn."""
    return Turn(role="assistant", text=text, **positions)


def box_list_text(labels: Sequence[str], start: int = 0) -> str:
    """``"grassland {box:0}, forest {box:1} and shrubland {box:2}"`` for the given labels."""
    items = [f"{label} {{box:{start + i}}}" if label else f"{{box:{start + i}}}" for i, label in enumerate(labels)]
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]
