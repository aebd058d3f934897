from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from typer.testing import CliRunner

from agrivlm.cli.recipe import recipe_app
from agrivlm.errors import RecordError
from agrivlm.recipes.schema import (
    Record,
    dump_record,
    iter_records,
    parse_record,
    plain_formatters,
    read_records,
    render_conversation,
    write_records,
)
from agrivlm.tasks.turns import Turn


def _record(**over: object) -> Record:
    data: dict[str, object] = {
        "sample_id": "gs:r000000_c000016:green_up_date:42:2016",
        "recipe": "unit",
        "family": "growth_stages",
        "task": "green_up_date",
        "split": "train",
        "stack": {"data": "sample:ndvi", "masks": "sample:cloud_mask", "frame_files": ["a.tif", "b.tif", "c.tif"],
                  "frame_mask_files": ["ma.tif", None, "mc.tif"], "bands": ["NDVI"]},
        "chip": {"chip_id": "r000000_c000016", "window": {"col_off": 16, "row_off": 0, "width": 32, "height": 32},
                 "transform": [10.0, 0.0, 465341.0, 0.0, -10.0, 5080254.6], "crs": "EPSG:32633",
                 "frame_dates": ["2016-03-17T10:06:59", "2016-05-06T10:05:27", "2016-09-23T10:06:25"],
                 "frame_indices": [14, 17, 28]},
        "conversation": [
            {"role": "user", "text": "When did green-up start in the field at {box:0}?",
             "boxes": [[0.1, 0.2, 0.3000004, 0.4]]},
            {"role": "assistant", "text": "Green-up started at {time:0}.", "times": [0.25]},
        ],
        "meta": {"field_id": "42", "season": "2016", "cut": False},
    }
    data.update(over)
    return Record.model_validate(data)


def test_round_trip_is_byte_stable_and_rounds_normalized_values() -> None:
    rec = _record()
    line = dump_record(rec)
    assert line == dump_record(parse_record(line))
    data = json.loads(line)
    assert list(data) == sorted(data), "sorted keys"
    assert data["conversation"][0]["boxes"] == [[0.1, 0.2, 0.3, 0.4]], "rounded to 6 decimals"
    assert "points" not in data["conversation"][0], "empty position lists are left out"
    assert " " not in line.replace("green-up start in the field at", "").split('"text"')[0]
    assert rec.has_positions


@pytest.mark.parametrize(
    ("turn", "message"),
    [
        ({"role": "user", "text": "at {box:1}", "boxes": [[0, 0, 1, 1]]}, "placeholder {box:1} but the turn has 1"),
        ({"role": "user", "text": "no placeholder", "boxes": [[0, 0, 1, 1]]}, "boxes[0] is never referenced"),
        ({"role": "user", "text": "{box:0}", "boxes": [[0.5, 0, 0.2, 1]]}, "u1 <= u2"),
        ({"role": "user", "text": "{box:0}", "boxes": [[0, 0, 1.2, 1]]}, "outside [0, 1]"),
        ({"role": "user", "text": "{segment:0}", "segments": [[0.7, 0.2]]}, "t1 <= t2"),
        ({"role": "user", "text": "{polygon:0}", "polygons": [[[0, 0], [1, 1]]]}, "at least 3"),
        ({"role": "robot", "text": "hi"}, "role"),
    ],
)
def test_bad_turns_are_rejected(turn: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("[", r"\[").replace("]", r"\]").replace("{", r"\{")
                       .replace("}", r"\}")):
        Turn.model_validate(turn)


