"""``lape.point_features``: a question's point gets the visual feature under it (Ferret's region features, a point).

The feature is the item's visual tokens averaged over frames, sampled bilinearly at the point's ``(u, v)``, added to
the point's height token; answer points (supervised tokens) and rows without an image are left alone; a model
trained with it is asked the same way by ``agrivlm infer``.
"""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import pytest
import torch
import torch.nn.functional as F
from train_helpers import ask_sample_fields, curriculum_recipe, quick_run, stage_yaml

from agrivlm.errors import ConfigError
from agrivlm.model import build_model, load_pretrained
from agrivlm.model.builders import TINY_CONFIG, load_model_settings
from agrivlm.model.configuration import AgriVLMConfig
from agrivlm.train.trainer import run_stage

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    built, _ = build_model(load_model_settings(TINY_CONFIG, {"lape.point_features": True}))
    return built.eval()


def _point(model, axis: int, value: float) -> int:  # type: ignore[no-untyped-def]
    ns = model.vocab.num_spatial
    return model.config.position_token_offset + axis * ns + min(int(value * ns), ns - 1)


def test_the_feature_under_each_prompt_point_is_added_to_its_height_token(model) -> None:  # type: ignore[no-untyped-def]
    cfg = model.config
    torch.manual_seed(0)
    t, grid, d = 3, (2, 2), cfg.text_config.hidden_size
    s = t * grid[0] * grid[1]
    vid, text = cfg.video_token_id, 5
    u, v = 0.3, 0.8
    w_tok, h_tok = _point(model, 1, u), _point(model, 0, v)
    # row 0: visual tokens, a question point, an answer point; row 1: no image, a point
    row0 = [vid] * s + [text, w_tok, h_tok, text, w_tok, h_tok]
    row1 = [text] * (s + 2) + [w_tok, h_tok, text, text]
    ids = torch.tensor([row0, row1])
    values = torch.full(ids.shape, float("nan"))
    values[0, s + 1], values[0, s + 2] = u, v  # the exact value; the answer point keeps its bin's centre
    prompt = torch.ones_like(ids, dtype=torch.bool)
    prompt[0, s + 3:] = False  # the answer
    embeds = torch.randn(2, ids.shape[1], d)
    visual = torch.randn(1, s, d)
    out = model.add_point_features(ids, embeds.clone(), visual, grid, values, prompt)
    changed = (out != embeds).any(-1)
    assert changed.nonzero().tolist() == [[0, s + 2]]  # only the question point's height token
    cells = visual.reshape(1, t, *grid, d).mean(1)  # (1, 2, 2, D)
    # bilinear at (u, v) on a 2 x 2 grid of cell centres (0.25, 0.75), clamped at the border
    x, y = min(max((u * 2 - 0.5), 0.0), 1.0), min(max((v * 2 - 0.5), 0.0), 1.0)
    top = cells[0, 0, 0] * (1 - x) + cells[0, 0, 1] * x
    bottom = cells[0, 1, 0] * (1 - x) + cells[0, 1, 1] * x
    expected = top * (1 - y) + bottom * y
    torch.testing.assert_close(out[0, s + 2] - embeds[0, s + 2], expected, rtol=1e-5, atol=1e-5)
    # without a value a bin token stands at its bin's centre; with no prompt mask every point counts
    out2 = model.add_point_features(ids, embeds.clone(), visual, grid, torch.full(ids.shape, float("nan")), None)
    assert (out2 != embeds).any(-1).nonzero().tolist() == [[0, s + 2], [0, s + 5]]
    where = torch.tensor([[[[2 * (w_tok - cfg.position_token_offset - 150 + 0.5) / 150 - 1,
                             2 * (h_tok - cfg.position_token_offset + 0.5) / 150 - 1]]]])
    ref = F.grid_sample(cells.permute(0, 3, 1, 2), where, align_corners=False, padding_mode="border").view(-1)
    torch.testing.assert_close(out2[0, s + 2] - embeds[0, s + 2], ref, rtol=1e-5, atol=1e-5)


def test_refused_with_the_faster_stream() -> None:
    with pytest.raises(ConfigError, match="point_features"):
        AgriVLMConfig(point_features=True, faster_video_stride=2)


def test_trained_with_point_features_and_asked_by_infer(tmp_path_factory: pytest.TempPathFactory,
                                                       sample_root: Path) -> None:
    data = curriculum_recipe(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("point_features")
    common = quick_run(data, tmp / "s1", **{"optim.warmup_steps": 0, "optim.lr": 1e-2,
                                            "model.overrides": {"lape.point_features": True}})
    s1 = run_stage(stage_yaml("stage1", tmp / "s1.yaml", common), stage="stage1")
    c2 = {**common, "output_dir": str(tmp / "s2"), "model.overrides": {}, "model.init_from": str(s1)}
    s2 = run_stage(stage_yaml("stage2", tmp / "s2.yaml", c2), stage="stage2")
    model, _ = load_pretrained(s2)
    assert model.config.point_features
    assert isinstance(ask_sample_fields(s2, sample_root, tmp / "fields.gpkg"), gpd.GeoDataFrame)
