"""The recipes on the embedded sample (68 dates, cloud masks, 88 parcels): content, splits, mixture, bytes."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import geopandas as gpd
import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pyogrio
import pytest
from affine import Affine
from shapely.geometry import Polygon

from agrivlm.errors import ConfigError
from agrivlm.recipes.build import arrange, build_pools, build_recipe, prepare
from agrivlm.recipes.config import load_recipe
from agrivlm.recipes.mixture import mix
from agrivlm.recipes.phenology import key_date_table, stage_table
from agrivlm.recipes.schema import Record, dump_record, read_records, write_records
from agrivlm.resources import recipes_dir
from agrivlm.sample import sample_parcels
from agrivlm.schema import GROWTH_STAGES, KEY_DATE_COLUMNS, STAGE_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
RECIPES = recipes_dir()
STAGE2 = RECIPES / "stage2.yaml"
SPLITS = ("train", "val", "test")
#: Tokens per spatial axis used for the token round-trip check (agrivlm's default: 150).
N_SPATIAL_TOKENS = 150


def agrivlm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agrivlm.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def cli_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("cli") / "stage2"
    res = agrivlm("recipe", "build", "--recipe", str(STAGE2), "--out", str(out), "--no-progress")
    assert res.returncode == 0, res.stderr
    return out, res.stdout


@pytest.fixture(scope="module")
def api_build(cli_build):
    """The same recipe built again in this process (pools kept for the checks); outputs are the CLI's."""
    cfg = load_recipe(STAGE2)
    prep = prepare(cfg, RECIPES, progress=False)
    pools = build_pools(prep, progress=False)
    arranged, _ = arrange(prep, pools)
    return prep, pools, cli_build[0], arranged


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "shards").glob("*.jsonl"))}


def test_same_recipe_and_seed_give_the_same_bytes_and_another_seed_does_not(
    cli_build, api_build, tmp_path: Path
) -> None:
    cli_out, stdout = cli_build
    prep, _, _, arranged = api_build
    a = _files(cli_out)
    assert list(a) == ["shards/test-00000.jsonl", "shards/train-00000.jsonl", "shards/val-00000.jsonl"]
    for split in SPLITS:
        write_records(tmp_path / f"{split}.jsonl", arranged[split])
        assert (tmp_path / f"{split}.jsonl").read_bytes() == a[f"shards/{split}-00000.jsonl"], (
            "a separate process and this one made different shards"
        )
    truth = prep.state.truth
    assert stage_table(truth, list(prep.stack.times)).to_csv(index=False) == (
        cli_out / "tables" / "growth_stages.csv").read_text()
    assert key_date_table(truth, [s[0] for s in prep.state.seasons]).to_csv(index=False) == (
        cli_out / "tables" / "key_dates.csv").read_text()
    # the parcel layers too: a GeoPackage carries no time of writing (agrivlm.io.fixed_gpkg_date)
    from agrivlm.recipes.build import _write_parcels

    _write_parcels(prep, tmp_path / "parcels.gpkg")
    assert (tmp_path / "parcels.gpkg").read_bytes() == next((cli_out / "tables").rglob("parcels.gpkg")).read_bytes()
    manifest = json.loads((cli_out / "manifest.json").read_text())
    for shard in manifest["shards"]:
        assert hashlib.sha256(a[shard["path"]]).hexdigest() == shard["sha256"]
    # another seed: other phrasings, dates and mixture draws
    reseeded = dataclasses.replace(prep, cfg=prep.cfg.model_copy(update={"seed": 1}),
                                   state=dataclasses.replace(prep.state, seed=1))
    other, _ = arrange(reseeded, build_pools(reseeded, progress=False))
    assert "\n".join(dump_record(r) for r in other["train"]) != a["shards/train-00000.jsonl"].decode().rstrip("\n")
    # the CLI printed its summary
    assert "records" in stdout and "mixture" in stdout and "phenology" in stdout


def _chip_polygon(rec: Record) -> tuple[Polygon, Affine]:
    t = Affine(*rec.chip.transform)
    w, h = rec.chip.window.width, rec.chip.window.height
    return Polygon([t * (0, 0), t * (w, 0), t * (w, h), t * (0, h)]), t


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _box_bounds(t: Affine, w: int, h: int, box: tuple[float, ...]) -> tuple[float, float, float, float]:
    corners = [t * (u * w, v * h) for u, v in ((box[0], box[1]), (box[2], box[1]), (box[2], box[3]), (box[0], box[3]))]
    xs, ys = zip(*corners, strict=True)
    return min(xs), min(ys), max(xs), max(ys)


