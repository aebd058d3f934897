"""Recipes over several sources: synthetic scene folders (``synth:``), whole scenes per split, truth labels,
and a real ``sample:`` source mixed with synthetic scenes by weight."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from recipes_synth import write_synth_scene

from agrivlm.errors import ConfigError
from agrivlm.recipes.build import build_recipe
from agrivlm.recipes.config import RecipeConfig, load_recipe
from agrivlm.recipes.schema import FAMILIES, Record, read_records
from agrivlm.recipes.sources import resolve_sources
from agrivlm.resources import recipes_dir
from agrivlm.train.data import read_split

ROOT = Path(__file__).resolve().parents[1]
RECIPES = recipes_dir()
SPLITS = ("train", "val", "test")
#: Field A's truth is moved 45 days later than its NDVI season in scene s1 (derived stages would differ).
SHIFT = {"A": 45.0}

THREE_SCENES = """
name: three
seed: 0
sources:
  - synth: scenes/*
    split: {fractions: {train: 0.5, val: 0.25, test: 0.25}, seed: 4}
chips: {size: 32, stride: 16, min_clear: 0.6, max_frames: 24, min_frames: 4}
phenology: {min_pixels: 6}
tasks:
  field_boundaries: {}
  growth_stages: {stage_questions: 4}
  general_rs: {}
  spatial_reasoning: {}
"""


def _records(out: Path) -> list[Record]:
    return [r for p in sorted((out / "shards").glob("*.jsonl")) for r in read_records(p)]


def _scene_of(rec: Record) -> str:
    return rec.chip.chip_id.split("/")[0]


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("three")
    for seed in range(3):
        write_synth_scene(root / "scenes" / f"s{seed}", seed=seed, truth_shift=SHIFT if seed == 1 else None)
    (root / "recipe.yaml").write_text(THREE_SCENES)
    manifest = build_recipe(root / "recipe.yaml", root / "out", progress=False)
    return {"root": root, "out": root / "out", "manifest": manifest, "records": _records(root / "out")}


def test_each_scene_goes_wholly_to_one_split_with_every_family(three) -> None:
    splits: dict[str, set[str]] = defaultdict(set)
    families: dict[str, set[str]] = defaultdict(set)
    for rec in three["records"]:
        splits[_scene_of(rec)].add(rec.split)
        families[_scene_of(rec)].add(rec.family)
        assert rec.stack.data == str((three["root"] / "scenes" / _scene_of(rec) / "stack").resolve())
    assert sorted(splits) == ["s0", "s1", "s2"]
    assert all(len(s) == 1 for s in splits.values()), dict(splits)
    assert sorted(next(iter(s)) for s in splits.values()) == sorted(SPLITS), "3 scenes, 3 splits: one each"
    assert all(f == set(FAMILIES) for f in families.values()), dict(families)
    m = three["manifest"]
    assert m["split"]["scenes"] == {k: next(iter(v)) for k, v in splits.items()}
    assert m["chips"]["excluded_buffer"] == [] and m["chips"]["kept"] == m["chips"]["grid"] == 27
    assert [s["name"] for s in m["sources"]] == ["s0", "s1", "s2"] and m["sources"][1]["scene"]["seed"] == 1
    # the training reader takes the output (a sources: recipe has no config.source)
    assert len(read_split([three["out"]], "val")) == m["counts"]["records"]["val"] > 0
    # the deal depends on the seed: another seed moves some scene to another split
    deals = {tuple(s.split for s in resolve_sources(
        load_recipe_text(three["root"], THREE_SCENES.replace("seed: 4}", f"seed: {seed}}}")), three["root"]))
        for seed in range(8)}
    assert len(deals) >= 2, deals


def load_recipe_text(root: Path, text: str) -> RecipeConfig:
    path = root / "tmp_recipe.yaml"
    path.write_text(text)
    return load_recipe(path)


def _derived_stage(row: pd.Series, day: np.datetime64) -> str:
    """The stage the NDVI curve gives (tables/NAME/phenology.csv), as Season.stage_at does."""
    for key, stage in (("sos", "dormant"), ("peak_start", "green-up"), ("senescence", "peak"), ("eos", "senescence")):
        if day < np.datetime64(row[key]):
            return stage
    return str(row.post_stage)


def test_stage_answers_are_the_truth_table_never_the_ndvi_curve(three) -> None:
    root, out = three["root"], three["out"]
    truth = {s: pd.read_csv(root / "scenes" / s / "truth" / "stages.csv", dtype=str).set_index(["field_id", "date"])
             for s in ("s0", "s1", "s2")}
    asked, disagree = 0, 0
    detail = pd.read_csv(out / "tables" / "s1" / "phenology.csv", dtype=str).set_index("field_id")
    for rec in three["records"]:
        if rec.task != "stage_on_date":
            continue
        scene, fid, day = _scene_of(rec), rec.meta["field_id"], rec.meta["date"]
        assert rec.meta["source"] == "label"
        assert rec.conversation[-1].text == truth[scene].loc[(fid, day), "stage"], rec.sample_id
        asked += 1
        if scene == "s1" and fid == "A":
            disagree += _derived_stage(detail.loc["A"], np.datetime64(day)) != rec.conversation[-1].text
    assert asked >= 20 and disagree >= 1, (asked, disagree)
    assert not {r.meta["field_id"] for r in three["records"] if r.family == "growth_stages"} & {"C"}, "no truth for C"
    assert not any(r.task == "season_segment" for r in three["records"]), "segments come only from derived seasons"
    # the reference table is the truth too
    table = pd.read_csv(out / "tables" / "s1" / "growth_stages.csv", dtype=str)
    mine = table.set_index(["field_id", "date"]).stage
    assert mine.equals(truth["s1"].stage.loc[mine.index]) and len(mine) == len(truth["s1"])


def test_key_date_answers_are_the_truth_key_dates(three) -> None:
    root = three["root"]
    task_key = {"green_up_date": "green_up", "peak_date": "peak", "senescence_date": "senescence"}
    seen = set()
    for rec in three["records"]:
        if rec.task not in task_key:
            continue
        keys = pd.read_csv(root / "scenes" / _scene_of(rec) / "truth" / "key_dates.csv", dtype=str)
        row = keys[(keys.field_id == rec.meta["field_id"]) & (keys.season == rec.meta["season"])].iloc[0]
        axis = rec.chip.time_axis
        when = axis.from_norm(rec.conversation[-1].times[0])
        truth = np.datetime64(row[task_key[rec.task]], "s")
        assert rec.meta["source"] == "label" and abs((when - truth) / np.timedelta64(1, "s")) < 60, rec.sample_id
        seen.add((_scene_of(rec), rec.meta["field_id"], rec.task))
    assert ("s1", "A", "peak_date") in seen and len(seen) >= 12
    # s1's A peak is 45 days after what its curve shows
    detail = pd.read_csv(three["out"] / "tables" / "s1" / "phenology.csv", dtype=str).set_index("field_id")
    keys = pd.read_csv(root / "scenes" / "s1" / "truth" / "key_dates.csv", dtype=str).set_index("field_id")
    gap = (np.datetime64(keys.loc["A", "peak"]) - np.datetime64(detail.loc["A", "pos"])) / np.timedelta64(1, "D")
    assert 30 <= gap <= 60


def _scenes(root: Path, n: int, **kwargs: object) -> None:
    for seed in range(n):
        write_synth_scene(root / "runs" / "synth" / f"cE_{seed}", seed=seed, **kwargs)


def _shipped(root: Path, *names: str) -> Path:
    (root / "data_recipes").mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(RECIPES / name, root / "data_recipes" / name)
    return root / "data_recipes"


def test_shipped_mixed_recipe_mixes_the_sample_and_s2_scenes_by_weight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data_recipes/synthetic_mixed.yaml as shipped, over 3 five-band scenes beside a copy of it.

    The scenes' seasons start on 1 August (a southern-hemisphere region): their truth labels the 2021 peaks
    season "2020", which only the scene's own season windows match. Field E has a second crop in the season.
    """
    _scenes(tmp_path, 3, bands="s2", season_start="08-01", second_cycle=("E",))
    _shipped(tmp_path, "synthetic_mixed.yaml", "sample_base.yaml", "synthetic_stage2.yaml", "synthetic_base.yaml")
    monkeypatch.chdir(tmp_path)  # a relative recipe path, as on the command line
    recipes = Path("data_recipes")
    m = build_recipe(recipes / "synthetic_mixed.yaml", Path("out"), progress=False)
    recs = _records(tmp_path / "out")
    by_source = defaultdict(set)
    for r in recs:
        by_source[_scene_of(r)].add(r.split)
    assert set(by_source) == {"sample", "synth.cE_0", "synth.cE_1", "synth.cE_2"}
    assert by_source["sample"] == set(SPLITS), "the sample is split by geographic blocks"
    assert all(len(by_source[f"synth.cE_{i}"]) == 1 for i in range(3)), "a scene is never split"
    assert {r.stack.data for r in recs if _scene_of(r) == "sample"} == {"sample:ndvi"}
    # a scene is in the same split in every recipe over the same folders with the same seed
    stage2 = resolve_sources(load_recipe(recipes / "synthetic_stage2.yaml"), recipes)
    assert {f"synth.{s.name}": s.split for s in stage2} == {k: v for k, v in m["split"]["scenes"].items()
                                                            if k != "sample"}
    train = m["mixture"]["train"]
    assert train["total"] == 2000
    for comp, weight in (("remote_sensing_general", 0.4), ("agricultural", 0.4), ("spatial_reasoning", 0.2)):
        for entry in ("sources[0]", "sources[1]"):
            assert abs(train["proportions"][f"{comp}@{entry}"] - weight * 0.5) <= 1 / 2000
    # NDVI of the five-band scenes comes from B08 and B04 (scene.json bands: s2): the curves have seasons
    src = next(s for s in m["sources"] if s["name"] == "synth.cE_0")
    assert src["scene"]["spec"]["bands"] == "s2" and src["phenology"]["seasons"]["2020"]["fields"] >= 4
    assert src["files"]["class_raster"]["path"].endswith("cE_0/landcover.tif")
    growth = [r for r in recs if r.family == "growth_stages" and _scene_of(r).startswith("synth")]
    assert growth and all(r.meta["source"] == "label" for r in growth)
    keyed = {(r.meta["field_id"], r.meta["season"]) for r in growth if r.task.endswith("_date") and
             r.task != "stage_on_date"}
    assert keyed and {s for _, s in keyed} == {"2020"}, keyed
    assert "E" not in {f for f, _ in keyed}, "two crops in one season: 'when did green-up start' has two answers"
    assert "E" in {r.meta["field_id"] for r in growth if r.task == "stage_on_date"}
    assert any(r.family == "growth_stages" and r.meta["source"] == "derived" for r in recs if _scene_of(r) == "sample")


@pytest.mark.parametrize("stage", ["synthetic_stage1", "synthetic_stage2", "synthetic_stage3",
                                   "synthetic_stage3_focus", "synthetic_stage3_fields"])
def test_shipped_synthetic_stage_recipes_build(tmp_path: Path, stage: str) -> None:
    _scenes(tmp_path, 3)
    recipes = _shipped(tmp_path, f"{stage}.yaml", "synthetic_base.yaml")
    m = build_recipe(recipes / f"{stage}.yaml", tmp_path / "out", progress=False)
    cfg = load_recipe(recipes / f"{stage}.yaml")
    assert all(m["counts"]["records"][s] > 0 for s in SPLITS)
    assert sorted(m["split"]["scenes"].values()) == sorted(SPLITS)
    if stage == "synthetic_stage3_focus":  # the growth-stage questions alone, every record kept
        assert cfg.mixture is None
        assert {(r.family, r.task) for r in _records(tmp_path / "out")} == {("growth_stages", "stage_timeline")}
        return
    assert m["mixture"]["train"]["total"] == cfg.mixture.samples["train"]
    if stage == "synthetic_stage3_fields":  # the point questions, the growth-stage timeline replayed
        assert {(r.family, r.task) for r in _records(tmp_path / "out")} == {
            ("field_boundaries", "field_at_point"), ("growth_stages", "stage_timeline")}
        return
    if stage == "synthetic_stage1":
        assert not any(r.has_positions for r in _records(tmp_path / "out"))
    else:
        assert {r.family for r in _records(tmp_path / "out")} == set(FAMILIES)


def test_bad_synth_paths_are_one_clear_line(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(THREE_SCENES.replace("scenes/*", "nowhere/*"))
    with pytest.raises(ConfigError, match=r"nowhere/\*: no synthetic scene folder there \(sources\[0\]\.synth"):
        build_recipe(recipe, tmp_path / "out", progress=False)
    res = subprocess.run([sys.executable, "-m", "agrivlm.cli", "recipe", "build", "--recipe", str(recipe), "--out",
                          str(tmp_path / "out"), "--no-progress"], capture_output=True, text=True, timeout=300)
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    assert res.returncode != 0 and len(lines) == 1 and str(tmp_path / "nowhere") in lines[0], lines
    # a folder that is not a whole scene: the missing part is named
    write_synth_scene(tmp_path / "scenes" / "s0", seed=0)
    (tmp_path / "scenes" / "s0" / "truth" / "stages.csv").unlink()
    recipe.write_text(THREE_SCENES)
    with pytest.raises(ConfigError, match=r"s0/truth/stages.csv: missing; .*s0 is not a complete synthetic scene"):
        build_recipe(recipe, tmp_path / "out", progress=False)
    # a synth entry cannot also give the files the scene holds, nor a recipe both source: and sources:
    recipe.write_text(THREE_SCENES.replace("  - synth: scenes/*\n", "  - synth: scenes/*\n    stack: x/\n"))
    with pytest.raises(ConfigError, match=r"sources.0: .*the scene folder gives stack"):
        load_recipe(recipe)
    recipe.write_text(f"extends: {RECIPES / 'sample_base.yaml'}\n" + THREE_SCENES)
    with pytest.raises(ConfigError, match=r"either source: .* or sources: .*not both"):
        load_recipe(recipe)
    # truth that falls on none of the stack's days or seasons answers nothing: an error, not an empty family
    truth = tmp_path / "scenes" / "s0" / "truth"
    stages = truth / "stages.csv"
    stages.write_text("field_id,date,stage\nA,2031-06-01,peak\n")
    recipe.write_text(THREE_SCENES)
    with pytest.raises(ConfigError, match=r"s0/truth/stages.csv: no labelled date is an acquisition day of the stack"):
        build_recipe(recipe, tmp_path / "out", progress=False)
    stages.write_text("field_id,date,stage\nA,2021-06-09,peak\n")
    keys = (truth / "key_dates.csv").read_text()
    (truth / "key_dates.csv").write_text(keys.replace(",2021,", ",season-2021,"))
    with pytest.raises(ConfigError, match=r"key_dates.csv: seasons \['season-2021'\] are none of the stack's"):
        build_recipe(recipe, tmp_path / "out", progress=False)
    # a scene whose bands give no NDVI
    (tmp_path / "scenes" / "s0" / "scene.json").write_text(json.dumps({"seed": 0, "bands": ["B02", "B03"]}))
    with pytest.raises(ConfigError, match=r"scene.json: bands \['B02', 'B03'\] give no NDVI"):
        build_recipe(recipe, tmp_path / "out", progress=False)


def test_recipe_files_with_sources_load_and_name_their_entries() -> None:
    cfg = load_recipe(RECIPES / "synthetic_mixed.yaml")
    assert cfg.source is None and [e.name for e in cfg.sources] == ["sample", "synth"]
    assert cfg.sources[1].split.fractions == {"train": 0.6, "val": 0.2, "test": 0.2}
    assert set(cfg.tasks.enabled()) == set(FAMILIES) and cfg.same_day == "keep"
    with pytest.raises(ConfigError, match=r"/runs/synth/\*: no synthetic scene folder there \(sources\[1\]"):
        resolve_sources(cfg, Path("/nonexistent/data_recipes"))


def test_scenes_of_the_real_generator_through_the_shipped_stage2_recipe(tmp_path: Path) -> None:
    """``agrivlm synth`` scenes (two regions, both band sets) → data_recipes/synthetic_stage2.yaml: every
    growth answer is the scene's truth, every scene in one split, every family built."""
    from agrivlm.synth import SceneSpec, write_scene

    small = {"area_km2": 0.36, "start": "2021-03-01", "end": "2021-10-31"}
    for name, region, bands in (("ce_ndvi", "central_europe", "ndvi"), ("ce_s2", "central_europe", "s2"),
                                ("mt_ndvi", "mato_grosso", "ndvi")):
        write_scene(tmp_path / "runs" / "synth" / name, SceneSpec(region=region, bands=bands, seed=3, **small))
    recipes = _shipped(tmp_path, "synthetic_stage2.yaml", "synthetic_base.yaml")
    m = build_recipe(recipes / "synthetic_stage2.yaml", tmp_path / "out", progress=False)
    recs = _records(tmp_path / "out")
    assert sorted(m["split"]["scenes"].values()) == sorted(SPLITS)
    assert {r.split for r in recs if _scene_of(r) == "ce_s2"} == {m["split"]["scenes"]["ce_s2"]}
    assert {r.family for r in recs} == set(FAMILIES)
    key_of = {"green_up_date": "green_up", "peak_date": "peak", "senescence_date": "senescence"}
    asked: dict[str, int] = defaultdict(int)
    for scene in ("ce_ndvi", "ce_s2", "mt_ndvi"):
        folder = tmp_path / "runs" / "synth" / scene
        stages = pd.read_csv(folder / "truth" / "stages.csv", dtype=str).set_index(["field_id", "date"]).stage
        keys = pd.read_csv(folder / "truth" / "key_dates.csv", dtype=str, keep_default_na=False)
        keys = keys.set_index(["field_id", "season"])
        for r in (r for r in recs if _scene_of(r) == scene and r.family == "growth_stages"):
            assert r.meta["source"] == "label", r.sample_id
            if r.task == "stage_on_date":
                assert r.conversation[-1].text == stages.loc[(r.meta["field_id"], r.meta["date"])], r.sample_id
            else:
                axis = r.chip.time_axis
                truth = np.datetime64(keys.loc[(r.meta["field_id"], r.meta["season"]), key_of[r.task]], "s")
                assert abs((axis.from_norm(r.conversation[-1].times[0]) - truth) / np.timedelta64(1, "s")) < 60
            asked[f"{scene}/{r.task}"] += 1
    for scene in ("ce_ndvi", "ce_s2", "mt_ndvi"):
        assert asked[f"{scene}/stage_on_date"] > 0, dict(asked)
    assert asked["ce_s2/peak_date"] > 0 and asked["ce_ndvi/peak_date"] > 0, dict(asked)
    # Mato Grosso: the second crop (safrinha, labelled 2020-2) is the window's only cycle in this stack
    seasons = {r.meta["season"] for r in recs if _scene_of(r) == "mt_ndvi" and r.task == "peak_date"}
    assert asked["mt_ndvi/peak_date"] > 0 and "2020-2" in seasons, seasons
