"""LAPE position tokens: the vocabulary and the one codec between normalized values and token indices.

Conventions (the same everywhere in agrivlm; coordinates as in :mod:`agrivlm.geo.coords`):

* ``u`` — column fraction of the chip (0 = left edge, 1 = right edge) — ``WIDTH`` tokens;
  ``v`` — row fraction from the top of the chip as stored — ``HEIGHT`` tokens;
  ``t`` — fraction of the chip's date range (0 = first date, 1 = last) — ``TEMP`` tokens.
* An axis with ``n`` tokens cuts ``[0, 1]`` into ``n`` equal bins; token ``i`` stands for bin
  ``[i/n, (i+1)/n)`` and decodes to its centre ``(i + 0.5) / n``. Encoding is
  :func:`position_transfer` (``floor(value * n)``, the value 1.0 goes to the last bin), so a round
  trip is off by at most half a bin: ``|bin_centre(position_transfer(x, n), n) - x| <= 0.5 / n``
  (0.0033 of the chip's width for the default 150 spatial tokens, 0.01 of the date range for 50
  temporal tokens).
* Sub-bin positions: a continuous value sits at the *bin coordinate* ``c = value * n - 0.5``
  (clamped to ``[0, n-1]``), between bins ``floor(c)`` and ``floor(c) + 1`` with weight
  ``r = c - floor(c)`` on the upper one (:func:`position_interp`). Soft training targets
  ``(1 - r, r)`` (as in LLaVA-ST), ``token_transfer``'s interpolated input embeddings, and the
  expectation decoding of :func:`refine_position` all use this one coordinate, so they invert each
  other exactly.
* Serialization: a box ``(u1, v1, u2, v2)`` → ``<WIDTH-a><HEIGHT-b><WIDTH-c><HEIGHT-d>``; a point
  ``(u, v)`` → ``<WIDTH-a><HEIGHT-b>``; a polygon (its exterior ring, not closed) → its points joined by
  :data:`POLYGON_SEP` (``<WIDTH-a><HEIGHT-b>,<WIDTH-c><HEIGHT-d>,…``; written back to back, two points
  would read as a box); a time segment ``(t1, t2)`` → ``<TEMP-a><TEMP-b>``.
* Decoding a chain of points joined by :data:`POLYGON_SEP`: one point is a point, two are a box (its
  corners), three or more a polygon. So one item of a listing is a box or a polygon, never ambiguous.

Token strings are ``<HEIGHT-000>`` … (three digits, more when an axis has over 1000 tokens), plus per axis
an ``-INPUT`` token (a placeholder whose embedding is interpolated at a continuous value given beside the
text) and an ``-OUTPUT`` token (a placeholder answer whose value is given beside the text, as in LLaVA-ST).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal, overload

import numpy as np
import numpy.typing as npt

#: Default number of tokens per spatial axis (height and width each).
DEFAULT_NUM_SPATIAL = 150
#: Default number of temporal tokens.
DEFAULT_NUM_TEMPORAL = 50


class Axis(str, Enum):
    """A LAPE axis; the value is the token prefix."""

    #: ``v``: row fraction from the top of the chip.
    HEIGHT = "HEIGHT"
    #: ``u``: column fraction from the left of the chip.
    WIDTH = "WIDTH"
    #: ``t``: fraction of the chip's date range.
    TEMP = "TEMP"


#: Axes in the order their position tokens are laid out in the vocabulary (and in the LAPE tables).
AXES: tuple[Axis, ...] = (Axis.HEIGHT, Axis.WIDTH, Axis.TEMP)

_TOKEN_RE = re.compile(r"<(HEIGHT|WIDTH|TEMP)-(\d+)>")

#: Separator between the vertices of a serialized polygon (the only text allowed between two chained points).
POLYGON_SEP = ","


# ---------------------------------------------------------------------------------------------------
# pure codec
# ---------------------------------------------------------------------------------------------------
def _check_n(n: int) -> None:
    if n < 2:
        raise ValueError(f"an axis needs at least 2 position tokens, got {n}")


@overload
def position_transfer(value: float, n: int) -> int: ...
@overload
def position_transfer(value: npt.ArrayLike, n: int) -> int | npt.NDArray[np.int64]: ...
def position_transfer(value: npt.ArrayLike, n: int) -> int | npt.NDArray[np.int64]:
    """Normalized value(s) in ``[0, 1]`` → token index ``floor(value * n)`` in ``[0, n - 1]``.

    Values outside ``[0, 1]`` are clipped (a box edge just past the chip is the chip's edge); NaN is an
    error. Scalars give an ``int``, arrays an ``int64`` array of the same shape.
    """
    _check_n(n)
    arr = np.asarray(value, dtype=np.float64)
    if np.isnan(arr).any():
        raise ValueError("position_transfer: NaN is not a position; drop it or fill it before encoding")
    idx = np.clip(np.floor(np.clip(arr, 0.0, 1.0) * n), 0, n - 1).astype(np.int64)
    return int(idx) if idx.ndim == 0 else idx


@overload
def bin_centre(index: int, n: int) -> float: ...
@overload
def bin_centre(index: npt.ArrayLike, n: int) -> float | npt.NDArray[np.float64]: ...
def bin_centre(index: npt.ArrayLike, n: int) -> float | npt.NDArray[np.float64]:
    """Token index(es) → the centre of their bin, ``(index + 0.5) / n`` (normalized, in ``(0, 1)``)."""
    _check_n(n)
    arr = np.asarray(index)
    if ((arr < 0) | (arr >= n)).any():
        raise ValueError(f"token index out of range [0, {n - 1}]: {arr.tolist()}")
    out = (arr.astype(np.float64) + 0.5) / n
    return float(out) if out.ndim == 0 else out


def bin_coordinate(value: float, n: int) -> float:
    """A normalized value → its continuous bin coordinate ``clip(value * n - 0.5, 0, n - 1)``."""
    _check_n(n)
    if math.isnan(value):
        raise ValueError("bin_coordinate: NaN is not a position")
    return min(max(value * n - 0.5, 0.0), float(n - 1))


def position_interp(value: float, n: int) -> tuple[int, int, float]:
    """A normalized value → ``(lo, hi, r)``: it lies between bins ``lo`` and ``hi = lo + 1`` at fraction ``r``.

    ``(1 - r) * bin_centre(lo) + r * bin_centre(hi) == value`` for values between the first and the last
    bin centre; outside that range the value is clamped to the nearest centre (``r = 0``). At the last
    bin ``hi == lo`` and ``r == 0``.
    """
    c = bin_coordinate(value, n)
    lo = min(int(math.floor(c)), n - 1)
    hi = min(lo + 1, n - 1)
    r = c - lo if hi != lo else 0.0
    return lo, hi, r


def refine_position(axis_logits: npt.ArrayLike, index: int, window: int = 2) -> float:
    """Sub-bin decoding: the expected bin coordinate under the softmax of ``axis_logits`` near ``index``.

    Args:
        axis_logits: ``(n,)`` the output head's logits of one axis at one generated step.
        index: the generated token's bin (the argmax under greedy decoding).
        window: bins on each side of ``index`` that enter the softmax (edges are cut at ``[0, n-1]``).

    Returns:
        The normalized value ``(E[bin] + 0.5) / n`` in ``[0.5/n, 1 - 0.5/n]``: the inverse of the
        ``(1 - r, r)`` soft target of :func:`position_interp`.
    """
    logits = np.asarray(axis_logits, dtype=np.float64).ravel()
    n = logits.size
    _check_n(n)
    if not 0 <= index < n:
        raise ValueError(f"token index {index} out of range [0, {n - 1}]")
    lo, hi = max(0, index - window), min(n, index + window + 1)
    part = logits[lo:hi]
    p = np.exp(part - part.max())
    p /= p.sum()
    return float((np.dot(p, np.arange(lo, hi, dtype=np.float64)) + 0.5) / n)


# ---------------------------------------------------------------------------------------------------
# vocabulary
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LapeVocab:
    """The LAPE token strings and their layout.

    Position tokens are laid out axis after axis in :data:`AXES` order (all ``HEIGHT``, then ``WIDTH``,
    then ``TEMP``), so a model can give them consecutive ids and find a token's axis and bin from its
    offset. The six ``-INPUT``/``-OUTPUT`` control tokens come before them.
    """

    #: Tokens per spatial axis (height and width each).
    num_spatial: int = DEFAULT_NUM_SPATIAL
    #: Temporal tokens.
    num_temporal: int = DEFAULT_NUM_TEMPORAL
    _digits: dict[Axis, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_n(self.num_spatial)
        _check_n(self.num_temporal)
        object.__setattr__(self, "_digits", {a: max(3, len(str(self.size(a) - 1))) for a in AXES})

    def size(self, axis: Axis | str) -> int:
        """Number of tokens of ``axis``."""
        return self.num_temporal if Axis(axis) is Axis.TEMP else self.num_spatial

    def token(self, axis: Axis | str, index: int) -> str:
        """The token of bin ``index`` of ``axis``: ``<WIDTH-012>``."""
        axis = Axis(axis)
        if not 0 <= index < self.size(axis):
            raise ValueError(f"{axis.value!s} token index {index} out of range [0, {self.size(axis) - 1}]")
        return f"<{axis.value}-{index:0{self._digits[axis]}d}>"

    @staticmethod
    def input_token(axis: Axis | str) -> str:
        """The placeholder of a continuous input value of ``axis``: ``<WIDTH-INPUT>``."""
        return f"<{Axis(axis).value}-INPUT>"

    @staticmethod
    def output_token(axis: Axis | str) -> str:
        """The placeholder of a continuous answer value of ``axis``: ``<WIDTH-OUTPUT>``."""
        return f"<{Axis(axis).value}-OUTPUT>"

    @property
    def control_tokens(self) -> list[str]:
        """``[<HEIGHT-INPUT>, <WIDTH-INPUT>, <TEMP-INPUT>, <HEIGHT-OUTPUT>, <WIDTH-OUTPUT>, <TEMP-OUTPUT>]``."""
        return [self.input_token(a) for a in AXES] + [self.output_token(a) for a in AXES]

    def axis_tokens(self, axis: Axis | str) -> list[str]:
        """All bin tokens of ``axis`` in index order."""
        return [self.token(axis, i) for i in range(self.size(axis))]

    @property
    def position_tokens(self) -> list[str]:
        """All bin tokens, laid out ``HEIGHT``, ``WIDTH``, ``TEMP``."""
        return [t for a in AXES for t in self.axis_tokens(a)]

    @property
    def num_position_tokens(self) -> int:
        """``2 * num_spatial + num_temporal``."""
        return 2 * self.num_spatial + self.num_temporal

    def axis_offset(self, axis: Axis | str) -> int:
        """Offset of ``axis``'s first token within :attr:`position_tokens`."""
        axis = Axis(axis)
        return {Axis.HEIGHT: 0, Axis.WIDTH: self.num_spatial, Axis.TEMP: 2 * self.num_spatial}[axis]

    def locate(self, offset: int) -> tuple[Axis, int]:
        """Offset within :attr:`position_tokens` → ``(axis, bin index)``."""
        for axis in reversed(AXES):
            start = self.axis_offset(axis)
            if offset >= start:
                if offset - start >= self.size(axis):
                    break
                return axis, offset - start
        raise ValueError(f"position-token offset {offset} out of range [0, {self.num_position_tokens - 1}]")

    def parse_token(self, token: str) -> tuple[Axis, int]:
        """``"<WIDTH-012>"`` → ``(Axis.WIDTH, 12)``; raises on anything else or an out-of-range index."""
        m = _TOKEN_RE.fullmatch(token)
        if m is None:
            raise ValueError(f"not a LAPE position token: {token!r}")
        axis, index = Axis(m.group(1)), int(m.group(2))
        if index >= self.size(axis):
            raise ValueError(f"{token}: index beyond this vocabulary's {self.size(axis)} {axis.value} tokens")
        return axis, index

    # -- codec on this vocabulary --------------------------------------------------------------------
    def encode(self, axis: Axis | str, value: float) -> str:
        """A normalized value → the token of its bin."""
        return self.token(axis, position_transfer(value, self.size(axis)))

    def decode(self, token: str) -> float:
        """A token → its bin centre (normalized)."""
        axis, index = self.parse_token(token)
        return bin_centre(index, self.size(axis))


# ---------------------------------------------------------------------------------------------------
# serialization and parsing
# ---------------------------------------------------------------------------------------------------
def serialize_box(box: Sequence[float], vocab: LapeVocab | None = None) -> str:
    """A normalized box ``(u1, v1, u2, v2)`` → ``<WIDTH-..><HEIGHT-..><WIDTH-..><HEIGHT-..>``."""
    vocab = vocab or LapeVocab()
    if len(box) != 4:
        raise ValueError(f"a box is (u1, v1, u2, v2), got {len(box)} values")
    u1, v1, u2, v2 = (float(b) for b in box)
    return (vocab.encode(Axis.WIDTH, u1) + vocab.encode(Axis.HEIGHT, v1)
            + vocab.encode(Axis.WIDTH, u2) + vocab.encode(Axis.HEIGHT, v2))


def serialize_point(point: Sequence[float], vocab: LapeVocab | None = None) -> str:
    """A normalized point ``(u, v)`` → ``<WIDTH-..><HEIGHT-..>``."""
    vocab = vocab or LapeVocab()
    if len(point) != 2:
        raise ValueError(f"a point is (u, v), got {len(point)} values")
    return vocab.encode(Axis.WIDTH, float(point[0])) + vocab.encode(Axis.HEIGHT, float(point[1]))


def serialize_segment(segment: Sequence[float], vocab: LapeVocab | None = None) -> str:
    """A normalized time segment ``(t1, t2)`` → ``<TEMP-..><TEMP-..>``."""
    vocab = vocab or LapeVocab()
    if len(segment) != 2:
        raise ValueError(f"a segment is (t1, t2), got {len(segment)} values")
    return vocab.encode(Axis.TEMP, float(segment[0])) + vocab.encode(Axis.TEMP, float(segment[1]))


#: How the positions a question *gives* are written:
#: ``bins`` — position tokens, ``<WIDTH-012>`` (the value rounded to its bin);
#: ``input`` — ``-INPUT`` placeholders, ``<WIDTH-INPUT>``, each carrying its exact continuous value beside the text
#: (the processor's ``positions=``; the model embeds it by interpolating the LAPE table), LLaVA-ST's layout.
QuestionPositions = Literal["bins", "input"]

#: How the positions an answer gives are written in *training* data:
#: ``bins`` — position tokens, as the model generates them;
#: ``output`` — ``-OUTPUT`` placeholders, ``<WIDTH-OUTPUT>``, each carrying its exact value: the label is the soft
#: target on the two bins around the value (as a bin label's), and the next step's input embeds the exact value
#: (``token_transfer``) instead of its bin's row — LLaVA-ST's layout. The model still generates bins.
AnswerPositions = Literal["bins", "output"]


def position_formatters(vocab: LapeVocab, mode: QuestionPositions | AnswerPositions = "bins") -> dict[str, Any]:
    """``fmt_box``/``fmt_point``/``fmt_segment``/``fmt_time`` of :func:`agrivlm.tasks.turns.render_text`.

    The values behind the tokens, in text order, are the same in every mode (a box: ``u1, v1, u2, v2``).
    """
    if mode == "bins":
        return {"fmt_box": lambda b: serialize_box(b, vocab), "fmt_point": lambda p: serialize_point(p, vocab),
                "fmt_segment": lambda s: serialize_segment(s, vocab),
                "fmt_time": lambda t: vocab.encode(Axis.TEMP, float(t))}
    if mode not in ("input", "output"):
        raise ValueError(f"positions {mode!r}: use bins, input (questions) or output (answers)")
    token = LapeVocab.input_token if mode == "input" else LapeVocab.output_token
    w, h, t = (token(a) for a in (Axis.WIDTH, Axis.HEIGHT, Axis.TEMP))

    def sized(n: int, what: str, text: str) -> Any:
        def fmt(values: Sequence[float]) -> str:
            if len(values) != n:
                raise ValueError(f"a {what} has {n} values, got {len(values)}")
            return text
        return fmt

    return {"fmt_box": sized(4, "box", w + h + w + h), "fmt_point": sized(2, "point", w + h),
            "fmt_segment": sized(2, "segment", t + t), "fmt_time": lambda _t: t}


def serialize_polygon(points: Sequence[Sequence[float]], vocab: LapeVocab | None = None) -> str:
    """A normalized polygon ``[(u, v), ...]`` (≥ 3 points, ring not closed) → points joined by :data:`POLYGON_SEP`."""
    vocab = vocab or LapeVocab()
    if len(points) < 3:
        raise ValueError(f"a polygon needs at least 3 points, got {len(points)}")
    return POLYGON_SEP.join(serialize_point(p, vocab) for p in points)


@dataclass(frozen=True)
class PositionItem:
    """One decoded position token: its axis, its normalized value, and how it follows the previous one.

    ``adjacent``: nothing but whitespace since the previous position token; ``chained``: only the polygon
    separator (:data:`POLYGON_SEP`, whitespace around it allowed) since the previous one.
    """

    axis: Axis
    value: float
    adjacent: bool = True
    chained: bool = False


@dataclass
class ParsedPositions:
    """Positions found in a generated answer, normalized to ``[0, 1]``.

    ``u``, ``v`` as in :mod:`agrivlm.geo.coords`; ``t`` as a fraction of the chip's date range.
    """

    #: ``(u1, v1, u2, v2)`` per box, in the order written.
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    #: ``(u, v)`` per point.
    points: list[tuple[float, float]] = field(default_factory=list)
    #: ``[(u, v), ...]`` (≥ 3 points, ring not closed, as written) per polygon.
    polygons: list[list[tuple[float, float]]] = field(default_factory=list)
    #: ``(t1, t2)`` per time segment.
    segments: list[tuple[float, float]] = field(default_factory=list)
    #: Position tokens that fit no pattern (a lone ``TEMP``, a ``HEIGHT`` first, ...).
    unmatched: int = 0


def group_positions(items: Iterable[PositionItem]) -> ParsedPositions:
    """Group a stream of position tokens into boxes, points, polygons and segments, left to right.

    ``W H W H`` (each adjacent to the previous) is a box. Else ``W H`` starts a chain of points, each next
    ``W H`` *chained* to it (joined by :data:`POLYGON_SEP`): a chain of one point is a point, of two a box
    (``(u1, v1, u2, v2)`` from its two corners), of three or more a polygon. ``T T`` is a segment. Anything
    else is counted in ``unmatched`` and skipped.
    """
    seq = list(items)
    out = ParsedPositions()
    i = 0

    def run(pattern: tuple[Axis, ...]) -> bool:
        if i + len(pattern) > len(seq):
            return False
        return all(seq[i + k].axis is a and (k == 0 or seq[i + k].adjacent) for k, a in enumerate(pattern))

    W, H, T = Axis.WIDTH, Axis.HEIGHT, Axis.TEMP
    while i < len(seq):
        if run((W, H, W, H)):
            out.boxes.append((seq[i].value, seq[i + 1].value, seq[i + 2].value, seq[i + 3].value))
            i += 4
        elif run((W, H)):
            chain = [(seq[i].value, seq[i + 1].value)]
            i += 2
            while run((W, H)) and seq[i].chained and not run((W, H, W, H)):
                chain.append((seq[i].value, seq[i + 1].value))
                i += 2
            if len(chain) == 1:
                out.points.append(chain[0])
            elif len(chain) == 2:
                out.boxes.append((chain[0][0], chain[0][1], chain[1][0], chain[1][1]))
            else:
                out.polygons.append(chain)
        elif run((T, T)):
            out.segments.append((seq[i].value, seq[i + 1].value))
            i += 2
        else:
            out.unmatched += 1
            i += 1
    return out


def parse_positions(text: str, vocab: LapeVocab | None = None) -> ParsedPositions:
    """Generated text → boxes, points, polygons and segments at their bins' centres.

    Tokens separated only by whitespace count as adjacent, by :data:`POLYGON_SEP` (and whitespace) as
    chained. Decode generated ids with
    ``skip_special_tokens=False``: the position tokens are special tokens. For sub-bin precision use the
    model's ``decode_positions`` with the generation logits.
    """
    vocab = vocab or LapeVocab()
    items: list[PositionItem] = []
    last_end: int | None = None
    for m in _TOKEN_RE.finditer(text):
        axis, index = vocab.parse_token(m.group(0))
        gap = None if last_end is None else text[last_end:m.start()].strip()
        items.append(PositionItem(axis, bin_centre(index, vocab.size(axis)), gap == "", gap == POLYGON_SEP))
        last_end = m.end()
    return group_positions(items)


def parse_token_ids(
    ids: Sequence[int] | npt.ArrayLike,
    offset: int,
    vocab: LapeVocab | None = None,
    logits: npt.ArrayLike | None = None,
    window: int = 2,
    separator_ids: Collection[int] = (),
) -> ParsedPositions:
    """Generated token ids → boxes, points, polygons and segments, sub-bin precise when ``logits`` are given.

    Args:
        ids: ``(S,)`` generated ids; position tokens are ids ``[offset, offset + P)`` in :class:`LapeVocab`
            layout, everything else is text (and breaks adjacency).
        offset: id of ``<HEIGHT-000>`` (the model config's ``position_token_offset``).
        vocab: the LAPE vocabulary (default 150 / 50).
        logits: ``(S, V)`` the logits that produced each id (``generate(..., output_logits=True)``);
            each position token's value becomes :func:`refine_position` of its axis's logits around it.
            Without logits, values are bin centres.
        window: bins on each side for :func:`refine_position`.
        separator_ids: the ids of :data:`POLYGON_SEP` in the tokenizer (``tokenizer(POLYGON_SEP)``); a
            position token after a run of only these ids is chained to the previous one (a polygon's next
            vertex). Empty: no chains, so no polygons.
    """
    vocab = vocab or LapeVocab()
    return group_positions(position_items(ids, offset, vocab, logits, window, separator_ids))


def position_items(
    ids: Sequence[int] | npt.ArrayLike,
    offset: int,
    vocab: LapeVocab,
    logits: npt.ArrayLike | None = None,
    window: int = 2,
    separator_ids: Collection[int] = (),
) -> list[PositionItem]:
    """The position tokens of generated ids, in order, with their adjacency (see :func:`parse_token_ids`).

    With ``logits=None`` each item's ``value`` is its bin centre.
    """
    arr = np.asarray(ids, dtype=np.int64).ravel()
    seps = frozenset(int(i) for i in separator_ids)
    lg = None if logits is None else np.asarray(logits, dtype=np.float64)
    if lg is not None and lg.shape[0] != arr.size:
        raise ValueError(f"{lg.shape[0]} logit rows for {arr.size} generated ids")
    items: list[PositionItem] = []
    prev_was_position = False
    gap: list[int] = []  # text ids since the last position token
    for step, token_id in enumerate(arr):
        rel = int(token_id) - offset
        if not 0 <= rel < vocab.num_position_tokens:
            prev_was_position = False
            gap.append(int(token_id))
            continue
        axis, index = vocab.locate(rel)
        n = vocab.size(axis)
        if lg is None:
            value = bin_centre(index, n)
        else:
            start = offset + vocab.axis_offset(axis)
            value = refine_position(lg[step, start:start + n], index, window)
        chained = bool(items) and bool(gap) and all(g in seps for g in gap)
        items.append(PositionItem(axis, value, prev_was_position, chained))
        prev_was_position = True
        gap = []
    return items
