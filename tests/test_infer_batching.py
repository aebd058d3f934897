"""How `agrivlm infer` batches the model's work: repeated frames encoded once, a chip's questions generated together."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from agrivlm.infer.batch import run_inference
from agrivlm.infer.errors import InferError
from agrivlm.infer.generate import Predictor
from agrivlm.model import build_model
from agrivlm.pipeline.inputs import BandConfig, InputConfig, default_frames, save_input_config


def _frames_seen(model: Any) -> list[int]:
    """Record how many frames each call of the model's vision encoder gets."""
    seen: list[int] = []
    encode = model._encode_frames

    def spy(frames: torch.Tensor, h: int, w: int) -> torch.Tensor:
        seen.append(int(frames.shape[0]))
        return encode(frames, h, w)  # type: ignore[no-any-return]

    model._encode_frames = spy
    return seen


def test_repeated_frames_are_encoded_once_in_eval_with_the_same_features(one_torch_thread: None) -> None:
    model, _ = build_model()
    model.eval()
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(1, 4, 1, 32, 32, generator=g), torch.rand(1, 4, 1, 32, 32, generator=g)
    pixels = torch.cat([a, b, a, a])  # 4 items, 2 distinct: 8 distinct frames of 16
    times = torch.linspace(0, 1, 4).expand(4, 4)
    seen = _frames_seen(model)
    with torch.no_grad():
        shared = model.get_visual_features(pixels, times)
        model.share_repeated_frames = False
        every = model.get_visual_features(pixels, times)
        alone = torch.cat([model.get_visual_features(p[None], times[:1]) for p in pixels])
    assert seen[:2] == [8, 16]
    assert torch.allclose(shared, every, atol=1e-5) and torch.allclose(shared, alone, atol=1e-5)
    assert torch.equal(shared[0], shared[2]) and not torch.allclose(shared[0], shared[1])
    # training: the projector's batch norm uses the batch's statistics, so every frame goes through as it is
    model.share_repeated_frames = True
    model.train()
    seen.clear()
    model.get_visual_features(pixels, times)
    assert seen == [16]


@pytest.fixture(scope="module")
def points_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model (random weights) asking the fields task at the 9 points of a 3 × 3 grid per chip."""
    ckpt = tmp_path_factory.mktemp("points") / "ckpt"
    model, processor = build_model()
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    save_input_config(InputConfig(stride=32, min_frames=1, fields_prompt="points", point_grid=3,
                                  frames=default_frames().model_copy(update={"max_frames": 4}),
                                  bands=BandConfig(preset="ndvi", low=[-0.2], high=[1.0])), ckpt)
    return ckpt


def test_a_chips_questions_are_one_generation_unless_split(points_ckpt: Path, sample_root: Path, tmp_path: Path,
                                                           one_torch_thread: None) -> None:
    predictor = Predictor.load(points_ckpt, max_new_tokens=2)
    sizes: list[list[int]] = []
    encode = predictor.encode

    def spy(questions: Any, batch_size: int) -> Any:
        parts = encode(questions, batch_size)
        sizes.append([len(idx) for idx, _ in parts])
        return parts

    predictor.encode = spy  # type: ignore[method-assign]
    common: dict[str, Any] = {"masks": [str(sample_root / "cloud_mask")], "task": "fields", "batch_size": 4,
                              "progress": False, "predictor": predictor, "max_new_tokens": 2}
    whole = run_inference([str(sample_root / "ndvi")], points_ckpt, tmp_path / "whole.gpkg", **common)
    assert whole.processed >= 4 and whole.questions == 9 * whole.processed
    # batch 4 is reached by the first chip: each generation is that chip's 9 questions, never 4 + 4 + 1
    assert sizes and all(parts == [9] for parts in sizes)
    sizes.clear()
    # --max-batch 4, a memory cap: parts of at most 4 questions
    split = run_inference([str(sample_root / "ndvi")], points_ckpt, tmp_path / "split.gpkg", max_batch=4, **common)
    assert split.questions == whole.questions and predictor.split_at == 4
    assert sizes and all(parts == [4, 4, 1] for parts in sizes)
    with pytest.raises(InferError, match="--max-batch must be ≥ 1, got 0"):
        run_inference([str(sample_root / "ndvi")], points_ckpt, tmp_path / "zero.gpkg", max_batch=0, **common)
