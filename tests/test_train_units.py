"""Training pieces that need no recipe data: configs, stage rules, LR groups, LoRA merge, the reconstruction module."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import CONFIGS, stage_yaml
from typer.testing import CliRunner

from agrivlm.cli import app
from agrivlm.errors import ConfigError
from agrivlm.model import build_model
from agrivlm.model.reconstruction import FrozenTeacher, NextFramePredictor, frame_mask, visual_hidden_states
from agrivlm.pipeline.conversation import format_prompt as build_prompt
from agrivlm.pipeline.pooling import pool_2d
from agrivlm.train.checkpoint import CheckpointError
from agrivlm.train.config import LLMTraining, Trainables, load_stage_config, parse_overrides
from agrivlm.train.curriculum import check_stage_rules, set_trainable
from agrivlm.train.schedule import base_lr_factor, lape_lr_factor
from agrivlm.train.trainer import run_stage, set_learning_rates

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- configs and stage rules ---------------------------------------------------------------------------------


def test_shipped_stage_configs_load_with_the_reports_defaults() -> None:
    cfgs = {s: load_stage_config(CONFIGS / f"{s}.yaml") for s in ("stage1", "stage2", "stage3")}
    for stage, cfg in cfgs.items():
        assert cfg.stage == stage
        check_stage_rules(cfg, stage)
    s1, s2, s3 = cfgs["stage1"], cfgs["stage2"], cfgs["stage3"]
    assert s1.lape is None and s1.data.text_only and s1.trainable.llm.mode == "frozen"
    assert s2.lape is not None and s2.model.init_from == "runs/stage1/final"
    assert (s2.lape.lape_lr_multiplier, s2.lape.spatial_loss_weight, s2.lape.temporal_loss_weight) == (0.5, 2.0, 1.0)
    # the position-token counts are the model config's alone: the stage configs leave them to it
    assert (s2.lape.num_spatial_tokens, s2.lape.num_temporal_tokens) == (None, None)
    assert (s3.lape.num_spatial_tokens, s3.lape.num_temporal_tokens) == (None, None)
    assert s2.data.mixture is not None
    assert {k: c.weight for k, c in s2.data.mixture.items()} == {
        "remote_sensing_general": 0.4, "agricultural": 0.4, "spatial_reasoning": 0.2}
    assert s3.model.init_from == "runs/stage2/final" and s3.trainable.llm.mode == "lora"
    assert s2.reconstruction.loss_weight == 0.1 and not s2.reconstruction.enabled


def test_unknown_key_and_wrong_type_name_the_file_and_key(tmp_path: Path) -> None:
    bad = stage_yaml("stage2", tmp_path / "s2.yaml", {"lape.lape_lr_multiplyer": 0.3})
    with pytest.raises(ConfigError, match=r"s2\.yaml: lape\.lape_lr_multiplyer: unknown key"):
        load_stage_config(bad)
    bad = stage_yaml("stage2", tmp_path / "s2old.yaml", {"lape.temporal_pos_weight": 1.0})  # the old loss-weight name
    with pytest.raises(ConfigError, match=r"s2old\.yaml: lape: .*temporal_pos_weight was renamed temporal_loss_weight"):
        load_stage_config(bad)
    bad = stage_yaml("stage1", tmp_path / "s1.yaml", {"train.max_steps": "many"})
    with pytest.raises(ConfigError, match=r"s1\.yaml: train\.max_steps: .*integer"):
        load_stage_config(bad)
    bad = stage_yaml("stage2", tmp_path / "s2b.yaml", {"data.mixture.spatial_reasoning.weight": 0.5})
    with pytest.raises(ConfigError, match=r"s2b\.yaml: data: .*weights must sum to 1"):
        load_stage_config(bad)
    rec = {"reconstruction.enabled": True, "reconstruction.fast_slow": True}
    bad = stage_yaml("stage2", tmp_path / "s2c.yaml", rec)
    with pytest.raises(ConfigError, match="fast_slow needs data.frames.sampler: fast_slow"):
        load_stage_config(bad)
    parsed = parse_overrides(["train.max_steps=5", "data.roots=[a, b]"])
    assert parsed == {"train.max_steps": 5, "data.roots": ["a", "b"]}
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["train.max_steps"])


def test_stage_rules_are_enforced(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="stage1 .*runs without LAPE"):
        check_stage_rules(load_stage_config(stage_yaml("stage1", tmp_path / "a.yaml", {"lape": {}})))
    with pytest.raises(ConfigError, match="keeps the vision encoder and the LLM frozen"):
        check_stage_rules(load_stage_config(stage_yaml("stage1", tmp_path / "b.yaml", {"trainable.llm.mode": "lora"})))
    with pytest.raises(ConfigError, match="model.init_from: stage3 starts from the stage2 model"):
        check_stage_rules(load_stage_config(stage_yaml("stage3", tmp_path / "c.yaml", {"model.init_from": None})))
    with pytest.raises(ConfigError, match="the file configures stage1, but stage2 was asked for"):
        run_stage(CONFIGS / "stage1.yaml", stage="stage2")


def test_cli_refuses_resume_without_checkpoint_and_clobbering_a_run(tmp_path: Path) -> None:
    cfg = stage_yaml("stage1", tmp_path / "s1.yaml", {"output_dir": str(tmp_path / "run")})
    result = CliRunner().invoke(app, ["train", "stage1", "--config", str(cfg), "--resume"])
    assert isinstance(result.exception, CheckpointError) and "no complete checkpoint" in str(result.exception)
    (tmp_path / "run" / "logs").mkdir(parents=True)
    result = CliRunner().invoke(app, ["train", "stage1", "--config", str(cfg)])
    assert isinstance(result.exception, ConfigError)
    assert "--resume to continue it or --overwrite" in str(result.exception)
    result = CliRunner().invoke(app, ["train", "stage1", "--config", str(cfg), "--set", "stage=stage3"])
    assert isinstance(result.exception, ConfigError) and "configures stage3, but stage1" in str(result.exception)
    # --overwrite with an input that is not there: refused before the previous run is touched
    (tmp_path / "run" / "final").mkdir()
    (tmp_path / "run" / "final" / "model.safetensors").write_bytes(b"previous")
    result = CliRunner().invoke(app, ["train", "stage1", "--config", str(cfg), "--overwrite",
                                      "--set", f"data.roots=[{tmp_path / 'nowhere'}]"])
    assert result.exit_code != 0 and "nowhere" in str(result.exception)
    assert (tmp_path / "run" / "final" / "model.safetensors").read_bytes() == b"previous"
    assert (tmp_path / "run" / "logs").is_dir()


# -- learning rates ----------------------------------------------------------------------------------------


def test_lape_group_lr_ramps_from_zero_to_a_tenth_then_the_multiplier(tmp_path: Path) -> None:
    cfg = load_stage_config(stage_yaml("stage2", tmp_path / "s2.yaml", {
        "lape.lape_warmup_steps": 10, "lape.lape_lr_multiplier": 0.5, "optim.lr": 1e-3, "optim.schedule": "linear",
        "optim.warmup_steps": 2, "train.max_steps": 40}))
    w = torch.zeros(1, requires_grad=True)
    opt = torch.optim.AdamW([{"params": [w], "name": "main"}, {"params": [torch.zeros(1, requires_grad=True)],
                                                              "name": "lape"}])
    seen = []
    for step in range(40):
        lrs = set_learning_rates(opt, cfg, step)
        base = 1e-3 * base_lr_factor(step, 40, 2, "linear")
        assert opt.param_groups[0]["lr"] == lrs["lr_main"] == pytest.approx(base)
        report = 0.1 * step / 10 if step < 10 else 0.5  # the LAPE report's get_lape_learning_rate (§4.2)
        assert opt.param_groups[1]["lr"] == lrs["lr_lape"] == pytest.approx(base * report)
        seen.append(lape_lr_factor(step, 0.5, 10))
    assert seen[0] == 0.0 and seen[5] == pytest.approx(0.05) and seen[10:] == [0.5] * 30


# -- trainable parts and LoRA ------------------------------------------------------------------------------


def test_lora_trains_only_the_adapters_and_the_open_parts() -> None:
    model, _ = build_model()
    trainable = Trainables(llm=LLMTraining.model_validate({"mode": "lora", "lora": {"r": 4, "alpha": 8}}))
    groups, scaling = set_trainable(model, trainable)
    assert scaling == 2.0
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in names) and all(
        n.split(".", 1)[0] in ("projector", "band_adapter", "lape") or "lora_" in n for n in names)
    assert {id(p) for p in groups["lape"]} == {id(p) for p in model.lape.parameters()}  # type: ignore[union-attr]


def test_lora_dropout_reaches_the_adapters() -> None:
    from peft.tuners.lora import LoraLayer

    model, _ = build_model()
    set_trainable(model, Trainables(llm=LLMTraining.model_validate({"mode": "lora", "lora": {"dropout": 0.5}})))
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers and all(isinstance(m.lora_dropout["default"], torch.nn.Dropout)
                          and m.lora_dropout["default"].p == 0.5 for m in layers)


def test_full_llm_training_opens_the_llm_and_nothing_else() -> None:
    model, _ = build_model()
    groups, scaling = set_trainable(model, Trainables(lape=False, band_adapter=False, llm=LLMTraining(mode="full")))
    names = {n.split(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
    assert scaling is None and names == {"projector", "language_model"} and groups["lape"] == []
    assert len(groups["main"]) == sum(1 for p in model.parameters() if p.requires_grad)


# -- reconstruction ------------------------------------------------------------------------------------------


def test_frame_masks_come_from_the_pipeline() -> None:
    assert torch.equal(frame_mask(4, 0), torch.ones(4, 4, dtype=torch.bool).tril())
    m = frame_mask(5, 2)
    assert m[4].tolist() == [False, False, False, True, True]
    fs = frame_mask(4, 3, is_fast=[False, True, False, True])
    assert fs[0].tolist() == [True, False, True, False] and fs[3].tolist() == [True, True, True, True]


def test_predictor_is_causal_over_frames_and_within_its_window() -> None:
    torch.manual_seed(0)
    n, t, p, dv, d = 2, 6, 4, 12, 16
    teacher, hidden = torch.randn(n, t, p, dv), torch.randn(n, t, p, d)
    deep = NextFramePredictor(dv, d, embedding_dim=16, num_layers=3, num_heads=2, num_hist=0).eval()
    one = NextFramePredictor(dv, d, embedding_dim=16, num_layers=1, num_heads=2, num_hist=2).eval()
    t2, h2 = teacher.clone(), hidden.clone()
    t2[:, 2] += 1.0
    h2[:, 2] -= 1.0
    with torch.no_grad():
        a, b = deep(teacher, hidden, (2, 2)), deep(t2, h2, (2, 2))
        assert a.shape == (n, t - 1, p, dv)
        assert torch.equal(a[:, :2], b[:, :2])  # predictions from frames 0, 1 never see frame 2
        assert not torch.allclose(a[:, 2:], b[:, 2:])
        a, b = one(teacher, hidden, (2, 2)), one(t2, h2, (2, 2))
        assert torch.equal(a[:, :2], b[:, :2]) and torch.equal(a[:, 4:], b[:, 4:])  # window of 2 frames
        assert not torch.allclose(a[:, 2:4], b[:, 2:4])


def test_multiscale_reconstruction_loss_averages_the_mse_of_each_pooled_grid() -> None:
    torch.manual_seed(0)
    teacher, hidden = torch.randn(2, 3, 16, 8), torch.randn(2, 3, 16, 12)
    one = NextFramePredictor(8, 12, embedding_dim=16, num_layers=1, num_heads=2, pool_strides=(1,))
    both = NextFramePredictor(8, 12, embedding_dim=16, num_layers=1, num_heads=2, pool_strides=(1, 2))
    both.load_state_dict(one.state_dict())
    a, b = one.loss(teacher, hidden, (4, 4)), both.loss(teacher, hidden, (4, 4))
    torch.testing.assert_close(a.prediction, b.prediction)
    flat = (4, 16, 8)  # N · (T − 1) frames predicted
    coarse = torch.nn.functional.mse_loss(pool_2d(b.prediction.reshape(flat), (4, 4), 2),
                                          pool_2d(b.target.reshape(flat), (4, 4), 2))
    torch.testing.assert_close(b.loss, (a.loss + coarse) / 2)
    assert float(coarse.detach()) < float(a.loss.detach())  # averaging 2 x 2 cells cancels part of the per-token error
    with pytest.raises(ValueError, match="pool_strides"):
        NextFramePredictor(8, 12, embedding_dim=16, num_heads=2, pool_strides=(0,))


def test_reconstruction_gradient_reaches_the_llm_states_and_fast_slow_masks_per_item() -> None:
    torch.manual_seed(0)
    pred = NextFramePredictor(8, 16, embedding_dim=16, num_layers=1, num_heads=2, num_hist=3)
    teacher = torch.randn(2, 4, 4, 8)
    hidden = torch.randn(2, 4, 4, 16, requires_grad=True)
    is_fast = torch.tensor([[False, False, True, True], [False, True, False, True]])
    out = pred.loss(teacher, hidden, (2, 2), is_fast)
    out.loss.backward()
    assert hidden.grad is not None and float(hidden.grad[:, :-1].abs().sum()) > 0
    assert float(hidden.grad[:, -1].abs().sum()) == 0  # the last frame has no next frame
    assert out.target.shape == (2, 3, 4, 8)
    torch.testing.assert_close(out.target.mean(-1), torch.zeros(2, 3, 4), atol=1e-5, rtol=0)  # layer-normed


def test_frozen_teacher_is_a_frozen_copy_that_pools_like_the_model() -> None:
    model, proc = build_model()
    teacher = FrozenTeacher(model, share_vision=False)
    assert teacher.vision_tower is not model.vision_tower and all(not p.requires_grad for p in teacher.parameters())
    shared = FrozenTeacher(model, share_vision=True)
    assert shared.vision_tower is model.vision_tower and shared.band_adapter is not model.band_adapter
    frames = torch.rand(2, 3, 1, 32, 32)
    feats, grid = teacher(frames)
    assert grid == (4, 4) and feats.shape == (2, 3, 16, 64) and not feats.requires_grad
    with torch.no_grad():
        x = model.band_adapter(frames.reshape(6, 1, 32, 32))
        ref = pool_2d(model.vision_tower(pixel_values=x).last_hidden_state, (8, 8), 2, "average").reshape(2, 3, 16, 64)
        torch.testing.assert_close(feats, ref)
        model.band_adapter.weight.add_(1.0)  # training the model's adapter leaves the teacher's targets alone
        torch.testing.assert_close(teacher(frames)[0], ref)
    batch = proc(text=["a <video> b", "<video> c"], images=[np.zeros((3, 1, 32, 32), np.float32)] * 2)
    ids = batch["input_ids"]
    hidden = ids[..., None].float().expand(*ids.shape, 5)  # each state holds its token id
    states = visual_hidden_states(hidden, ids, [proc.layout.image_token_id, proc.layout.video_token_id], 2, 3)
    assert states.shape == (2, 3, 16, 5) and bool((states == proc.layout.video_token_id).all())


def test_multi_turn_prompts_are_flattened_with_the_visual_placeholder_first() -> None:
    turns = [("user", "q1"), ("assistant", "a1"), ("user", "q2")]
    assert build_prompt(turns, eos="</s>") == "USER: <video>\nq1\nASSISTANT: a1</s>USER: q2\nASSISTANT: "
    assert build_prompt([("user", "q")], "<image>") == "USER: <image>\nq\nASSISTANT: "
    with pytest.raises(ValueError, match="needs eos"):  # an earlier answer ends with the tokenizer's eos
        build_prompt(turns)