#: Tasks whose boxes, across all turns in order, are the parcels of meta.field_ids (or meta.field_id).
BOXED = {
    "field_boundaries": {"outline_fields", "outline_parcels", "largest_of_class", "trace_outline", "edge_fields"},
    "growth_stages": {"green_up_date", "peak_date", "senescence_date", "season_segment", "stage_on_date",
                      "stage_timeline"},
    "spatial_reasoning": {"left_right", "above_below", "nearest", "largest", "adjacent"},
}


def test_boxes_cover_their_parcels_clipped_footprint(api_build) -> None:
    """Every parcel box, read back through the chip's own transform, has IoU ≥ 0.99 with the parcel's
    bounds clipped to the chip (computed here from the raw GeoPackage), and quantized to 150 tokens per axis
    each of its edges is within half a token of the true edge."""
    _, pools, _, _ = api_build
    raw = gpd.read_file(sample_parcels())
    geoms = dict(zip(raw["index"].astype(str), raw.geometry, strict=True))
    checked, cut_seen, ious = 0, 0, []
    step = 1.0 / (N_SPATIAL_TOKENS - 1)
    for family, tasks in BOXED.items():
        for rec in pools[family]:
            if rec.task not in tasks:
                continue
            if rec.meta.get("outline_as") == "polygon":
                continue  # listed outlines: test_listed_outlines_fit_their_parcels_clipped_footprint
            boxes = [b for turn in rec.conversation for b in turn.boxes]
            ids = rec.meta["field_ids"] if "field_ids" in rec.meta else [rec.meta["field_id"]]
            assert isinstance(ids, list) and len(ids) == len(boxes), rec.sample_id
            footprint, t = _chip_polygon(rec)
            w, h = rec.chip.window.width, rec.chip.window.height
            cut_flags = rec.meta.get("cut")
            for k, (fid, box) in enumerate(zip(ids, boxes, strict=True)):
                clipped = geoms[str(fid)].intersection(footprint)
                truth = clipped.bounds
                iou = _iou(_box_bounds(t, w, h, box), truth)
                ious.append(iou)
                assert iou >= 0.99, (rec.sample_id, fid, iou)
                # token round trip: every edge of the quantized box is within half a token of the true edge
                cols, rows = zip(*(~t * xy for xy in ((truth[0], truth[1]), (truth[2], truth[3]))), strict=True)
                true_box = (min(cols) / w, min(rows) / h, max(cols) / w, max(rows) / h)
                q = tuple(round(x / step) * step for x in box)
                assert max(abs(a - b) for a, b in zip(q, true_box, strict=True)) <= step / 2 + 1e-5
                if isinstance(cut_flags, list) and family == "field_boundaries":
                    is_cut = clipped.area < geoms[str(fid)].area * (1 - 1e-6)
                    assert cut_flags[k] == is_cut, (rec.sample_id, fid)
                    cut_seen += is_cut
                checked += 1
    assert checked > 1000 and cut_seen > 50
    assert float(np.median(ious)) > 0.9999


