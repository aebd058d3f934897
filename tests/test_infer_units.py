"""The parts of `agrivlm infer` that need no model: NMS, the journal, prompts and answer parsing, decoding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
from hypothesis import given, settings
from hypothesis import strategies as st
from shapely.geometry import box

from agrivlm.infer.errors import InferError
from agrivlm.infer.generate import decode_answer
from agrivlm.infer.journal import Journal
from agrivlm.infer.nms import nms, overlapping_iou
from agrivlm.infer.prompts import (
    build_prompt,
    fields_question,
    listing_details,
    parse_stage,
    parse_timeline,
    says_no_fields,
    stage_question,
    stages_at,
    timeline_question,
)
from agrivlm.lape.tokens import Axis, LapeVocab, serialize_box, serialize_polygon, serialize_segment
from agrivlm.pipeline.inputs import InputConfig
from agrivlm.tasks.questions import OUTLINE_FIELDS_QUESTIONS, STAGE_AT_TIME_QUESTIONS, STAGE_TIMELINE_QUESTIONS

VOCAB = LapeVocab()

# -- NMS -------------------------------------------------------------------------------------------------

boxes_st = st.lists(
    st.tuples(st.integers(0, 40), st.integers(0, 40), st.integers(1, 25), st.integers(1, 25),
              st.floats(0.0, 1.0), st.booleans()),
    min_size=0, max_size=25,
)


def _polys(items):
    return np.array([box(x, y, x + w, y + h) for x, y, w, h, _, _ in items], dtype=object)


def _iou(a, b) -> float:
    inter = a.intersection(b).area
    return inter / (a.area + b.area - inter)


@settings(max_examples=60, deadline=None)
@given(items=boxes_st, thr=st.sampled_from([0.0, 0.3, 0.5, 0.8]))
def test_nms_keeps_no_overlap_above_the_threshold_and_drops_only_for_a_better_kept_one(items, thr) -> None:
    geoms = _polys(items)
    scores = np.array([s for *_, s, _ in items], dtype=np.float64)
    prio = np.array([int(c) for *_, c in items], dtype=np.int64)
    kept = nms(geoms, scores, thr, priority=prio)
    assert list(kept) == sorted(set(kept.tolist()))
    kept_set = set(kept.tolist())
    for i in kept:
        for j in kept:
            if i < j:
                assert _iou(geoms[i], geoms[j]) <= thr + 1e-12
    rank = {k: r for r, k in enumerate(np.lexsort((np.arange(len(items)), -scores, -prio)).tolist())}
    for d in set(range(len(items))) - kept_set:
        assert any(rank[k] < rank[d] and _iou(geoms[k], geoms[d]) > thr for k in kept_set)
    assert set(nms(geoms[kept], scores[kept], thr, prio[kept]).tolist()) == set(range(len(kept)))  # idempotent


def test_nms_merges_one_field_seen_by_overlapping_chips() -> None:
    field = box(0, 0, 100, 80)  # metres
    seen = [field, shapely.affinity.translate(field, 3, -2), box(0, 0, 40, 80), box(300, 300, 350, 350)]
    scores = np.array([0.6, 0.9, 0.95, 0.5])
    cut = np.array([0, 0, 1, 0])  # the third is the part a chip's edge cuts off
    assert nms(np.array(seen, dtype=object), scores, 0.5).tolist() == [1, 2, 3]
    assert nms(np.array(seen, dtype=object), scores, 0.3, priority=1 - cut).tolist() == [1, 3]
    assert nms(np.array(seen, dtype=object), scores, 1.0).tolist() == [0, 1, 2, 3]
    i, j, iou = overlapping_iou(np.array(seen[:2], dtype=object))
    assert (i.tolist(), j.tolist()) == ([0], [1]) and iou[0] == pytest.approx(_iou(seen[0], seen[1]))
    with pytest.raises(ValueError, match="3 scores for 4"):
        nms(np.array(seen, dtype=object), scores[:3])


# -- journal ---------------------------------------------------------------------------------------------


def test_journal_resumes_refuses_other_settings_and_drops_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "run.journal.jsonl"
    settings = {"task": "fields", "inputs": InputConfig().model_dump(mode="json")}
    with Journal.open(path, settings) as j:
        j.append({"type": "stack", "stack": "/a", "crs": "EPSG:32633"})
        j.append({"type": "chips", "stack": "/a", "chips": [{"chip_id": "r0_c0", "index": 0, "status": "ok"}]})
    size = path.stat().st_size
    with path.open("ab") as fh:  # a kill in the middle of writing the next batch
        fh.write(b'{"type":"chips","stack":"/a","chips":[{"chip_id":"r0_c16"')
    with Journal.open(path, settings) as j:
        assert j.done_chips("/a") == {"r0_c0"} and j.stack_info("/a")["crs"] == "EPSG:32633"
        assert path.stat().st_size == size  # the torn line is gone, appends continue on a clean line
        j.append({"type": "chips", "stack": "/a", "chips": [{"chip_id": "r0_c16", "index": 1, "status": "ok"}]})
    lines = path.read_text().splitlines()
    assert [json.loads(line)["type"] for line in lines] == ["header", "stack", "chips", "chips"]
    other = {**settings, "task": "growth"}
    with pytest.raises(InferError, match="other settings \\(task: 'fields' → 'growth'\\).*--restart"):
        Journal.open(path, other)
    with Journal.open(path, other, restart=True) as j:
        assert j.entries == [] and j.done_chips("/a") == set()
    path.write_text(lines[0] + "\nnot json\n" + lines[1] + "\n")
    with pytest.raises(InferError, match=":2: damaged journal line"):
        Journal.open(path, other)


# -- prompts and answers ---------------------------------------------------------------------------------


def test_prompts_are_the_recipes_wording_rendered_with_the_codec() -> None:
    q = fields_question(VOCAB)
    assert q.text == OUTLINE_FIELDS_QUESTIONS[0] and q.positions == ()
    assert build_prompt(q.text, 8) == "USER: <video>\n" + OUTLINE_FIELDS_QUESTIONS[0] + "\nASSISTANT: "
    assert build_prompt(q.text, 1).startswith("USER: <image>\n")
    b = (0.1, 0.2, 0.4, 0.7)
    s = stage_question(VOCAB, b, 0.25, "grassland")
    expected = STAGE_AT_TIME_QUESTIONS[0].format(name="grassland parcel")
    assert s.text == expected.replace("{box:0}", serialize_box(b, VOCAB)).replace(
        "{time:0}", VOCAB.encode(Axis.TEMP, 0.25))
    assert s.positions == (*b, 0.25)
    assert "the parcel at" in stage_question(VOCAB, b, 0.5, None).text


def test_answer_parsing() -> None:
    assert parse_stage("peak") == "peak" and parse_stage("It is in Green-up.") == "green-up"
    assert parse_stage("peak or senescence") is None and parse_stage("peaks") is None and parse_stage("") is None
    assert says_no_fields("There are no fields in this image.") and not says_no_fields("1 field: parcel")
    b1, b2 = serialize_box((0.1, 0.1, 0.3, 0.3)), serialize_box((0.5, 0.5, 0.9, 0.9))
    text = f"2 fields: grassland {b1}; cultivated land {b2} (partly outside the image)."
    assert listing_details(text, 2) == [("grassland", False), ("cultivated land", True)]
    assert listing_details(text, 3) == [("", False)] * 3
    # items that are polygons (points joined by the codec's separator), mixed with a box
    ring = serialize_polygon([(0.1, 0.1), (0.3, 0.1), (0.2, 0.3)])
    mixed = f"3 fields: forest {ring} (partly outside the image); grassland {b1}; parcel {ring}."
    assert listing_details(mixed, 3) == [("forest", True), ("grassland", False), ("parcel", False)]


def test_timeline_answers_become_a_stage_on_every_date() -> None:
    seg = lambda a, b: serialize_segment((a, b), VOCAB)  # noqa: E731
    text = f"dormant {seg(0.0, 0.2)}; green-up {seg(0.3, 0.4)}; peak {seg(0.5, 0.6)}; dormant {seg(0.9, 1.0)}."
    segments = [(0.0, 0.2), (0.3, 0.4), (0.5, 0.6), (0.9, 1.0)]
    spans = parse_timeline(text, segments)
    assert spans == [("dormant", 0.0, 0.2), ("green-up", 0.3, 0.4), ("peak", 0.5, 0.6), ("dormant", 0.9, 1.0)]
    # inside a span its stage; in a gap the nearer span (0.24 is nearer 0.2 than 0.3); outside, the end spans
    assert stages_at(spans, [0.1, 0.24, 0.26, 0.55, 0.7, 0.8, 1.2, -0.1]) == [
        "dormant", "dormant", "green-up", "peak", "peak", "dormant", "dormant", "dormant"]
    assert parse_timeline(text, segments[:3]) is None, "a segment no stage word names"
    assert parse_timeline("peak.", []) is None and parse_timeline(f"peaks {seg(0.1, 0.2)}", [(0.1, 0.2)]) is None
    q = timeline_question(VOCAB, (0.1, 0.2, 0.4, 0.7), "grassland")
    assert q.text == STAGE_TIMELINE_QUESTIONS[0].format(name="grassland parcel").replace(
        "{box:0}", serialize_box((0.1, 0.2, 0.4, 0.7), VOCAB)) and q.positions == (0.1, 0.2, 0.4, 0.7)
    with pytest.raises(ValueError):
        stages_at([], [0.5])


def test_decode_answer_gives_boxes_times_and_the_steps_of_each() -> None:
    off = 1000
    n = VOCAB.num_position_tokens

    def tid(axis: Axis, i: int) -> int:
        return off + VOCAB.axis_offset(axis) + i

    ids = [5, tid(Axis.WIDTH, 10), tid(Axis.HEIGHT, 20), tid(Axis.WIDTH, 40), tid(Axis.HEIGHT, 60), 7,
           tid(Axis.TEMP, 30), 8, tid(Axis.WIDTH, 3), tid(Axis.HEIGHT, 4)]
    logits = np.full((len(ids), n), -30.0)
    for s, t in enumerate(ids):
        if t >= off:
            logits[s, t - off] = 10.0
    logprobs = np.log([0.9, 0.5, 0.5, 0.5, 0.5, 0.9, 0.25, 0.9, 0.64, 1.0])
    pos, times, box_steps, point_steps, seg_steps, poly_steps = decode_answer(ids, logprobs, logits, off, VOCAB, 2)
    assert np.allclose(pos.boxes[0], [10.5 / 150, 20.5 / 150, 40.5 / 150, 60.5 / 150], atol=1e-9)
    assert np.allclose(pos.points[0], [3.5 / 150, 4.5 / 150], atol=1e-9) and seg_steps == []
    assert box_steps == [[1, 2, 3, 4]] and point_steps == [[8, 9]] and poly_steps == [] and pos.polygons == []
    assert times == pytest.approx([30.5 / 50]) and pos.unmatched == 1  # a lone TEMP: a time, not a segment
