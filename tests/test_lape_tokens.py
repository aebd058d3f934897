from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agrivlm.lape.tokens import (
    AXES,
    Axis,
    LapeVocab,
    PositionItem,
    bin_centre,
    group_positions,
    parse_positions,
    parse_token_ids,
    position_interp,
    position_transfer,
    refine_position,
    serialize_box,
    serialize_point,
    serialize_segment,
)

unit = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
sizes = st.integers(min_value=2, max_value=400)


def test_default_vocabulary_strings_and_layout() -> None:
    v = LapeVocab()
    assert (v.num_spatial, v.num_temporal) == (150, 50)
    assert v.control_tokens == ["<HEIGHT-INPUT>", "<WIDTH-INPUT>", "<TEMP-INPUT>",
                                "<HEIGHT-OUTPUT>", "<WIDTH-OUTPUT>", "<TEMP-OUTPUT>"]
    toks = v.position_tokens
    assert len(toks) == v.num_position_tokens == 350 == len(set(toks))
    assert toks[0] == "<HEIGHT-000>" and toks[149] == "<HEIGHT-149>"
    assert toks[150] == "<WIDTH-000>" and toks[299] == "<WIDTH-149>"
    assert toks[300] == "<TEMP-000>" and toks[-1] == "<TEMP-049>"
    for offset in (0, 149, 150, 299, 300, 349):
        axis, index = v.locate(offset)
        assert toks[offset] == v.token(axis, index)
        assert v.parse_token(toks[offset]) == (axis, index)
    with pytest.raises(ValueError):
        v.locate(350)
    with pytest.raises(ValueError, match="beyond"):
        v.parse_token("<TEMP-050>")
    assert LapeVocab(1200, 5).token(Axis.WIDTH, 7) == "<WIDTH-0007>"


@given(unit, sizes)
def test_position_transfer_bounds_and_round_trip_within_half_a_bin(x: float, n: int) -> None:
    i = position_transfer(x, n)
    assert isinstance(i, int) and 0 <= i < n
    assert abs(bin_centre(i, n) - x) <= 0.5 / n + 1e-12
    assert i / n <= x or i == n - 1  # the bin contains x (1.0 goes to the last bin)


@given(st.lists(unit, min_size=2, max_size=20), sizes)
def test_position_transfer_is_monotone_and_vectorised(xs: list[float], n: int) -> None:
    arr = np.sort(np.asarray(xs))
    idx = position_transfer(arr, n)
    assert isinstance(idx, np.ndarray)
    assert np.all(np.diff(idx) >= 0)
    assert idx.tolist() == [position_transfer(float(x), n) for x in arr]


def test_position_transfer_edges_clip_and_nan() -> None:
    assert position_transfer(0.0, 150) == 0
    assert position_transfer(1.0, 150) == 149
    assert position_transfer(-0.2, 150) == 0 and position_transfer(1.3, 150) == 149
    assert position_transfer(0.5, 150) == 75
    with pytest.raises(ValueError, match="NaN"):
        position_transfer(float("nan"), 150)
    with pytest.raises(ValueError):
        bin_centre(150, 150)


@given(unit, sizes)
def test_position_interp_reconstructs_the_value_between_centres(x: float, n: int) -> None:
    lo, hi, r = position_interp(x, n)
    assert 0 <= lo <= hi <= n - 1 and hi - lo <= 1 and 0.0 <= r < 1.0
    rebuilt = (1 - r) * bin_centre(lo, n) + r * bin_centre(hi, n)
    clamped = min(max(x, 0.5 / n), 1 - 0.5 / n)
    assert rebuilt == pytest.approx(clamped, abs=1e-9)


@given(unit, st.integers(min_value=4, max_value=300), st.integers(min_value=1, max_value=3))
def test_refine_position_inverts_the_soft_target(x: float, n: int, window: int) -> None:
    """Logits = log of the (1 − r, r) soft target ⇒ the expectation decodes back to x (clamped to the centres)."""
    lo, hi, r = position_interp(x, n)
    p = np.full(n, 1e-12)
    p[lo] += 1 - r
    p[hi] += r
    index = lo if (1 - r) >= r else hi
    got = refine_position(np.log(p), index, window)
    clamped = min(max(x, 0.5 / n), 1 - 0.5 / n)
    assert got == pytest.approx(clamped, abs=1e-6)


