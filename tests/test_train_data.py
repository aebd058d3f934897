"""Records of a real recipe build (embedded sample) → training samples: frames, normalisation, time, text, mixture."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window
from train_helpers import curriculum_recipe, stage_yaml

from agrivlm.errors import ConfigError, RecordError
from agrivlm.geo import ChipStream
from agrivlm.infer.generate import Predictor
from agrivlm.infer.prepare import ChipPreparer
from agrivlm.lape.tokens import LapeVocab, parse_positions
from agrivlm.model import build_model
from agrivlm.pipeline.inputs import clear_threshold
from agrivlm.sample import resolve_spec
from agrivlm.tasks.turns import Turn
from agrivlm.train.config import DataConfig, FramesConfig, NormalizeConfig, load_stage_config
from agrivlm.train.data import (
    Collator,
    RecordDataset,
    SourceRecord,
    StackCache,
    dataset_band_stats,
    read_record_frames,
    read_split,
    recipe_chips,
    render_record,
    select_records,
)
from agrivlm.train.sampler import ResumableSampler
from agrivlm.train.trainer import checkpoint_inputs

VOCAB = LapeVocab(150, 50)


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list[SourceRecord]:
    return read_split([curriculum_recipe(tmp_path_factory)], "train")


@pytest.fixture(scope="module")
def stacks() -> StackCache:
    return StackCache()


def _first(records: list[SourceRecord], task: str) -> SourceRecord:
    return next(sr for sr in records if sr.record.task == task)


def test_frames_are_the_records_dates_read_from_the_geotiffs(records: list[SourceRecord], stacks: StackCache) -> None:
    sr = _first(records, "season_segment")
    rec = sr.record
    data, clouds = read_record_frames(rec, stacks.get(rec, sr.same_day))
    w = rec.chip.window
    root = Path(resolve_spec(rec.stack.data))
    for k, name in enumerate(rec.stack.frame_files):  # each frame straight from its file with rasterio
        with rasterio.open(root / name) as src:
            raw = src.read(1, window=Window(w.col_off, w.row_off, w.width, w.height)).astype(np.float32)
            raw[raw == src.nodata] = np.nan
        np.testing.assert_array_equal(data[k, 0], raw)
    assert clouds.shape == (len(rec.chip.frame_indices), w.height, w.width)
    stats = dataset_band_stats(records, stacks, NormalizeConfig())
    ds = RecordDataset([sr], FramesConfig(sampler="uniform", num_frames=4), NormalizeConfig(), VOCAB, 0, stats,
                       train=False, stacks=stacks)
    sample = ds[(0, 0)]
    idx = np.round(np.linspace(0, data.shape[0] - 1, 4)).astype(int)
    span = stats.high - stats.low
    # cloud-masked pixels are no data, as agrivlm infer feeds them (data.frames.clouds_as_nodata, on by default)
    seen = np.where(clouds[idx][:, None], np.float32(np.nan), data[idx])
    assert clouds[idx].any() and np.isnan(sample.pixels).sum() == np.isnan(seen).sum()
    np.testing.assert_allclose(sample.pixels, np.clip((seen - stats.low[0]) / span[0], 0, 1), atol=1e-6)
    dates = np.asarray(rec.chip.frame_dates, dtype="datetime64[s]")
    # t on the record's time_range, the calendar year of its season, not on its frames' own range
    year = str(dates[0])[:4]
    assert rec.chip.time_range == (f"{year}-01-01T00:00:00", f"{int(year) + 1}-01-01T00:00:00")
    np.testing.assert_allclose(sample.frame_times, rec.chip.time_axis.to_norm(dates[idx]))
    assert 0.0 < sample.frame_times[0] and sample.frame_times[-1] < 1.0


def test_random_frames_depend_only_on_seed_epoch_and_index(records: list[SourceRecord], stacks: StackCache) -> None:
    subset = [sr for sr in records if len(sr.record.chip.frame_indices) >= 10][:6]
    ds = RecordDataset(subset, FramesConfig(sampler="random", num_frames=4), NormalizeConfig(mode="chip"), VOCAB, 7,
                       stacks=stacks)
    a, b = ds[(3, 2)], ds[(3, 2)]
    assert np.array_equal(a.pixels, b.pixels, equal_nan=True) and np.array_equal(a.frame_times, b.frame_times)
    times = {tuple(ds[(epoch, 2)].frame_times) for epoch in range(6)}
    assert len(times) > 1 and all(list(t) == sorted(t) and len(t) == 4 for t in times)
    other = RecordDataset(subset, FramesConfig(sampler="random", num_frames=4), NormalizeConfig(mode="chip"), VOCAB, 8,
                          stacks=stacks)
    assert {tuple(other[(e, 2)].frame_times) for e in range(6)} != times


def test_positions_become_lape_tokens_with_their_exact_values(records: list[SourceRecord]) -> None:
    rec = _first(records, "season_segment").record
    prompt, answer, values = render_record(rec, VOCAB)
    user, assistant = rec.conversation
    assert prompt.startswith("USER: <video>\n") and prompt.endswith("ASSISTANT: ")
    assert values == [*user.boxes[0], *assistant.segments[0]]
    parsed = parse_positions(prompt + answer, VOCAB)
    assert len(parsed.boxes) == 1 and len(parsed.segments) == 1
    assert np.allclose(parsed.boxes[0], user.boxes[0], atol=0.5 / 150)
    assert np.allclose(parsed.segments[0], assistant.segments[0], atol=0.5 / 50)
    poly = _first(records, "trace_outline").record
    _, ans, vals = render_record(poly, VOCAB)
    ring = poly.conversation[1].polygons[0]
    traced = parse_positions(ans, VOCAB).polygons  # vertices joined by the separator: one polygon
    assert len(vals) == 4 + 2 * len(ring) and len(traced) == 1 and len(traced[0]) == len(ring)


def test_batches_carry_position_values_and_multi_turn_supervises_every_answer(
    records: list[SourceRecord], stacks: StackCache
) -> None:
    _, proc = build_model()
    base = _first(records, "green_up_date")
    extra = [Turn(role="assistant", text="Let me look."), Turn(role="user", text="And when exactly?")]
    convo = [base.record.conversation[0], *extra, base.record.conversation[1]]
    multi = SourceRecord(base.record.model_copy(update={"conversation": convo}), base.same_day)
    ds = RecordDataset([base, multi], FramesConfig(sampler="uniform", num_frames=4), NormalizeConfig(mode="chip"),
                       proc.vocab, 0, train=False, stacks=stacks)
    samples = [ds[(0, 0)], ds[(0, 1)]]
    assert samples[1].prompt == samples[0].prompt  # the first question; the rest follows the first answer
    assert samples[1].answer == ["Let me look.", "USER: And when exactly?\nASSISTANT: ", samples[0].answer]
    batch = Collator(proc, lape=True)(samples)
    assert batch["sample_ids"] == [base.record.sample_id] * 2 and batch["is_fast"].shape == (2, 4)
    pv = batch["position_values"]
    tok, eos = proc.tokenizer, proc.tokenizer.eos_token_id
    for b, s in enumerate(samples):
        got = pv[b][~pv[b].isnan()].tolist()
        assert np.allclose(got, s.positions, atol=1e-6)
    labels, ids = batch["labels"], batch["input_ids"]
    single = tok(samples[0].answer, add_special_tokens=False)["input_ids"] + [eos]
    assert labels[0][labels[0] != -100].tolist() == single  # one answer
    # every answer supervised, each ended by eos; the second question read, not supervised
    first = tok("Let me look.", add_special_tokens=False)["input_ids"] + [eos]
    question = tok("USER: And when exactly?\nASSISTANT: ", add_special_tokens=False)["input_ids"]
    assert labels[1][labels[1] != -100].tolist() == first + single
    n_prompt = int((labels[1] == -100).long().cumsum(0)[labels[1] != -100][0])  # tokens before the first answer
    tail = ids[1][n_prompt:n_prompt + len(first) + len(question) + len(single)].tolist()
    assert tail == first + question + single
    assert (labels[1][n_prompt + len(first):n_prompt + len(first) + len(question)] == -100).all()


def test_selection_filters_and_mixes_by_family(records: list[SourceRecord]) -> None:
    text, report = select_records(records, DataConfig(roots=["x"], text_only=True), 0, True)
    assert text and all(not sr.record.has_positions for sr in text) and report["dropped_positions"] > 0
    cfg = DataConfig.model_validate({"roots": ["x"], "samples_per_epoch": 500, "mixture": {
        "general": {"families": ["general_rs"], "weight": 0.4},
        "agri": {"families": ["field_boundaries", "growth_stages"], "weight": 0.4},
        "spatial": {"families": ["spatial_reasoning"], "weight": 0.2}}})
    mixed, report = select_records(records, cfg, 0, True)
    fam = Counter(sr.record.family for sr in mixed)
    assert len(mixed) == 500 and fam["general_rs"] == 200 and fam["spatial_reasoning"] == 100
    assert fam["field_boundaries"] + fam["growth_stages"] == 200 and report["mixture"]["max_abs_deviation"] == 0.0
    few, report = select_records(records, DataConfig(roots=["x"], frames=FramesConfig(num_frames=14)), 0, True)
    assert report["dropped_frames"] > 0 and all(len(sr.record.chip.frame_indices) >= 14 for sr in few)
    with pytest.raises(ConfigError, match="data.mixture"):
        select_records(records, DataConfig.model_validate({"roots": ["x"], "families": ["general_rs"], "mixture": {
            "spatial": {"families": ["spatial_reasoning"], "weight": 1.0}}}), 0, True)


def test_a_stack_that_changed_since_the_recipe_is_an_error(records: list[SourceRecord], stacks: StackCache) -> None:
    sr = records[0]
    files = list(sr.record.stack.frame_files)
    files[1] = files[0]
    moved = sr.record.model_copy(update={"stack": sr.record.stack.model_copy(update={"frame_files": files})})
    with pytest.raises(RecordError, match=rf"record {sr.record.sample_id}: frame 1 should be .* stack changed"):
        read_record_frames(moved, stacks.get(moved, sr.same_day))


def test_ranks_share_an_epoch_without_overlap(records: list[SourceRecord]) -> None:
    shares = [list(ResumableSampler(len(records), 3, num_replicas=2, rank=r)) for r in (0, 1)]
    assert not set(shares[0]) & set(shares[1]) and len(shares[0]) == len(shares[1]) == len(records) // 2


def test_a_chip_gets_the_same_frame_times_in_training_and_in_agrivlm_infer(
    records: list[SourceRecord], stacks: StackCache, tmp_path: Path
) -> None:
    # a stage trained with uniform frames, and the input settings it writes beside its weights for `agrivlm infer`
    cfg = load_stage_config(stage_yaml("stage2", tmp_path / "s2.yaml", {
        "data.frames": {"sampler": "uniform", "num_frames": 4, "clouds_as_nodata": True},
        "data.normalize": {"mode": "chip", "preset": "ndvi"}}))
    chosen = [sr for sr in records if sr.record.task == "outline_fields"]
    assert len(chosen) >= 3
    inputs = checkpoint_inputs(cfg, None, chosen)
    assert inputs.time_axis == "seasons"  # records with a time_range: the axis they teach
    before = [dataclasses.replace(sr, record=sr.record.model_copy(
        update={"chip": sr.record.chip.model_copy(update={"time_range": None})})) for sr in chosen]
    assert checkpoint_inputs(cfg, None, before).time_axis == "usable_dates"  # records written before it
    model, proc = build_model()
    ds = RecordDataset(chosen, cfg.data.frames, cfg.data.normalize, proc.vocab, 0, train=False, stacks=stacks)
    trained = Collator(proc, lape=True)([ds[(0, i)] for i in range(len(chosen))])["frame_times"]  # (B, T)
    preparer, predictor = ChipPreparer(inputs, "fields", proc.vocab), Predictor(model, proc, torch.device("cpu"))
    for i, sr in enumerate(chosen):
        w = sr.record.chip.window
        stack = stacks.get(sr.record, sr.same_day)
        chip = ChipStream(stack, chip_size=inputs.chip_size).read(0, Window(w.col_off, w.row_off, w.width, w.height))
        question = preparer.prepare(chip).questions[0]
        # the frame_times row the model gets from `agrivlm infer` (Predictor.encode) is the one it trained on
        asked = predictor.encode([question], 1)[0][1]["frame_times"][0]
        assert torch.equal(asked, trained[i]), (sr.record.sample_id, asked.tolist(), trained[i].tolist())
        # on the record's time axis, on which its answers' TEMP tokens are written, so decoded t → the same dates
        assert question.visual.time_axis == sr.record.chip.time_axis


def test_the_checkpoint_inputs_cut_chips_and_take_dates_as_the_recipes_did(
    records: list[SourceRecord], tmp_path_factory: pytest.TempPathFactory, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    root = curriculum_recipe(tmp_path_factory)
    chips = recipe_chips([root])
    assert chips is not None and chips.size == records[0].record.chip.window.width
    cfg = load_stage_config(stage_yaml("stage2", tmp_path / "s2.yaml", {"data.roots": [str(root)]}))
    inputs = checkpoint_inputs(cfg, None, records, chips.model_copy(update={"edge": "drop", "min_clear": 0.6}))
    assert (inputs.chip_size, inputs.stride, inputs.edge) == (chips.size, chips.size // 2, "drop")
    # a recipe takes a date at least min_clear clear; the sampler keeps a frame more than min_valid_fraction valid:
    # the inputs make the two one rule, ties included (60 of a 10 x 10 chip's pixels clear: taken by both)
    mvf = inputs.frames.min_valid_fraction
    assert 60 / 100 > mvf and not 59 / 100 > mvf and mvf == pytest.approx(0.6)
    assert clear_threshold(0.0) == 0.0 and 1.0 > clear_threshold(1.0) > 1 - 1e-12
    assert inputs.frames.clouds_as_nodata and cfg.data.frames.clouds_as_nodata  # trained as infer feeds it
    # trained on cloudy pixels' values (clouds_as_nodata off): infer still blanks them, and a warning says so
    frames = cfg.data.frames.model_copy(update={"clouds_as_nodata": False})
    cloudy = cfg.model_copy(update={"data": cfg.data.model_copy(update={"frames": frames})})
    with caplog.at_level("WARNING", logger="agrivlm.train.trainer"):
        assert checkpoint_inputs(cloudy, None, records, chips).frames == checkpoint_inputs(cfg, None, records,
                                                                                            chips).frames
    assert "clouds_as_nodata is off" in caplog.text
    # a second root that cuts chips otherwise: trained on, the checkpoint follows the first, a warning says so
    other = tmp_path / "other"
    other.mkdir()
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["config"]["chips"] = {**manifest["config"]["chips"], "size": 2 * chips.size}
    (other / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level("WARNING", logger="agrivlm.train.data"):
        assert recipe_chips([root, other]) == chips
    assert "the checkpoint's inputs follow" in caplog.text and str(other) in caplog.text