def test_listed_outlines_fit_their_parcels_clipped_footprint(api_build) -> None:
    """Listings answer outlines (``outline_as: polygon``): every item is a polygon of at most ``outline_vertices``
    points (or, for a parcel whose outline simplifies to under 3 points, its box) whose polygon, read back
    through the chip's own grid, covers the parcel clipped to the chip (median IoU ≥ 0.9; each ≥ 0.5 with the
    largest part the chip shows, for parts of 16 px or more), better than the parcel's box does on average."""
    prep, pools, _, _ = api_build
    limit = prep.cfg.tasks.field_boundaries.outline_vertices
    raw = gpd.read_file(sample_parcels())
    geoms = dict(zip(raw["index"].astype(str), raw.geometry, strict=True))
    ious, box_ious, n_boxes = [], [], 0
    for rec in pools["field_boundaries"]:
        if rec.task not in ("outline_fields", "outline_parcels"):
            continue
        assert rec.meta["outline_as"] == "polygon"
        footprint, t = _chip_polygon(rec)
        w, h = rec.chip.window.width, rec.chip.window.height
        shapes = rec.conversation[-1].shapes()
        assert len(shapes) == len(rec.meta["field_ids"]), rec.sample_id
        for fid, (kind, shape) in zip(rec.meta["field_ids"], shapes, strict=True):
            clipped = geoms[str(fid)].intersection(footprint)
            if kind == "box":
                n_boxes += 1
                continue
            assert 3 <= len(shape) <= limit, (rec.sample_id, fid, len(shape))
            outline = Polygon([t * (u * w, v * h) for u, v in shape]).buffer(0)
            ious.append(outline.intersection(clipped).area / outline.union(clipped).area)
            part = max(getattr(clipped, "geoms", [clipped]), key=lambda g: g.area)
            if part.area >= 16 * abs(t.determinant):
                iou = outline.intersection(part).area / outline.union(part).area
                assert iou >= 0.5, (rec.sample_id, fid, iou)
            bounds = Polygon.from_bounds(*_box_bounds(t, w, h, (min(p[0] for p in shape), min(p[1] for p in shape),
                                                                max(p[0] for p in shape), max(p[1] for p in shape))))
            box_ious.append(bounds.intersection(clipped).area / bounds.union(clipped).area)
    assert len(ious) > 100 and n_boxes < 0.05 * len(ious)
    assert float(np.median(ious)) >= 0.9 and float(np.mean(ious)) > float(np.mean(box_ious))


def test_growth_answers_agree_with_the_reference_tables(api_build) -> None:
    _, pools, out, _ = api_build
    keys = pd.read_csv(out / "tables" / "key_dates.csv", dtype=str, keep_default_na=False)
    stages = pd.read_csv(out / "tables" / "growth_stages.csv", dtype=str, keep_default_na=False)
    assert list(keys.columns) == list(KEY_DATE_COLUMNS) and list(stages.columns) == list(STAGE_COLUMNS)
    assert set(stages.stage) <= set(GROWTH_STAGES) and set(stages.stage) >= {"dormant", "green-up", "peak"}
    key_of = {(r.field_id, r.season): r for r in keys.itertuples(index=False)}
    stage_of = {(r.field_id, r.date): r.stage for r in stages.itertuples(index=False)}
    column = {"green_up_date": "green_up", "peak_date": "peak", "senescence_date": "senescence"}
    n = Counter()
    for rec in pools["growth_stages"]:
        axis = rec.chip.time_axis
        season = str(rec.meta["season"])
        assert all(d.startswith(season) for d in rec.chip.frame_dates), "frames are the season's"
        if rec.task in column:
            (t,) = rec.conversation[-1].times
            when = axis.from_norm(t)
            expected = getattr(key_of[(str(rec.meta["field_id"]), season)], column[rec.task])
            diff = abs((when - np.datetime64(expected + "T00:00:00")) / np.timedelta64(1, "h"))
            assert diff < 24 + 1, (rec.sample_id, str(when), expected)  # the table holds the calendar day
            n[rec.task] += 1
        elif rec.task == "stage_on_date":
            assert rec.conversation[-1].text == stage_of[(str(rec.meta["field_id"]), str(rec.meta["date"]))]
            n[rec.task] += 1
    assert min(n.values()) > 50 and len(n) == 4


def test_split_is_by_geography_with_no_overlap_across_splits(api_build) -> None:
    prep, pools, out, _ = api_build
    manifest = json.loads((out / "manifest.json").read_text())
    windows = manifest["chips"]["windows"]
    split_of = {cid: s for s, ids in manifest["chips"]["by_split"].items() for cid in ids}
    assert {s: len(ids) for s, ids in manifest["chips"]["by_split"].items()} == {"train": 12, "val": 4, "test": 4}
    buffer = prep.cfg.split.buffer_px
    for (a, wa), (b, wb) in itertools.combinations(windows.items(), 2):
        if split_of[a] != split_of[b]:
            (ca, ra, w_a, h_a), (cb, rb, w_b, h_b) = wa, wb
            apart = (ca + w_a + buffer <= cb or cb + w_b + buffer <= ca
                     or ra + h_a + buffer <= rb or rb + h_b + buffer <= ra)
            assert apart, (a, b)
    assert manifest["chips"]["excluded_buffer"], "some chips straddled splits and were left out"
    records = manifest["records"]
    for shard in manifest["shards"]:
        for rec in read_records(out / shard["path"]):
            assert rec.split == shard["split"] == records[rec.sample_id] == split_of[rec.chip.chip_id]
    for fam in pools.values():
        assert all(r.split == split_of[r.chip.chip_id] for r in fam)


