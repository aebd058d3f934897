"""Where an answer's positions point: normalized chip positions (u, v) and times t → lon/lat and dates.

This is the one place the explorer turns the model's positions into map coordinates, and it is where the
model and the LAPE codec plug in:

* :func:`decode_answer` turns an answer's text (``"<WIDTH-012><HEIGHT-087>…<TEMP-030>"``) into
  :class:`ChipPositions`. The token → value codec belongs to ``agrivlm.lape.tokens``; until that module
  lands, it raises :class:`PositionCodecUnavailable` and the page says so.
* :func:`ask_model` answers a question about a chip with a checkpoint (``--model``); until the model and
  ``agrivlm infer`` land, it raises :class:`ModelUnavailable` and the page says so.
* :func:`positions_table` (tested now, needs no codec) maps decoded values with the chip's own
  :class:`~agrivlm.geo.coords.GeoGrid` and :class:`~agrivlm.geo.coords.TimeAxis`; nothing here re-derives
  a coordinate conversion.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pandas as pd
from rasterio.windows import Window

from agrivlm.explore.errors import ExploreError
from agrivlm.geo.coords import GeoGrid, TimeAxis

#: Chip ids as written by ``agrivlm ingest`` / ``agrivlm.geo.chips.chip_id``.
CHIP_ID = re.compile(r"^r(?P<row>\d+)_c(?P<col>\d+)$")


class PositionCodecUnavailable(ExploreError):
    """Position tokens cannot be decoded yet: the LAPE codec (``agrivlm.lape.tokens``) is not installed."""


class ModelUnavailable(ExploreError):
    """Questions cannot be answered: no trained checkpoint or no model code to load it with."""


@dataclass(frozen=True)
class ChipPositions:
    """Decoded positions of one answer about one chip, all normalized.

    Attributes:
        chip_id: the chip the answer is about (``r{row:06d}_c{col:06d}``).
        u: ``(N,)`` column fractions of the chip's width, [0, 1] (LAPE ``WIDTH`` tokens).
        v: ``(N,)`` row fractions of the chip's height from its top as stored, [0, 1] (``HEIGHT`` tokens).
        t: ``(M,)`` fractions of the chip's date range, [0, 1] (``TEMP`` tokens).
        tokens: ``(N,)`` the text of each spatial point (e.g. ``"<WIDTH-012><HEIGHT-087>"``), for the table.

    """

    chip_id: str
    u: npt.NDArray[np.float64]
    v: npt.NDArray[np.float64]
    t: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    tokens: tuple[str, ...] = ()


def chip_grid(stack_grid: GeoGrid, chip_id: str, chip_size: int | tuple[int, int]) -> GeoGrid:
    """The grid of chip ``chip_id`` of a stack: its window's own transform (``GeoGrid.subgrid``).

    Chips at the raster's edge are snapped inside it by ``agrivlm ingest``, so a window that would cross
    the edge is an error, not a clipped chip.

    Raises:
        ExploreError: an id that is not ``r<row>_c<col>`` or a window outside the stack.

    """
    match = CHIP_ID.match(chip_id)
    if match is None:
        raise ExploreError(f"chip id {chip_id!r} is not of the form r<row>_c<col> (as agrivlm ingest writes)")
    ch, cw = (chip_size, chip_size) if isinstance(chip_size, int) else chip_size
    row, col = int(match["row"]), int(match["col"])
    if row + ch > stack_grid.height or col + cw > stack_grid.width:
        raise ExploreError(
            f"chip {chip_id} ({ch}x{cw} px) does not fit in the stack ({stack_grid.height}x{stack_grid.width} px); "
            "was it cut with another --chip-size?"
        )
    return stack_grid.subgrid(Window(col, row, cw, ch))


def positions_table(grid: GeoGrid, axis: TimeAxis, positions: ChipPositions) -> pd.DataFrame:
    """One row per decoded position, with where and when it points.

    Args:
        grid: the chip's grid (:func:`chip_grid`).
        axis: the chip's date range (``TimeAxis.from_dates(chip dates)``).
        positions: decoded, normalized positions.

    Returns:
        spatial rows (``kind="point"``): ``label`` (P1…), ``tokens``, ``u``, ``v``, ``col``, ``row`` (pixel
        edges of the chip), ``x``, ``y`` (the chip's CRS units), ``lon``, ``lat`` (degrees); then temporal rows
        (``kind="time"``): ``label`` (T1…), ``t``, ``date`` (ISO ``YYYY-MM-DD``). Columns that do not apply are
        empty.

    Raises:
        ExploreError: ``u``/``v`` of different lengths, or a value outside [0, 1].

    """
    u = np.asarray(positions.u, dtype=np.float64)
    v = np.asarray(positions.v, dtype=np.float64)
    t = np.asarray(positions.t, dtype=np.float64)
    if u.shape != v.shape:
        raise ExploreError(f"{u.size} WIDTH value(s) but {v.size} HEIGHT value(s): positions come in (u, v) pairs")
    for name, values in (("u", u), ("v", v), ("t", t)):
        if values.size and (not np.isfinite(values).all() or values.min() < 0.0 or values.max() > 1.0):
            raise ExploreError(f"a decoded {name} lies outside [0, 1]: {values.tolist()}")
    col, row = grid.norm_to_pixel(u, v)
    x, y = grid.norm_to_crs(u, v)
    lon, lat = grid.crs_to_lonlat(x, y)
    tokens = list(positions.tokens) if len(positions.tokens) == u.size else [""] * u.size
    points = pd.DataFrame({
        "kind": "point", "label": [f"P{i + 1}" for i in range(u.size)], "tokens": tokens,
        "u": u, "v": v, "col": col, "row": row, "x": x, "y": y, "lon": lon, "lat": lat,
    })
    dates = axis.from_norm(t).astype("datetime64[D]").astype(str) if t.size else np.array([], dtype=str)
    times = pd.DataFrame({"kind": "time", "label": [f"T{i + 1}" for i in range(t.size)], "t": t, "date": dates})
    return pd.concat([points, times], ignore_index=True) if t.size else points


def decode_answer(text: str, chip_id: str) -> ChipPositions:
    """Decode an answer's position tokens into normalized positions.

    INTEGRATION POINT (LAPE codec): implement with ``agrivlm.lape.tokens`` (token → value in [0, 1] for the
    WIDTH, HEIGHT and TEMP vocabularies). Until that module exists this raises, and the page shows the raw
    tokens with a note instead of a table.

    Raises:
        PositionCodecUnavailable: the codec has not landed.

    """
    try:
        import agrivlm.lape.tokens  # noqa: F401  (the codec's module; its API is wired in when it lands)
    except ImportError as exc:
        raise PositionCodecUnavailable(
            "position tokens cannot be decoded yet: the LAPE token codec (agrivlm.lape.tokens) is not part of "
            "this install"
        ) from exc
    raise PositionCodecUnavailable(
        "agrivlm.lape.tokens is installed but the explorer is not wired to it yet (agrivlm.explore.positions."
        "decode_answer)"
    )


def check_model(model: str | os.PathLike[str]) -> None:
    """Raise :class:`ModelUnavailable` with the reason when ``model`` cannot answer questions yet.

    INTEGRATION POINT (model): when the model lands, load (and cache) the checkpoint here.
    """
    path = os.fspath(model)
    if not os.path.exists(path):
        raise ModelUnavailable(f"{path}: no such checkpoint; pass --model with a trained agrivlm checkpoint folder")
    try:
        import agrivlm.infer  # noqa: F401  (the inference module; wired in when it lands)
    except ImportError as exc:
        raise ModelUnavailable(
            "the agrivlm model and `agrivlm infer` are not part of this install yet, so no checkpoint can be "
            "loaded"
        ) from exc
    raise ModelUnavailable(
        "agrivlm.infer is installed but the explorer is not wired to it yet (agrivlm.explore.positions.ask_model)"
    )


def ask_model(model: str | os.PathLike[str], chip_id: str, question: str) -> str:
    """Answer ``question`` about chip ``chip_id`` with the checkpoint ``model``; returns the answer's text.

    :func:`decode_answer` turns the answer's position tokens into positions for :func:`positions_table`.

    INTEGRATION POINT (model): implement with the model's loader and ``agrivlm infer`` (one chip, one
    question). Until they land :func:`check_model` raises, and the page says that asking needs a trained
    checkpoint.

    Raises:
        ModelUnavailable: no checkpoint at ``model``, or the model code has not landed.

    """
    check_model(model)
    raise AssertionError("unreachable until the model lands: check_model raises")  # pragma: no cover
