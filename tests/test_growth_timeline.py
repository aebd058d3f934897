"""Growth as a timeline: a ``stage_timeline`` answer, as a model writes it, through the real decoding chain.

The records come from a recipe over the synthetic recipe scene (real GeoTIFFs, analytic NDVI curves). Each
record's answer is rendered with LAPE tokens, tokenized, decoded by :func:`~agrivlm.infer.generate.decode_answer`
(sub-bin values from peaked LAPE logits), turned into a journal record by ``agrivlm infer``'s
:func:`~agrivlm.infer.runner.answer_record` with the question the inference preparer builds for a timeline
checkpoint, and read back by the stage table writer: the per-date stages must be the recipe's truth table.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from affine import Affine
from decoded import decoded_answer
from rasterio.crs import CRS
from recipes_synth import recipe_yaml, write_scene

from agrivlm.geo.coords import GeoGrid, TimeAxis
from agrivlm.geo.dates import day_str
from agrivlm.infer.generate import Question, Visual
from agrivlm.infer.journal import Journal
from agrivlm.infer.outputs import stage_table
from agrivlm.infer.prompts import lape_formatters
from agrivlm.infer.runner import answer_record
from agrivlm.lape.tokens import Axis, LapeVocab
from agrivlm.model.tokenizer import add_agrivlm_tokens, default_tokenizer
from agrivlm.pipeline.focus import box_pixels, focus_on_box
from agrivlm.recipes.build import build_recipe
from agrivlm.recipes.schema import read_records
from agrivlm.tasks.turns import render_text

VOCAB = LapeVocab()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("timeline")
    text = recipe_yaml(write_scene(root)).replace("  growth_stages: {stage_questions: 3}\n",
                                                  "  growth_stages: {tasks: [stage_timeline]}\n")
    assert "stage_timeline" in text
    (root / "recipe.yaml").write_text(text)
    build_recipe(root / "recipe.yaml", root / "out", progress=False)
    return root / "out"




def test_timeline_answers_decode_to_the_truth_stage_of_every_date(built: Path, tmp_path: Path) -> None:
    tok = default_tokenizer()
    add_agrivlm_tokens(tok, VOCAB)
    offset = tok.convert_tokens_to_ids(VOCAB.token(Axis.HEIGHT, 0))
    truth = pd.read_csv(built / "tables" / "growth_stages.csv", dtype=str)
    records = [r for p in sorted((built / "shards").glob("*.jsonl")) for r in read_records(p)
               if r.task == "stage_timeline"]
    assert len(records) >= 5
    chips = []
    for index, rec in enumerate(records):
        dates = np.array(rec.chip.frame_dates, dtype="datetime64[s]")
        axis = TimeAxis.from_dates(dates)
        # the preparer's meta: every date of the season with its t on the frames' axis
        meta = {"field_id": rec.meta["field_id"], "season": rec.meta["season"],
                "dates": [day_str(d) for d in dates], "t": [round(float(t), 6) for t in axis.to_norm(dates)]}
        question = Question(Visual(np.zeros((len(dates), 1, 32, 32), np.float32), axis.to_norm(dates), dates, axis),
                            "q", meta=meta)
        answer = decoded_answer(render_text(rec.conversation[-1], **lape_formatters(VOCAB)), tok, offset)
        grid = GeoGrid(Affine(*rec.chip.transform), CRS.from_user_input(rec.chip.crs), rec.chip.window.width,
                       rec.chip.window.height)
        out = answer_record("growth", grid, question, answer, tok.decode)
        assert not out["unparsed"] and [s for s, _, _ in out["spans"]] == rec.meta["stages"]
        chips.append({"chip_id": rec.chip.chip_id, "index": index, "status": "ok", "note": "", "answers": [out]})
    journal = Journal.open(tmp_path / "run.journal.jsonl", {"test": 1})
    journal.append({"type": "stack", "stack": "S", "name": "scene", "crs": "EPSG:32633"})
    journal.append({"type": "chips", "stack": "S", "chips": chips})
    table = stage_table(journal, ["S"], ["scene"])
    journal.close()
    both = table.merge(truth, on=["field_id", "date"], suffixes=("_pred", "_true"))
    # a span's ends come back within half a TEMP bin (3.7 days of a season) and the nearest-span rule puts
    # every date between two spans on its side: each date decodes to its true stage
    assert len(both) >= 30 and (both.stage_pred == both.stage_true).all(), both[both.stage_pred != both.stage_true]
    assert not table.duplicated(["field_id", "date"]).any()


# -- growth_focus: box — the question sees its field's box only, in training and in inference alike


def test_box_focus_keeps_the_box_pixels_and_blanks_the_rest() -> None:
    pixels = np.arange(2 * 1 * 8 * 10, dtype=np.float32).reshape(2, 1, 8, 10)
    assert box_pixels((0.2, 0.25, 0.5, 0.75), 8, 10) == (2, 6, 2, 5)
    assert box_pixels((0.21, 0.25, 0.49, 0.75), 8, 10) == (2, 6, 2, 5), "an edge inside a pixel takes it in"
    assert box_pixels((0.5, 0.5, 0.5, 0.5), 8, 10) == (4, 5, 5, 6), "never empty"
    out = focus_on_box(pixels, (0.2, 0.25, 0.5, 0.75))
    np.testing.assert_array_equal(out[..., 2:6, 2:5], pixels[..., 2:6, 2:5])
    assert np.isnan(out).sum() == pixels.size - 2 * 4 * 3 and not np.isnan(pixels).any()


def test_training_samples_and_inference_questions_see_the_same_field_pixels(built: Path) -> None:
    """A growth record's sample with ``growth_focus: box`` and the preparer's question about the same field and
    season hold the same pixels inside the box, no data outside, whole-chip pixels otherwise."""
    from agrivlm.geo import ChipStream, open_stack
    from agrivlm.infer.prepare import ChipPreparer, FieldLayer
    from agrivlm.pipeline.inputs import BandConfig, InputConfig
    from agrivlm.train.config import FramesConfig, NormalizeConfig
    from agrivlm.train.data import RecordDataset, StackCache, read_split

    records = [sr for sr in read_split([built], "train") if sr.record.task == "stage_timeline"]
    sr = max(records, key=lambda s: len(s.record.chip.frame_indices))
    rec = sr.record
    n = len(rec.chip.frame_indices)
    frames, norm = FramesConfig(sampler="uniform", num_frames=n), NormalizeConfig(mode="fixed", low=[0.0], high=[1.0])
    from agrivlm.train.data import fixed_band_stats

    stats = fixed_band_stats(norm)
    stacks = StackCache()
    whole = RecordDataset([sr], frames, norm, VOCAB, 0, stats, False, stacks)[0].pixels
    focused = RecordDataset([sr], frames, norm, VOCAB, 0, stats, False, stacks, growth_focus="box")[0].pixels
    r0, r1, c0, c1 = box_pixels(rec.conversation[0].boxes[0], *whole.shape[-2:])
    np.testing.assert_array_equal(focused[..., r0:r1, c0:c1], whole[..., r0:r1, c0:c1])
    outside = np.ones(focused.shape, dtype=bool)
    outside[..., r0:r1, c0:c1] = False
    assert np.isnan(focused[outside]).all() and np.isfinite(whole[outside]).any()

    # inference: the same chip, the same field → the same box, the same pixels inside it
    root = built.parent
    stack = open_stack(root / "ndvi", masks=root / "masks")
    layer = FieldLayer.read(root / "parcels.geojson", "fid", "landuse").to_crs(stack.crs)
    w = rec.chip.window
    chip = next(c for c in ChipStream(stack, chip_size=w.width, stride=w.width // 2)
                if (c.window.col_off, c.window.row_off) == (w.col_off, w.row_off))
    config = InputConfig(chip_size=w.width, bands=BandConfig(preset="ndvi", low=[0.0], high=[1.0]),
                         growth_prompt="timeline", growth_focus="box", min_frames=1)
    asked = ChipPreparer(config, "growth", VOCAB, fields=layer).prepare(chip).questions
    q = next(q for q in asked if q.meta["field_id"] == rec.meta["field_id"])
    assert np.allclose(q.meta["box"], rec.conversation[0].boxes[0], atol=1e-6)
    pix = q.visual.pixels
    assert np.isnan(pix[..., :r0, :]).all() and np.isnan(pix[..., r1:, :]).all()
    assert np.isnan(pix[..., :, :c0]).all() and np.isnan(pix[..., :, c1:]).all()
    assert np.isfinite(pix[..., r0:r1, c0:c1]).any()
    plain = ChipPreparer(config.model_copy(update={"growth_focus": "none"}), "growth", VOCAB, fields=layer)
    q0 = next(q for q in plain.prepare(chip).questions if q.meta["field_id"] == rec.meta["field_id"])
    np.testing.assert_array_equal(pix[..., r0:r1, c0:c1], q0.visual.pixels[..., r0:r1, c0:c1])
    assert np.isfinite(q0.visual.pixels[..., :, c1:]).any() or np.isfinite(q0.visual.pixels[..., :, :c0]).any()


def test_training_renders_a_timeline_question_as_infer_asks_it(built: Path) -> None:
    from agrivlm.infer.prompts import build_prompt, timeline_question
    from agrivlm.train.data import render_record

    compared = 0
    for p in sorted((built / "shards").glob("*.jsonl")):
        for rec in read_records(p):
            if rec.task != "stage_timeline":
                continue
            asked = timeline_question(VOCAB, rec.conversation[0].boxes[0], str(rec.meta.get("class")))
            prompt, answer, positions = render_record(rec, VOCAB, "<video>")
            if asked.text not in prompt:
                continue  # the recipes' other phrasing
            assert build_prompt(asked.text, 4) == prompt
            assert list(asked.positions) == pytest.approx(positions[: len(asked.positions)])
            assert answer.count("<TEMP-") == 2 * len(rec.conversation[-1].segments)
            compared += 1
    assert compared > 0