def test_refine_position_only_looks_inside_the_window() -> None:
    logits = np.full(10, -50.0)
    logits[[2, 3]] = 0.0  # two equal bins → halfway
    logits[9] = 10.0  # far away, outside a window of 2 around bin 3
    assert refine_position(logits, 3, 2) == pytest.approx((2.5 + 0.5) / 10)
    assert refine_position(logits, 3, 0) == pytest.approx(3.5 / 10)


def test_serialize_box_point_segment_and_parse_back() -> None:
    v = LapeVocab()
    box = (0.1, 0.25, 0.6, 0.9)
    s = serialize_box(box, v)
    assert s == "<WIDTH-015><HEIGHT-037><WIDTH-090><HEIGHT-135>"
    parsed = parse_positions("the field is " + s + " and it peaks " + serialize_segment((0.2, 0.55)) + ".", v)
    assert len(parsed.boxes) == 1 and len(parsed.segments) == 1 and parsed.unmatched == 0
    np.testing.assert_allclose(parsed.boxes[0], box, atol=0.5 / 150)
    np.testing.assert_allclose(parsed.segments[0], (0.2, 0.55), atol=0.5 / 50)
    pt = parse_positions(serialize_point((0.33, 0.71)), v)
    assert pt.boxes == [] and len(pt.points) == 1
    np.testing.assert_allclose(pt.points[0], (0.33, 0.71), atol=0.5 / 150)
    with pytest.raises(ValueError, match="u1, v1, u2, v2"):
        serialize_box((0.1, 0.2, 0.3))


def test_parse_positions_grammar() -> None:
    # whitespace between tokens keeps them together; other text splits them
    assert len(parse_positions("<WIDTH-001> <HEIGHT-002>\n<WIDTH-003><HEIGHT-004>").boxes) == 1
    split = parse_positions("<WIDTH-001><HEIGHT-002>; <WIDTH-003><HEIGHT-004>")
    assert len(split.points) == 2 and split.boxes == []
    # points chained by the polygon separator: two are a box (its corners), three or more a polygon
    two = parse_positions("<WIDTH-001><HEIGHT-002>, <WIDTH-003><HEIGHT-004>")
    assert (len(two.boxes), two.points, two.polygons) == (1, [], [])
    three = parse_positions("a <WIDTH-001><HEIGHT-002>,<WIDTH-003><HEIGHT-004> ,<WIDTH-005><HEIGHT-006>; b <WIDTH-001>"
                            "<HEIGHT-002><WIDTH-003><HEIGHT-004>")
    assert len(three.polygons) == 1 and len(three.polygons[0]) == 3 and len(three.boxes) == 1
    odd = parse_positions("<HEIGHT-001><TEMP-003><WIDTH-002>")
    assert (odd.boxes, odd.points, odd.segments, odd.unmatched) == ([], [], [], 3)
    items = [PositionItem(Axis.TEMP, 0.1), PositionItem(Axis.TEMP, 0.3, adjacent=False)]
    assert group_positions(items).unmatched == 2


def test_parse_token_ids_uses_logits_for_sub_bin_values() -> None:
    v = LapeVocab(10, 4)
    offset = 100
    w = offset + v.axis_offset(AXES[1])
    h = offset + v.axis_offset(AXES[0])
    ids = [5, w + 2, h + 7, w + 8, h + 9, 1]  # text, box, text
    logits = np.full((len(ids), 200), -30.0)
    logits[1, w + 2] = logits[1, w + 3] = 0.0  # width between bins 2 and 3
    logits[2, h + 7] = 0.0
    logits[3, w + 8] = 0.0
    logits[4, h + 9] = 0.0
    coarse = parse_token_ids(ids, offset, v)
    fine = parse_token_ids(ids, offset, v, logits, window=2)
    assert coarse.boxes == [(0.25, 0.75, 0.85, 0.95)]
    np.testing.assert_allclose(fine.boxes[0], (0.3, 0.75, 0.85, 0.95), atol=1e-9)
    with pytest.raises(ValueError, match="logit rows"):
        parse_token_ids(ids, offset, v, logits[:3])
