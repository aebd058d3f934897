"""Where an answer's positions point: normalized chip positions (u, v) and times t → lon/lat and dates.

This is the one place the explorer turns the model's positions into map coordinates, and where the model
and the LAPE codec plug in:

* :func:`decode_answer_text` turns an answer's text (``"<WIDTH-012><HEIGHT-087>…<TEMP-030>"``) into
  :class:`ChipPositions` with the LAPE codec (:func:`agrivlm.lape.tokens.parse_positions`: values at their
  bins' centres).
* :func:`ask_model` answers one question about one chip with a checkpoint (``--model``), through the
  inference core of ``agrivlm infer`` (the checkpoint's frames and bands, batched greedy generation, sub-bin
  decoding of the positions); :func:`check_model` says why a checkpoint cannot answer
  (:class:`ModelUnavailable`).
* :func:`positions_table` and :func:`shapes_frame` map decoded values with the chip's own
  :class:`~agrivlm.geo.coords.GeoGrid` and :class:`~agrivlm.geo.coords.TimeAxis`; nothing here re-derives
  a coordinate conversion.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import geopandas as gpd
import numpy as np
import numpy.typing as npt
import pandas as pd
from rasterio.windows import Window

from agrivlm.errors import AgriVLMError
from agrivlm.explore.errors import ExploreError
from agrivlm.geo.coords import GeoGrid, TimeAxis
from agrivlm.lape.tokens import Axis, LapeVocab, parse_positions

if TYPE_CHECKING:
    from agrivlm.geo.stack import Stack
    from agrivlm.infer.generate import Predictor

#: Chip ids as written by ``agrivlm ingest`` / ``agrivlm.geo.chips.chip_id``.
CHIP_ID = re.compile(r"^r(?P<row>\d+)_c(?P<col>\d+)$")


#: A TEMP position token (every one is a time of the answer, alone or in a segment).
_TEMP_TOKEN = re.compile(r"<TEMP-\d+>")


class ModelUnavailable(ExploreError):
    """Questions cannot be answered: no checkpoint at the path, or one that cannot be loaded."""


@dataclass(frozen=True)
class ChipPositions:
    """Decoded positions of one answer about one chip, all normalized.

    Attributes:
        chip_id: the chip the answer is about (``r{row:06d}_c{col:06d}``).
        u: ``(N,)`` column fractions of the chip's width, [0, 1] (LAPE ``WIDTH`` tokens).
        v: ``(N,)`` row fractions of the chip's height from its top as stored, [0, 1] (``HEIGHT`` tokens).
        t: ``(M,)`` fractions of the chip's date range, [0, 1] (``TEMP`` tokens).
        tokens: ``(N,)`` the text of each spatial point (e.g. ``"<WIDTH-012><HEIGHT-087>"``), for the table.
        boxes: ``(u1, v1, u2, v2)`` of each box of the answer (their corners are also points of ``u``, ``v``).
        polygons: ``((u, v), ...)`` of each polygon of the answer (its vertices are also points of ``u``, ``v``).

    """

    chip_id: str
    u: npt.NDArray[np.float64]
    v: npt.NDArray[np.float64]
    t: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    tokens: tuple[str, ...] = ()
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    polygons: tuple[tuple[tuple[float, float], ...], ...] = ()


def chip_positions(
    chip_id: str,
    boxes: Sequence[Sequence[float]],
    points: Sequence[Sequence[float]],
    times: Sequence[float],
    vocab: LapeVocab,
    polygons: Sequence[Sequence[Sequence[float]]] = (),
) -> ChipPositions:
    """Decoded values → :class:`ChipPositions`: box corners, then polygon vertices, then points, in order.

    Each spatial point's ``tokens`` are the WIDTH/HEIGHT tokens of its bins (the tokens the model wrote).
    """
    pairs = [p for b in boxes for p in ((b[0], b[1]), (b[2], b[3]))]
    pairs += [(p[0], p[1]) for ring in polygons for p in ring]
    pairs += [(p[0], p[1]) for p in points]
    u = np.array([p[0] for p in pairs], dtype=np.float64)
    v = np.array([p[1] for p in pairs], dtype=np.float64)
    tokens = tuple(vocab.encode(Axis.WIDTH, a) + vocab.encode(Axis.HEIGHT, b) for a, b in pairs)
    return ChipPositions(chip_id, u, v, np.asarray(times, dtype=np.float64), tokens,
                         tuple((float(b[0]), float(b[1]), float(b[2]), float(b[3])) for b in boxes),
                         tuple(tuple((float(p[0]), float(p[1])) for p in ring) for ring in polygons))


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


def shapes_frame(grid: GeoGrid, positions: ChipPositions) -> gpd.GeoDataFrame:
    """The answer's boxes and polygons as polygons in the chip's CRS, labelled B1… and G1….

    Boxes map with ``GeoGrid.norm_box_to_polygon``, polygons with ``GeoGrid.norm_polygon_to_crs`` (a ring
    that crosses itself is repaired, one without area left out).
    """
    labels: list[str] = []
    shapes = []
    for i, b in enumerate(positions.boxes):
        labels.append(f"B{i + 1}")
        shapes.append(grid.norm_box_to_polygon((min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3]))))
    for i, ring in enumerate(positions.polygons):
        polygon = grid.norm_polygon_to_crs(ring)
        if polygon is not None:
            labels.append(f"G{i + 1}")
            shapes.append(polygon)
    return gpd.GeoDataFrame({"label": labels}, geometry=gpd.GeoSeries(shapes, crs=grid.crs.to_wkt()))


def decode_answer_text(text: str, chip_id: str, vocab: LapeVocab | None = None) -> ChipPositions:
    """Decode an answer's position tokens into normalized positions (bin centres, ``agrivlm.lape.tokens``).

    Boxes (``W H W H``) give their two corners, polygons (points joined by the codec's separator) their
    vertices, points (``W H``) one point; every ``TEMP`` token is a time.

    Raises:
        ExploreError: a position token beyond the vocabulary (e.g. ``<WIDTH-151>`` with 150 spatial tokens).

    """
    vocab = vocab or LapeVocab()
    try:
        parsed = parse_positions(text, vocab)
        times = [vocab.decode(m.group(0)) for m in _TEMP_TOKEN.finditer(text)]
    except ValueError as exc:
        raise ExploreError(f"chip {chip_id}: the answer's position tokens do not decode ({exc})") from exc
    return chip_positions(chip_id, parsed.boxes, parsed.points, times, vocab, parsed.polygons)


@dataclass(frozen=True)
class ModelAnswer:
    """The model's answer to one question about one chip."""

    #: The answer's text (position tokens kept).
    text: str
    #: Geometric mean of the probabilities of its tokens (see :mod:`agrivlm.infer.generate`).
    score: float
    #: Its positions, sub-bin decoded from the model's logits; ``t`` on :attr:`time_axis`.
    positions: ChipPositions
    #: The frames the model saw (ISO days).
    frame_dates: tuple[str, ...]
    #: The range ``t`` is measured on: the season windows of the chip's usable dates
    #: (:func:`agrivlm.pipeline.frames.frame_time_positions`), not the frames' own range.
    time_axis: TimeAxis


_LOAD_LOCK = threading.Lock()


def _checkpoint_stamp(folder: Path) -> tuple[Any, ...]:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)


