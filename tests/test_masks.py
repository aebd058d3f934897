from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.image import imread

from agrivlm.errors import PipelineError
from agrivlm.geo import ChipStream, open_stack
from agrivlm.pipeline.frames import FrameSamplingConfig, sample_frames
from agrivlm.pipeline.masks import (
    additive_mask,
    causal_frame_mask,
    draw_mask_png,
    expand_to_tokens,
    fast_slow_frame_mask,
    sliding_window_frame_mask,
)


def test_causal_mask_pattern() -> None:
    m = causal_frame_mask(4)
    assert m.dtype == torch.bool and m.shape == (4, 4)
    assert m.int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]


def test_sliding_window_pattern() -> None:
    assert sliding_window_frame_mask(5, 2).int().tolist() == [
        [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]


@settings(max_examples=100, deadline=None)
@given(t=st.integers(1, 30), w=st.integers(1, 35))
def test_sliding_window_properties(t: int, w: int) -> None:
    m = sliding_window_frame_mask(t, w)
    i, j = np.indices((t, t))
    np.testing.assert_array_equal(m.numpy(), (i - j >= 0) & (i - j < w))
    assert bool(m.diagonal().all())
    assert (m.sum(dim=1) <= w).all()
    if w >= t:
        assert m.equal(causal_frame_mask(t))
    if w == 1:
        assert m.equal(torch.eye(t, dtype=torch.bool))


def _notes_block_mask(num_slow: int, num_fast: int) -> torch.Tensor:
    # the construction of the reconstruction notes (concat order: slow frames first)
    n = num_slow + num_fast
    m = torch.zeros(n, n)
    m[:num_slow, :num_slow] = 1
    m[num_slow:, :num_slow] = 1
    m[num_slow:, num_slow:] = torch.tril(torch.ones(num_fast, num_fast))
    return m.bool()


@pytest.mark.parametrize(("s", "f"), [(2, 2), (3, 5), (1, 1), (4, 0), (0, 3)])
def test_fast_slow_concat_matches_the_block_mask(s: int, f: int) -> None:
    assert fast_slow_frame_mask([False] * s + [True] * f).equal(_notes_block_mask(s, f))


@settings(max_examples=100, deadline=None)
@given(labels=st.lists(st.booleans(), min_size=1, max_size=25))
def test_fast_slow_properties_any_order(labels: list[bool]) -> None:
    m = fast_slow_frame_mask(labels).numpy()
    fast = np.asarray(labels)
    assert m.diagonal().all()
    assert m[:, ~fast].all()  # every frame sees every slow frame
    for i in np.flatnonzero(~fast):
        assert not m[i, fast].any()  # slow frames never see fast frames
    for i in np.flatnonzero(fast):
        np.testing.assert_array_equal(m[i, fast], np.flatnonzero(fast) <= i)  # earlier fast frames only


def test_fast_slow_mask_of_real_interleaved_frames(sample_root: Path) -> None:
    stack = open_stack(sample_root / "ndvi", masks=sample_root / "cloud_mask")
    chip = next(iter(ChipStream(stack, chip_size=32)))
    frames = sample_frames(chip, FrameSamplingConfig(sampler="fast_slow", num_fast=3, num_slow=4, slow_stride=8,
                                                     merge="interleave"), fast_end=40)
    m = fast_slow_frame_mask(frames.is_fast)
    # slow: every 8th date up to 40 thinned to 4 = 0, 16, 24, 40; fast: 38, 39, 40; in date order
    assert frames.indices.tolist() == [0, 16, 24, 38, 39, 40, 40]
    assert frames.is_fast.tolist() == [False, False, False, True, True, False, True]
    assert m.int().tolist() == [
        [1, 1, 1, 0, 0, 1, 0],
        [1, 1, 1, 0, 0, 1, 0],
        [1, 1, 1, 0, 0, 1, 0],
        [1, 1, 1, 1, 0, 1, 0],
        [1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 0, 0, 1, 0],
        [1, 1, 1, 1, 1, 1, 1],
    ]


def test_expand_to_tokens_uniform_is_a_kronecker_product() -> None:
    fm = sliding_window_frame_mask(4, 2)
    tok = expand_to_tokens(fm, 3)
    assert tok.shape == (12, 12)
    np.testing.assert_array_equal(tok.numpy(), np.kron(fm.numpy().astype(int), np.ones((3, 3), int)).astype(bool))


@settings(max_examples=30, deadline=None)
@given(counts=st.lists(st.integers(1, 6), min_size=1, max_size=8), seed=st.integers(0, 2**16))
def test_expand_to_tokens_variable_counts(counts: list[int], seed: int) -> None:
    t = len(counts)
    fm = torch.rand(t, t, generator=torch.Generator().manual_seed(seed)) > 0.5
    tok = expand_to_tokens(fm, counts)
    frame_of = np.repeat(np.arange(t), counts)
    assert tok.shape == (sum(counts), sum(counts))
    np.testing.assert_array_equal(tok.numpy(), fm.numpy()[frame_of][:, frame_of])


def test_additive_mask() -> None:
    add = additive_mask(causal_frame_mask(3), torch.bfloat16)
    assert add.dtype == torch.bfloat16
    assert add[1, 0] == 0 and add[0, 1] == torch.finfo(torch.bfloat16).min
    scores = torch.zeros(3, 3) + additive_mask(causal_frame_mask(3))
    probs = scores.softmax(-1)
    torch.testing.assert_close(probs[1], torch.tensor([0.5, 0.5, 0.0]))


def test_draw_mask_png(tmp_path: Path) -> None:
    mask = expand_to_tokens(fast_slow_frame_mask([False, False, True, True]), 4)
    out = draw_mask_png(mask, tmp_path / "plots" / "mask.png", title="fast/slow",
                        frame_labels=["s0", "s1", "f0", "f1"], tokens_per_frame=4)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(out)
    assert img.shape[2] in (3, 4) and img.shape[0] == img.shape[1] == 400  # 4 in at 100 dpi
    grey = img[..., :3].mean(axis=2)
    assert (grey < 0.1).mean() > 0.05 and (grey > 0.9).mean() > 0.3  # dark attend cells and light background
    assert not list((tmp_path / "plots").glob(".mask.*"))  # no temporary left
    with pytest.raises(PipelineError, match="tokens_per_frame sum to 12 but the mask is 16x16"):
        draw_mask_png(mask, tmp_path / "bad.png", tokens_per_frame=[4, 4, 4])
    assert not (tmp_path / "bad.png").exists()


def test_bad_arguments() -> None:
    with pytest.raises(PipelineError, match="at least one frame"):
        causal_frame_mask(0)
    with pytest.raises(PipelineError, match="sliding window must be ≥ 1"):
        sliding_window_frame_mask(3, 0)
    with pytest.raises(PipelineError, match="3 token counts for 2 frames"):
        expand_to_tokens(causal_frame_mask(2), [1, 2, 3])
    with pytest.raises(PipelineError, match="at least one frame"):
        fast_slow_frame_mask([])