def test_bad_records_name_the_file_and_line(tmp_path: Path) -> None:
    good = dump_record(_record())
    bad = json.loads(good)
    bad["chip"]["frame_indices"] = [14, 17]
    path = tmp_path / "shard.jsonl"
    path.write_text(good + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(RecordError, match=r"shard.jsonl:2: .*2 frame_indices"):
        read_records(path)
    path.write_text(good + "\n{not json\n")
    with pytest.raises(RecordError, match=r"shard.jsonl:2: not valid JSON"):
        list(iter_records(path))
    extra = json.loads(good)
    extra["conversation"][1]["answer"] = "x"
    path.write_text(json.dumps(extra) + "\n")
    with pytest.raises(RecordError, match=r"shard.jsonl:1: conversation.1.answer: unknown key"):
        read_records(path)
    old = json.loads(good)
    old["schema_version"] = 0
    path.write_text(json.dumps(old) + "\n")
    with pytest.raises(RecordError, match=r"shard.jsonl:1: schema_version 0; this agrivlm reads version 1"):
        read_records(path)
    path.write_text(good + "\n\n")
    with pytest.raises(RecordError, match=r"shard.jsonl:2: blank line"):
        read_records(path)
    # the conversation must end with the answer
    with pytest.raises(ValidationError, match="ends with an assistant turn"):
        _record(conversation=[{"role": "user", "text": "a"}, {"role": "user", "text": "b"}])
    # frames out of time order
    chip = json.loads(good)["chip"]
    chip["frame_dates"] = list(reversed(chip["frame_dates"]))
    with pytest.raises(ValidationError, match="increasing time order"):
        _record(chip=chip)


def test_write_then_read_and_cli_validate(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    recs = [_record(sample_id=f"x{i}") for i in range(3)]
    assert write_records(path, recs) == 3
    assert [r.sample_id for r in read_records(path)] == ["x0", "x1", "x2"]
    ok = CliRunner().invoke(recipe_app, ["validate", str(tmp_path)])
    assert ok.exit_code == 0 and "3 records in 1 shard(s) are valid" in ok.output
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace('"split":"train"', '"split":"holdout"')
    path.write_text("\n".join(lines) + "\n")
    bad = CliRunner().invoke(recipe_app, ["validate", str(path)])
    assert isinstance(bad.exception, RecordError) and str(bad.exception).startswith(f"{path}:2: split:")


def test_render_with_any_formatter_and_the_plain_preview() -> None:
    rec = _record()
    tokens = render_conversation(
        rec,
        fmt_box=lambda b: "".join(f"<{'WIDTH' if i % 2 == 0 else 'HEIGHT'}-{round(x * 149):03d}>" for i, x in
                                  enumerate(b)),
        fmt_point=lambda p: f"<WIDTH-{round(p[0] * 149):03d}><HEIGHT-{round(p[1] * 149):03d}>",
        fmt_segment=lambda s: f"<TEMP-{round(s[0] * 49):03d}><TEMP-{round(s[1] * 49):03d}>",
        fmt_time=lambda t: f"<TEMP-{round(t * 49):03d}>",
    )
    assert tokens == [
        ("user", "When did green-up start in the field at <WIDTH-015><HEIGHT-030><WIDTH-045><HEIGHT-060>?"),
        ("assistant", "Green-up started at <TEMP-012>."),
    ]
    plain = render_conversation(rec, **plain_formatters())
    assert plain[1] == ("assistant", "Green-up started at t=0.250.")
    poly = Turn(role="assistant", text="{polygon:0}", polygons=[[(0.0, 0.0), (1.0, 0.0), (0.5, 1.0)]])
    rec2 = _record(conversation=[{"role": "user", "text": "trace"}, poly.model_dump()])
    assert render_conversation(rec2, **plain_formatters(1))[1][1] == "(0.0, 0.0) (1.0, 0.0) (0.5, 1.0)"


@settings(max_examples=30, deadline=None)
@given(
    box=st.tuples(*[st.floats(0, 1, allow_nan=False)] * 4),
    t=st.floats(0, 1, allow_nan=False),
)
def test_any_valid_positions_round_trip(box: tuple[float, float, float, float], t: float) -> None:
    u1, u2 = sorted(box[::2])
    v1, v2 = sorted(box[1::2])
    rec = _record(conversation=[
        {"role": "user", "text": "{box:0}", "boxes": [[u1, v1, u2, v2]]},
        {"role": "assistant", "text": "{time:0} {segment:0}", "times": [t], "segments": [[min(t, 0.5), max(t, 0.5)]]},
    ])
    back = parse_record(dump_record(rec))
    assert back == rec
    assert all(abs(a - b) <= 5e-7 for a, b in zip(back.conversation[0].boxes[0], (u1, v1, u2, v2), strict=True))