def test_mixture_proportions_match_the_config(api_build) -> None:
    _, pools, out, _ = api_build
    manifest = json.loads((out / "manifest.json").read_text())
    weights = {"remote_sensing_general": 0.4, "agricultural": 0.4, "spatial_reasoning": 0.2}
    component = {"general_rs": "remote_sensing_general", "field_boundaries": "agricultural",
                 "growth_stages": "agricultural", "spatial_reasoning": "spatial_reasoning"}
    train = read_records(out / "shards" / "train-00000.jsonl")
    assert len(train) == 2000 and manifest["mixture"]["train"]["total"] == 2000
    got = Counter(component[r.family] for r in train)
    for comp, w in weights.items():
        assert abs(got[comp] / len(train) - w) <= 0.02
        assert abs(manifest["mixture"]["train"]["proportions"][comp] - w) <= 0.02
    assert manifest["mixture"]["val"]["repeats"] == dict.fromkeys(weights, 0), "max_unique never repeats"
    # many draws from the pools built once: the quotas hold at every size and seed
    train_pools = {
        "remote_sensing_general": [r for r in pools["general_rs"] if r.split == "train"],
        "agricultural": [r for f in ("field_boundaries", "growth_stages") for r in pools[f] if r.split == "train"],
        "spatial_reasoning": [r for r in pools["spatial_reasoning"] if r.split == "train"],
    }
    for n, seed in ((1000, 0), (1337, 5), (5000, 9)):
        drawn, report = mix(train_pools, weights, n, seed)
        counts = Counter(component[r.family] for r in drawn)
        assert len(drawn) == n
        for comp, w in weights.items():
            assert abs(counts[comp] / n - w) <= 0.02 and report.proportions[comp] == counts[comp] / n


def test_a_mixture_component_can_hold_chosen_tasks_only(api_build) -> None:
    """``tasks:`` on a component pools only those tasks of its families; a task of another family is refused."""
    prep, pools, _, _ = api_build
    comps = {
        "asked": {"families": ["field_boundaries", "growth_stages"], "tasks": ["field_at_point", "stage_on_date"],
                  "weight": 0.5},
        "agricultural": {"families": ["field_boundaries", "growth_stages"], "weight": 0.5},
    }
    raw = prep.cfg.model_dump()
    raw["mixture"] = {"components": comps, "samples": {"train": 1000, "val": "max_unique", "test": "max_unique"}}
    cfg = type(prep.cfg).model_validate(raw)
    arranged, reports = arrange(dataclasses.replace(prep, cfg=cfg), pools)
    train = arranged["train"]
    assert len(train) == 1000 and reports["train"].proportions == {"asked": 0.5, "agricultural": 0.5}
    asked = Counter(r.task for r in train)
    every = Counter(r.task for f in ("field_boundaries", "growth_stages") for r in pools[f] if r.split == "train")
    share = (asked["field_at_point"] + asked["stage_on_date"]) / len(train)
    base = (every["field_at_point"] + every["stage_on_date"]) / sum(every.values())
    # half the samples from the asked pool, half from all: the asked tasks' share is 0.5 + 0.5 × their base share
    assert abs(share - (0.5 + 0.5 * base)) <= 0.04, (share, base)
    raw["mixture"]["components"]["asked"]["tasks"] = ["field_at_point", "caption"]
    with pytest.raises(ValueError, match=r"mixture.components.asked.tasks: caption not a task of field_boundaries"):
        type(prep.cfg).model_validate(raw)


