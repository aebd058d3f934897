"""``data.point_marker: square``: the point a question gives is drawn into its frames, in training and in infer.

The visual prompt of ViP-LLaVA on a multispectral chip: a 3 × 3 px square around the point is shifted out of the
normalized value range in every frame and band. Training marks the first point of a question (the recipes'
``field_at_point``, ``point_class``), ``agrivlm infer`` marks each point prompt of a checkpoint saved with the
marker, and nothing else changes.
"""

from __future__ import annotations

import numpy as np
import pytest
from rasterio.windows import Window
from train_helpers import curriculum_recipe

from agrivlm.errors import ConfigError
from agrivlm.geo import ChipStream
from agrivlm.infer.prepare import ChipPreparer
from agrivlm.lape.tokens import LapeVocab
from agrivlm.pipeline.focus import MARKER_OFFSET, mark_point, point_pixel
from agrivlm.pipeline.inputs import BandConfig, InputConfig
from agrivlm.train.config import FramesConfig, NormalizeConfig
from agrivlm.train.data import RecordDataset, SourceRecord, StackCache, dataset_band_stats, read_split

VOCAB = LapeVocab(150, 50)


def test_mark_point_shifts_the_square_around_the_point_and_nothing_else() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.uniform(0, 1, (3, 2, 8, 8)).astype(np.float32)
    pixels[1, :, 2, 3] = np.nan  # no data inside the square
    pixels[0, :, 6, 6] = np.nan  # and outside it
    assert point_pixel((0.45, 0.3), 8, 8) == (2, 3)
    out = mark_point(pixels, (0.45, 0.3))
    inside = np.zeros((8, 8), bool)
    inside[1:4, 2:5] = True
    np.testing.assert_array_equal(out[..., ~inside], pixels[..., ~inside])  # the rest untouched, NaN kept
    assert np.isnan(out[0, :, 6, 6]).all()
    marked = out[..., inside]
    assert not np.isnan(marked).any() and (marked >= MARKER_OFFSET).all()  # out of [0, 1], no data too
    np.testing.assert_allclose(out[0][..., inside], pixels[0][..., inside] + MARKER_OFFSET)
    assert (out[1, :, 2, 3] == MARKER_OFFSET).all()
    assert np.isnan(pixels[1, :, 2, 3]).all()  # a copy: the input is unchanged
    # at the image's edge the square is cut, never wrapped
    corner = mark_point(pixels, (0.0, 0.99))
    changed = ~np.isclose(corner, pixels, equal_nan=True).all(axis=(0, 1))
    assert changed.sum() == 4 and changed[6:, :2].all()


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list[SourceRecord]:
    return read_split([curriculum_recipe(tmp_path_factory)], "train")


def test_training_marks_the_point_of_point_questions_only(records: list[SourceRecord]) -> None:
    stacks = StackCache()
    point_rec = next(sr for sr in records if sr.record.task == "field_at_point")
    other = next(sr for sr in records if sr.record.family == "field_boundaries"
                 and not sr.record.conversation[0].points)
    frames, norm = FramesConfig(sampler="uniform", num_frames=4), NormalizeConfig()
    stats = dataset_band_stats(records, stacks, norm)
    plain = RecordDataset([point_rec, other], frames, norm, VOCAB, 0, stats, False, stacks)
    marked = RecordDataset([point_rec, other], frames, norm, VOCAB, 0, stats, False, stacks, point_marker="square")
    a, b = plain[(0, 0)], marked[(0, 0)]
    np.testing.assert_array_equal(b.pixels, mark_point(a.pixels, point_rec.record.conversation[0].points[0]))
    assert a.prompt == b.prompt and a.answer == b.answer  # the words stay as they are
    np.testing.assert_array_equal(plain[(0, 1)].pixels, marked[(0, 1)].pixels)  # no point, no marker
    # a conversation about several points (points_per_record > 1) cannot mark them all in one set of frames
    question, answer = point_rec.record.conversation
    several = SourceRecord(point_rec.record.model_copy(update={"conversation": [question, answer] * 2}),
                           point_rec.same_day)
    with pytest.raises(ConfigError, match=r"point_marker: square .* asks about several points"):
        RecordDataset([point_rec, several], frames, norm, VOCAB, 0, stats, False, stacks, point_marker="square")


def test_infer_marks_each_point_prompt_of_a_marked_checkpoint(records: list[SourceRecord]) -> None:
    sr = next(sr for sr in records if sr.record.task == "field_at_point")
    w = sr.record.chip.window
    chip = ChipStream(StackCache().get(sr.record, sr.same_day), chip_size=32).read(
        0, Window(w.col_off, w.row_off, w.width, w.height))
    base = InputConfig(chip_size=32, stride=32, fields_prompt="points", point_grid=2, bands=BandConfig(preset="ndvi"))
    plain = ChipPreparer(base, "fields", VOCAB).prepare(chip).questions
    marked = ChipPreparer(base.model_copy(update={"point_marker": "square"}), "fields", VOCAB).prepare(chip).questions
    assert len(plain) == len(marked) == 4
    for p, m in zip(plain, marked, strict=True):
        assert p.prompt == m.prompt and p.positions == m.positions
        np.testing.assert_array_equal(m.visual.pixels, mark_point(p.visual.pixels, p.meta["point"]))
    assert not np.array_equal(marked[0].visual.pixels, marked[1].visual.pixels, equal_nan=True)
