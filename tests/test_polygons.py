"""Fields as polygons: the codec and the coordinate module round trip, recipes that list outlines, polygon NMS,
and a polygon answer that ends as a polygon feature in the GPKG that the evaluator scores.

The scene is the synthetic one of the recipe tests (real GeoTIFFs), with parcels that no box fits: a rotated
rectangle and an L-shaped field, written in EPSG:4326 so the recipe reprojects them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import shapely
from affine import Affine
from decoded import decoded_answer
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from rasterio.crs import CRS
from rasterio.windows import Window
from rasters import UTM33, UTM_TRANSFORM
from recipes_synth import recipe_yaml, write_scene
from shapely import affinity
from shapely.geometry import Polygon, box

from agrivlm.eval.boundaries import evaluate_fields
from agrivlm.geo.coords import GeoGrid
from agrivlm.infer.generate import Question, Visual
from agrivlm.infer.journal import Journal
from agrivlm.infer.nms import nms
from agrivlm.infer.outputs import detection_frame, suppress, write_outputs
from agrivlm.infer.prompts import lape_formatters, listing_details
from agrivlm.infer.runner import answer_record
from agrivlm.lape.tokens import POLYGON_SEP, Axis, LapeVocab, parse_positions, serialize_polygon
from agrivlm.model.tokenizer import add_agrivlm_tokens, default_tokenizer
from agrivlm.pipeline.frames import TimeAxis
from agrivlm.recipes.build import build_recipe
from agrivlm.recipes.schema import Record, read_records
from agrivlm.tasks.questions import FIELD_AT_POINT_QUESTIONS, NO_FIELD_AT_POINT, OUTLINE_FIELDS_QUESTIONS
from agrivlm.tasks.turns import render_text
from agrivlm.train.data import render_record

VOCAB = LapeVocab()
N = VOCAB.num_spatial
HALF_BIN = 0.5 / N

# -- tokens → CRS polygon → tokens -----------------------------------------------------------------------

grids = st.builds(
    lambda angle, px, w, h: GeoGrid(Affine.translation(465000.0, 5080000.0) * Affine.rotation(angle)
                                    * Affine.scale(px, -px), UTM33, w, h),
    st.sampled_from([0.0, 17.0, -40.0, 90.0]), st.sampled_from([10.0, 0.5]),
    st.integers(16, 512), st.integers(16, 512),
)


@st.composite
def star_rings(draw: st.DrawFn) -> list[tuple[int, int]]:
    """3–8 token-index vertices sorted by angle around a centre: a simple (star-shaped) polygon."""
    k = draw(st.integers(3, 8))
    cx, cy = draw(st.integers(20, N - 21)), draw(st.integers(20, N - 21))
    angles = sorted(draw(st.lists(st.floats(0.0, 2 * math.pi, exclude_max=True), min_size=k, max_size=k,
                                  unique=True)))
    radii = draw(st.lists(st.integers(3, 20), min_size=k, max_size=k))
    return [(cx + round(r * math.cos(a)), cy + round(r * math.sin(a))) for a, r in zip(angles, radii, strict=True)]


@settings(max_examples=150, deadline=None)
@given(grid=grids, ring=star_rings())
def test_polygon_tokens_to_crs_and_back_within_half_a_bin(grid: GeoGrid, ring: list[tuple[int, int]]) -> None:
    assume(len(set(ring)) == len(ring) and Polygon(ring).is_valid and Polygon(ring).area > 0)
    text = POLYGON_SEP.join(VOCAB.token(Axis.WIDTH, i) + VOCAB.token(Axis.HEIGHT, j) for i, j in ring)
    parsed = parse_positions(f"1 field: grassland {text}.", VOCAB)
    assert (len(parsed.polygons), parsed.boxes, parsed.points) == (1, [], [])
    polygon = grid.norm_polygon_to_crs(parsed.polygons[0])
    assert polygon is not None and polygon.is_valid
    xy = np.asarray(polygon.exterior.coords)[:-1]
    u, v = grid.crs_to_norm(xy[:, 0], xy[:, 1])
    centres = np.array(parsed.polygons[0])
    assert np.abs(u - centres[:, 0]).max() <= HALF_BIN and np.abs(v - centres[:, 1]).max() <= HALF_BIN
    assert serialize_polygon(list(zip(u, v, strict=True)), VOCAB) == text  # the same tokens, vertex for vertex
    # the polygon's area in the CRS is the token polygon's, scaled by the pixel area
    px_area = abs(grid.transform.determinant) * grid.width * grid.height
    assert polygon.area == pytest.approx(Polygon(centres).area * px_area, rel=1e-6)  # metres far from 0: float64


def test_a_crossing_ring_is_repaired_and_a_flat_one_dropped() -> None:
    grid = GeoGrid(UTM_TRANSFORM, UTM33, 100, 100)
    bowtie = grid.norm_polygon_to_crs([(0.1, 0.1), (0.5, 0.5), (0.5, 0.1), (0.1, 0.6)])
    assert bowtie is not None and bowtie.is_valid and bowtie.geom_type == "Polygon"
    # the larger of the two lobes: the one towards (0.1, 0.6)
    assert grid.crs_to_norm(*bowtie.centroid.xy)[1][0] > 0.3
    assert grid.norm_polygon_to_crs([(0.1, 0.1), (0.2, 0.2), (0.3, 0.3)]) is None
    assert grid.norm_polygon_to_crs([(0.1, 0.1), (0.2, 0.2)]) is None
    assert grid.norm_polygon_to_crs([(0.1, 0.1), (0.5, 0.1), (0.5, 0.1), (0.1, 0.1)]) is None  # 2 distinct vertices
    repeated = grid.norm_polygon_to_crs([(0.1, 0.1), (0.5, 0.1), (0.5, 0.1), (0.3, 0.4), (0.1, 0.1)])
    assert repeated is not None and len(repeated.exterior.coords) == 3 + 1


# -- recipes -----------------------------------------------------------------------------------------------

def _pixel_poly(coords: list[tuple[float, float]]) -> Polygon:
    """A polygon given in (col, row) pixels of the scene → UTM."""
    return Polygon([UTM_TRANSFORM * c for c in coords])


#: A 20 × 8 px rectangle rotated by 30° around (16, 16) px (its box has IoU ≈ 0.44 with it) and an L-shaped field.
ROTATED = affinity.rotate(_pixel_poly([(6, 12), (26, 12), (26, 20), (6, 20)]), 30.0, origin=UTM_TRANSFORM * (16, 16))
L_SHAPE = _pixel_poly([(36, 36), (60, 36), (60, 44), (44, 44), (44, 60), (36, 60)])
PARCELS = {"R": ROTATED, "L": L_SHAPE}
VERTICES = 8


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("poly_scene")
    paths = write_scene(root)
    gpd.GeoDataFrame({"fid": list(PARCELS), "landuse": ["grassland", "cultivated land"]},
                     geometry=list(PARCELS.values()), crs=UTM33).to_crs(4326).to_file(paths["parcels"])
    text = recipe_yaml(paths, name="poly")
    head = text[:text.index("tasks:")]
    tasks = ("tasks:\n  field_boundaries: {tasks: [outline_fields, outline_parcels, largest_of_class, "
             f"field_at_point], outline_vertices: {VERTICES}, point_prompts: 12}}\n")
    (root / "recipe.yaml").write_text(head + tasks)
    build_recipe(root / "recipe.yaml", root / "out", progress=False)
    records = [r for p in sorted((root / "out" / "shards").glob("*.jsonl")) for r in read_records(p)]
    return {"root": root, "records": records, "parcels": paths["parcels"]}


def _grid(rec: Record) -> GeoGrid:
    return GeoGrid(Affine(*rec.chip.transform), CRS.from_user_input(rec.chip.crs), rec.chip.window.width,
                   rec.chip.window.height)


def _iou(a: shapely.Geometry, b: shapely.Geometry) -> float:
    return float(a.intersection(b).area / a.union(b).area)


def test_listings_answer_polygons_that_fit_rotated_and_l_shaped_parcels(scene) -> None:
    checked, box_ious = 0, []
    for rec in scene["records"]:  # type: ignore[union-attr]
        grid = _grid(rec)
        answer = rec.conversation[-1]
        if rec.task == "largest_of_class":  # grounding answers stay boxes
            assert answer.boxes and not answer.polygons
            continue
        if rec.task == "field_at_point":  # test_field_at_point_answers_the_field_under_the_point
            continue
        assert rec.meta["outline_as"] == "polygon" and "box" not in rec.conversation[0].text  # asked for outlines
        shapes = answer.shapes()
        assert len(shapes) == len(rec.meta["field_ids"])
        # what the model is trained to write decodes back to the same outlines (within half a bin)
        decoded = iter(parse_positions(render_text(answer, **lape_formatters(VOCAB)), VOCAB).polygons)
        for fid, (kind, value), area in zip(rec.meta["field_ids"], shapes, rec.meta["area_px"], strict=True):
            truth = PARCELS[str(fid)].intersection(grid.footprint())
            tokens = next(decoded) if kind == "polygon" else None
            if area < 16:  # a corner of a parcel: too few pixels to outline
                continue
            assert kind == "polygon" and 3 <= len(value) <= VERTICES, (rec.sample_id, fid, value)
            assert _iou(grid.norm_polygon_to_crs(value), truth) >= 0.8, (rec.sample_id, fid)
            assert _iou(grid.norm_polygon_to_crs(tokens), truth) >= 0.8, (rec.sample_id, fid)
            if fid == "R" and truth.area > 0.99 * ROTATED.area:
                us, vs = [p[0] for p in value], [p[1] for p in value]
                box_ious.append(_iou(grid.norm_box_to_polygon((min(us), min(vs), max(us), max(vs))), truth))
            checked += 1
    assert checked >= 4 and box_ious and max(box_ious) < 0.5  # a box could not have matched the rotated field


def test_field_at_point_answers_the_field_under_the_point(scene) -> None:
    hits = misses = 0
    for rec in scene["records"]:  # type: ignore[union-attr]
        if rec.task != "field_at_point":
            continue
        grid = _grid(rec)
        question, answer = rec.conversation
        assert question.text in FIELD_AT_POINT_QUESTIONS and len(question.points) == 1
        (u, v), = question.points
        x, y = grid.norm_to_crs(u, v)
        pt = shapely.Point(float(x), float(y))
        under = [fid for fid, geom in PARCELS.items() if geom.contains(pt)]
        # never on an edge: at least a pixel away from every parcel outline
        assert all(g.exterior.distance(pt) >= 10.0 - 1e-6 for g in PARCELS.values())
        if not under:
            assert answer.text == NO_FIELD_AT_POINT and rec.meta["field_id"] is None
            misses += 1
            continue
        assert rec.meta["field_id"] == under[0]
        kind, value = answer.shapes()[0]
        outline = grid.norm_polygon_to_crs(value) if kind == "polygon" else grid.norm_box_to_polygon(value)
        assert outline.buffer(5.0).contains(pt)  # the answer's outline holds its point
        truth = PARCELS[under[0]].intersection(grid.footprint())
        if rec.meta["area_px"] >= 16:
            assert _iou(outline, truth) >= 0.8, rec.sample_id
        hits += 1
    assert hits >= 5 and misses >= 5  # both answers occur: fields and the land between them


def test_points_per_record_asks_the_same_points_in_one_conversation(scene, tmp_path: Path) -> None:
    """``points_per_record: 5``: a chip's 12 point questions in conversations of 5, 5 and 2 turns, the same
    questions and answers as one record each, rendered with every answer supervised."""
    root: Path = scene["root"]  # type: ignore[assignment]
    text = (root / "recipe.yaml").read_text().replace("point_prompts: 12", "point_prompts: 12, points_per_record: 5")
    (tmp_path / "recipe.yaml").write_text(text)
    build_recipe(tmp_path / "recipe.yaml", tmp_path / "out", progress=False)
    grouped = [r for p in sorted((tmp_path / "out" / "shards").glob("*.jsonl")) for r in read_records(p)
               if r.task == "field_at_point"]
    single = [r for r in scene["records"] if r.task == "field_at_point"]  # type: ignore[union-attr]
    by_chip: dict[str, list[Record]] = {}
    for r in single:
        by_chip.setdefault(r.chip.chip_id, []).append(r)
    assert grouped and {r.chip.chip_id for r in grouped} == set(by_chip)
    for rec in grouped:
        turns = rec.conversation
        assert [t.role for t in turns] == ["user", "assistant"] * (len(turns) // 2) and 2 <= len(turns) <= 10
        assert len(rec.meta["field_ids"]) == len(rec.meta["point_u"]) == len(turns) // 2
    def first_point(r: Record) -> int:  # subject "p7" or "p5-9"
        return int(r.sample_id.rsplit("p", 1)[1].split("-")[0])

    for chip_id, recs in by_chip.items():
        mine = sorted((r for r in grouped if r.chip.chip_id == chip_id), key=first_point)
        recs = sorted(recs, key=first_point)
        assert [t for r in mine for t in r.conversation] == [t for r in recs for t in r.conversation]
        assert [f for r in mine for f in r.meta["field_ids"]] == [r.meta["field_id"] or "" for r in recs]
    prompt, answer, values = render_record(grouped[0], VOCAB)
    assert isinstance(answer, list) and len(answer) == len(grouped[0].conversation) - 1
    assert prompt.count("USER: ") == 1 and all(a.startswith("USER: ") for a in answer[1::2])
    assert len(values) == sum(2 * len(t.points) + 4 * len(t.boxes) + 2 * sum(map(len, t.polygons))
                              for t in grouped[0].conversation)


def test_outline_as_box_keeps_the_box_listing(scene, tmp_path: Path) -> None:
    root: Path = scene["root"]  # type: ignore[assignment]
    text = (root / "recipe.yaml").read_text().replace(f"outline_vertices: {VERTICES}", "outline_as: box")
    (tmp_path / "recipe.yaml").write_text(text)
    build_recipe(tmp_path / "recipe.yaml", tmp_path / "out", progress=False)
    recs = [r for p in sorted((tmp_path / "out" / "shards").glob("*.jsonl")) for r in read_records(p)]
    listings = [r for r in recs if r.task == "outline_fields" and r.meta["field_ids"]]
    assert listings and all(r.conversation[-1].polygons == [] and r.conversation[-1].boxes for r in listings)
    assert all(r.conversation[0].text in OUTLINE_FIELDS_QUESTIONS for r in listings)


# -- NMS by polygon IoU --------------------------------------------------------------------------------------

def test_nms_uses_polygon_iou_not_box_iou() -> None:
    # two parallel diagonal strips: their boxes overlap by IoU ≈ 0.8 but the strips do not touch
    strip = Polygon([(0, 0), (2, 0), (102, 100), (100, 100)])
    other = affinity.translate(strip, 10, 0)
    assert _iou(box(*strip.bounds), box(*other.bounds)) > 0.8 and not strip.intersects(other)
    assert nms(np.array([strip, other], dtype=object), np.array([0.9, 0.8]), 0.5).tolist() == [0, 1]
    # the rotated field seen by two chips, one showing it whole, one cutting it: the whole one stays
    cut = ROTATED.intersection(box(*(UTM_TRANSFORM * (0, 32)), *(UTM_TRANSFORM * (20, 0))))
    assert 0.5 < _iou(cut, ROTATED) < 0.9
    geoms = np.array([cut, ROTATED], dtype=object)
    assert nms(geoms, np.array([0.9, 0.6]), 0.5, priority=np.array([0, 1])).tolist() == [1]
    # a field's outline and its box overlap by IoU ≈ 0.44 only: both stay at 0.5 (box IoU would be 1)
    pair = np.array([ROTATED, box(*ROTATED.bounds)], dtype=object)
    assert nms(pair, np.array([0.6, 0.9]), 0.5).tolist() == [0, 1]
    assert nms(pair, np.array([0.6, 0.9]), 0.4).tolist() == [1]


# -- inference → GPKG → evaluator --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    tok = default_tokenizer()
    add_agrivlm_tokens(tok, VOCAB)
    return tok




def test_polygon_answers_become_polygon_features_in_the_gpkg_and_are_scored_as_polygons(
    scene, tokenizer, tmp_path: Path
) -> None:
    offset = tokenizer.convert_tokens_to_ids(VOCAB.token(Axis.HEIGHT, 0))
    listings = sorted((r for r in scene["records"] if r.task == "outline_fields"),  # type: ignore[union-attr]
                      key=lambda r: r.chip.chip_id)
    chips, n_polygons = [], 0
    for index, rec in enumerate(listings):
        text = render_text(rec.conversation[-1], **lape_formatters(VOCAB))
        answer = decoded_answer(text, tokenizer, offset)
        assert len(answer.positions.polygons) == len(rec.conversation[-1].polygons)
        assert len(listing_details(answer.text, len(answer.positions.polygons) + len(answer.positions.boxes))) == len(
            rec.meta["field_ids"])
        dates = np.array(rec.chip.frame_dates, dtype="datetime64[s]")
        question = Question(Visual(np.zeros((len(dates), 1, 32, 32), np.float32), np.linspace(0, 1, len(dates)),
                                   dates, TimeAxis.from_dates(dates)), "Outline every field in this image.")
        out = answer_record("fields", _grid(rec), question, answer, tokenizer.decode)
        assert not out["unparsed"] and out["degenerate"] == 0
        n_polygons += sum(f["kind"] == "polygon" for f in out["features"])
        chips.append({"chip_id": rec.chip.chip_id, "index": index, "status": "ok", "note": "", "answers": [out]})
    assert n_polygons >= 2
    journal = Journal.open(tmp_path / "run.journal.jsonl", {"test": 1})
    journal.append({"type": "stack", "stack": "S", "name": "scene", "crs": UTM33.to_wkt()})
    journal.append({"type": "chips", "stack": "S", "chips": chips})
    frame = suppress(detection_frame(journal, ["S"], ["scene"], "fields"), 0.5)
    journal.close()
    write_outputs(tmp_path / "pred.gpkg", "fields", frame, None)

    layer = gpd.read_file(tmp_path / "pred.gpkg", layer="fields")
    assert pyogrio.read_info(tmp_path / "pred.gpkg", layer="fields")["geometry_type"] == "Polygon"
    whole = layer[~layer["cut"].astype(bool)]
    assert set(layer["shape"]) == {"polygon"} and len(whole) >= 2
    # the polygon column holds the outline, not its box: the rotated field has more than the box's area
    # fraction of it (a box would have IoU ≈ 0.44), and ``tokens`` decode back to the same polygon
    for _, row in whole.iterrows():
        truth = max(PARCELS.values(), key=lambda p: _iou(p, row.geometry))
        assert _iou(row.geometry, truth) >= 0.8
        assert len(parse_positions(row["tokens"], VOCAB).polygons) == 1
        assert 0 <= row["box_u1"] < row["box_u2"] <= 1 and 0 <= row["box_v1"] < row["box_v2"] <= 1
    result = evaluate_fields(tmp_path / "pred.gpkg", scene["parcels"], iou_threshold=0.5)
    scores = result.to_dict()
    assert scores["recall"] == 1.0, scores
    assert result.per_field.query("kind == 'truth'")["iou"].min() >= 0.8
    # had the fields been answered as boxes, the rotated one would be lost at IoU 0.5
    boxed = evaluate_fields(layer.assign(geometry=layer.envelope), scene["parcels"], iou_threshold=0.5)
    assert boxed.to_dict()["recall"] < 1.0


def test_point_prompt_answers_keep_only_outlines_that_hold_their_point(scene, tokenizer) -> None:
    offset = tokenizer.convert_tokens_to_ids(VOCAB.token(Axis.HEIGHT, 0))
    recs = [r for r in scene["records"] if r.task == "field_at_point" and r.meta["field_id"]]  # type: ignore[union-attr]
    rec = recs[0]
    grid = _grid(rec)
    text = render_text(rec.conversation[-1], **lape_formatters(VOCAB))
    answer = decoded_answer(text, tokenizer, offset)
    dates = np.array(rec.chip.frame_dates, dtype="datetime64[s]")
    visual = Visual(np.zeros((len(dates), 1, 32, 32), np.float32), np.linspace(0, 1, len(dates)), dates,
                    TimeAxis.from_dates(dates))
    point = rec.conversation[0].points[0]
    kept = answer_record("fields", grid, Question(visual, "q", meta={"point": list(point)}), answer, tokenizer.decode)
    assert len(kept["features"]) == 1 and kept["off_point"] == 0 and kept["features"][0]["label"] == rec.meta["cls"]
    # the same outline as the answer about a point far outside it is another field's: dropped
    shapes = rec.conversation[-1].shapes()[0][1]
    us = [p[0] for p in shapes] if len(shapes[0]) == 2 else [shapes[0], shapes[2]]
    far = (0.02 if min(us) > 0.5 else 0.98, point[1])
    dropped = answer_record("fields", grid, Question(visual, "q", meta={"point": list(far)}), answer, tokenizer.decode)
    assert dropped["features"] == [] and dropped["off_point"] == 1
    no = decoded_answer(NO_FIELD_AT_POINT, tokenizer, offset)
    none = answer_record("fields", grid, Question(visual, "q", meta={"point": list(point)}), no, tokenizer.decode)
    assert none["features"] == [] and not none["unparsed"]


# -- the whole chain with a model: trained on outlines, `agrivlm infer` writes outlines, `agrivlm eval` scores them


def test_a_model_trained_on_outlines_answers_outlines_through_infer_and_eval(
    one_torch_thread, sample_root: Path, tmp_path: Path
) -> None:
    from infer_model import polygon_checkpoint, training_set
    from typer.testing import CliRunner

    from agrivlm.cli import app
    from agrivlm.geo import open_stack
    from agrivlm.infer.outputs import journal_path

    folder, stats = polygon_checkpoint()
    assert stats["last_loss"] < 0.15 * stats["first_loss"], stats
    out = tmp_path / "pred.gpkg"
    res = CliRunner().invoke(app, ["infer", str(sample_root / "ndvi"), "--masks", str(sample_root / "cloud_mask"),
                                   "--model", str(folder), "--task", "fields", "--out", str(out), "--device", "cpu",
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    pred = gpd.read_file(out, layer="fields")
    assert (pred["shape"] == "polygon").sum() >= 3 and (pred.geometry.geom_type == "Polygon").all()
    assert pred.geometry.is_valid.all()
    # on the chips it was trained on, the outline written back is the trained one (IoU in the chip's CRS)
    stack = open_stack(sample_root / "ndvi")
    _, answers, positions, chip_ids = training_set("polygon")
    entries = [json.loads(line) for line in journal_path(out).read_text().splitlines()]
    by_chip = {c["chip_id"]: c for e in entries if e.get("type") == "chips" for c in e["chips"]}
    ious = []
    for answer, target, cid in zip(answers, positions, chip_ids, strict=True):
        if not answer.startswith("1 field"):
            continue
        row, col = (int(x[1:]) for x in cid.split("_"))
        grid = stack.grid.subgrid(Window(col, row, 32, 32))
        truth = grid.norm_polygon_to_crs(list(zip(target[0::2], target[1::2], strict=True)))
        feats = [f for f in by_chip[cid]["answers"][0]["features"] if f["kind"] == "polygon"]
        ious.append(_iou(shapely.from_wkb(feats[0]["geometry"]), truth) if feats and truth is not None else 0.0)
    assert sum(x > 0.8 for x in ious) >= 3, ious
    res = CliRunner().invoke(app, ["eval", "fields", "--pred", str(out), "--truth", str(sample_root / "parcels.gpkg"),
                                   "--out", str(tmp_path / "eval")])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["n_pred"] == len(pred) and summary["boxes"] is False