def test_outputs_tables_plots_and_manifest(api_build, sample_root: Path) -> None:
    _, _, out, _ = api_build
    manifest = json.loads((out / "manifest.json").read_text())
    stack_files = manifest["sources"]["stack"]["files"]
    assert len(stack_files) == 68 and len(manifest["sources"]["masks"]["files"]) == 68
    name = "S2_NDVI_20160526T100611.tif"
    assert stack_files[name] == hashlib.sha256((sample_root / "ndvi" / name).read_bytes()).hexdigest()
    assert manifest["parcels"]["read"] == 88 and manifest["stack"]["n_dates"] == 68
    assert manifest["seeds"] == {"recipe": 0, "split": 0}
    for fam in ("field_boundaries", "growth_stages", "general_rs", "spatial_reasoning"):
        assert sum(manifest["counts"]["by_family"][fam].values()) > 0
    seasons = manifest["phenology"]["seasons"]
    assert set(seasons) == {"2016", "2017"} and seasons["2016"]["fields"] >= 40
    assert "2016-02" <= seasons["2016"]["median"]["sos"] <= "2016-04" < seasons["2016"]["median"]["pos"]
    layers = dict(pyogrio.list_layers(out / "tables" / "parcels.gpkg"))
    assert set(layers) == {"parcels", "chip_parcels"}
    clipped = gpd.read_file(out / "tables" / "parcels.gpkg", layer="parcels")
    assert len(clipped) == 88 and clipped.crs.to_epsg() == 32633 and clipped.cut_by_stack.sum() == 88 - 62
    for png in ("phenology.png", "splits.png"):
        img = mpimg.imread(out / "plots" / png)
        assert img.ndim == 3 and img.shape[0] > 300 and img.std() > 0.05


def test_every_recipe_file_builds_on_the_sample(api_build) -> None:
    """The family and stage recipes share the stage-2 sources (via extends), so its scan is reused here, on
    one chip of each split to keep the test short."""
    prep, _, _, _ = api_build
    one_per_split = [next(c for c in prep.chips if c.split == s) for s in SPLITS]
    files = sorted(p for p in RECIPES.glob("*.yaml") if not p.name.endswith("_base.yaml"))
    assert [p.stem for p in files] == ["field_boundaries", "general_rs", "growth_stages", "spatial_reasoning",
                                       "stage1", "stage2", "stage3", "synthetic_mixed", "synthetic_stage1",
                                       "synthetic_stage2", "synthetic_stage3", "synthetic_stage3_fields",
                                       "synthetic_stage3_focus"]
    # the synthetic ones read scene folders (built in tests/test_recipes_sources.py); here the sample's
    for path in (p for p in files if not p.stem.startswith("synthetic_")):
        cfg = load_recipe(path)
        for part in ("source", "chips", "split", "phenology"):
            assert getattr(cfg, part) == getattr(prep.cfg, part), (path.name, part)
        alt = dataclasses.replace(prep, cfg=cfg, chips=one_per_split)
        arranged, reports = arrange(alt, build_pools(alt, progress=False))
        assert all(arranged[s] for s in SPLITS), path.name
        if path.stem == "stage1":
            assert not any(r.has_positions for s in SPLITS for r in arranged[s]), "stage 1 has no positions"
        if cfg.mixture is None:
            assert {r.family for s in SPLITS for r in arranged[s]} == set(cfg.tasks.enabled())
        else:
            assert reports["train"].total == cfg.mixture.samples["train"]


def test_bad_recipes_and_existing_outputs_are_clear_errors(tmp_path: Path, cli_build) -> None:
    out, _ = cli_build
    with pytest.raises(ConfigError, match="already exists and is not empty; pass --overwrite"):
        build_recipe(STAGE2, out, progress=False)
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"extends: {RECIPES / 'sample_base.yaml'}\nname: x\ntasks:\n  growth_stage: {{}}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: tasks.growth_stage: unknown key"):
        load_recipe(bad)
    bad.write_text(f"extends: {RECIPES / 'stage2.yaml'}\nmixture:\n  components:\n    a: {{families: [general_rs], "
                   "weight: 0.5}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: mixture.components: .*weights must sum to 1"):
        load_recipe(bad)


def test_parcels_that_miss_the_stack_are_refused(tmp_path: Path, sample_root: Path) -> None:
    """Parcels 100 km off (a wrong CRS label) or an empty layer would make every answer 'no fields': refused."""
    parcels = gpd.read_file(sample_root / "parcels.gpkg")
    parcels.set_geometry(parcels.geometry.translate(0.0, 100_000.0)).to_file(tmp_path / "off.gpkg")
    parcels.iloc[:0].to_file(tmp_path / "none.gpkg")
    for name, msg in (("off.gpkg", r"off.gpkg: has 88 parcels, none on the stack \(parcels \(.*check the layer's CRS"),
                      ("none.gpkg", r"none.gpkg: holds no parcels")):
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(f"extends: {RECIPES / 'field_boundaries.yaml'}\nsource:\n  parcels: {tmp_path / name}\n")
        with pytest.raises(ConfigError, match=msg):
            build_recipe(recipe, tmp_path / f"out_{name}", progress=False)
        assert not (tmp_path / f"out_{name}").exists()