@lru_cache(maxsize=2)
def _load(folder: str, stamp: tuple[Any, ...]) -> Predictor:
    from agrivlm.infer.generate import Predictor

    return Predictor.load(folder, device="cpu", max_new_tokens=64)


def check_model(model: str | os.PathLike[str]) -> Predictor:
    """Load (once, then from a cache keyed by the files' sizes and times) the checkpoint ``model``.

    Raises:
        ModelUnavailable: no such folder, no ``config.json`` in it, or it does not load (with the reason).

    """
    path = Path(os.fspath(model))
    if not path.exists():
        raise ModelUnavailable(f"{path}: no such checkpoint; pass --model with a trained agrivlm checkpoint folder")
    if not (path / "config.json").is_file():
        raise ModelUnavailable(f"{path}: not an agrivlm checkpoint (no config.json); save one with save_pretrained")
    try:
        with _LOAD_LOCK:
            return _load(str(path.resolve()), _checkpoint_stamp(path))
    except (AgriVLMError, OSError, ValueError, KeyError) as exc:
        raise ModelUnavailable(f"{path}: the checkpoint does not load ({exc})") from exc


def ask_model(model: str | os.PathLike[str], stack: Stack, chip_id: str, question: str,
              chip_size: int | tuple[int, int]) -> ModelAnswer:
    """Answer ``question`` about chip ``chip_id`` of ``stack`` with the checkpoint ``model``.

    The chip is read as ``agrivlm infer`` reads it (every date of its window), its frames and bands are made
    with the checkpoint's input settings (``agrivlm_inputs.yaml``), and the answer is generated greedily;
    its positions are decoded with sub-bin precision. The chip is the explorer's (``chip_size``), whatever
    chip size the checkpoint's batch runs use.

    Raises:
        ModelUnavailable: the checkpoint cannot be loaded or has no band preset.
        ExploreError: a bad chip id, or a chip the model cannot be asked about (too few clear frames, …).

    """
    from agrivlm.errors import PipelineError
    from agrivlm.geo.chips import ChipStream
    from agrivlm.infer.prepare import channels_of
    from agrivlm.infer.runner import ask_chip
    from agrivlm.pipeline.inputs import load_input_config

    predictor = check_model(model)
    if not question.strip():
        raise ExploreError("the question is empty")
    grid = chip_grid(stack.grid, chip_id, chip_size)  # checks the id and the window
    try:
        config, _ = load_input_config(model)
        if channels_of(config) != predictor.num_bands:
            raise ModelUnavailable(f"{model}: its agrivlm_inputs.yaml gives {channels_of(config)} channel(s) but the "
                                   f"model takes {predictor.num_bands}")
    except AgriVLMError as exc:
        raise ModelUnavailable(str(exc)) from exc
    ch, cw = (chip_size, chip_size) if isinstance(chip_size, int) else chip_size
    match = CHIP_ID.match(chip_id)
    assert match is not None
    window = Window(int(match["col"]), int(match["row"]), cw, ch)
    chip = ChipStream(stack, chip_size=(ch, cw)).read(0, window)
    assert chip.grid == grid
    try:
        asked, answer = ask_chip(predictor, config, chip, question)
    except PipelineError as exc:
        raise ExploreError(f"the model cannot be asked about this chip: {exc}") from exc
    pos = answer.positions
    frame_dates = tuple(str(d.astype("datetime64[D]")) for d in asked.visual.dates)
    return ModelAnswer(text=answer.text, score=answer.score,
                       positions=chip_positions(chip_id, pos.boxes, pos.points, answer.times, predictor.vocab,
                                                pos.polygons),
                       frame_dates=frame_dates, time_axis=asked.visual.time_axis)
