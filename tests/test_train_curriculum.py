"""Stage 1 → 2 → 3 on the tiny model and real recipe data from the embedded sample, and exact resume after SIGKILL."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from train_helpers import ROOT, curriculum_recipe, stage_yaml

from agrivlm.model import load_pretrained
from agrivlm.model.builders import TINY_CONFIG, build_model, load_model_settings
from agrivlm.train.config import LapeTrainConfig, load_stage_config
from agrivlm.train.curriculum import (
    enable_lape,
    frozen_head_warning,
    module_digests,
    read_stage_info,
)
from agrivlm.train.data import Collator, RecordDataset, read_split, select_records
from agrivlm.train.lora import ADAPTER_DIR
from agrivlm.train.schedule import base_lr_factor, lape_lr_factor
from agrivlm.train.trainer import read_seen, run_stage

STEPS = 12
BATCH = 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _common(data: Path, out: Path) -> dict[str, Any]:
    return {
        "output_dir": str(out), "data.roots": [str(data)], "train.max_steps": STEPS, "train.batch_size": BATCH,
        "train.save_every": 3, "train.torch_threads": 1, "train.progress": False, "train.eval_every": 0,
        "train.eval_batches": 2, "optim.warmup_steps": 0,
    }


@pytest.fixture(scope="module")
def curriculum(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    data = curriculum_recipe(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("curriculum")
    c1 = stage_yaml("stage1", tmp / "stage1.yaml", {**_common(data, tmp / "s1"), "optim.lr": 1e-2})
    s1 = run_stage(c1, stage="stage1")
    c2 = stage_yaml("stage2", tmp / "stage2.yaml", {
        **_common(data, tmp / "s2"), "model.init_from": str(s1), "optim.lr": 5e-3, "lape.lape_warmup_steps": 6,
        "reconstruction.enabled": True, "reconstruction.embedding_dim": 64, "reconstruction.num_heads": 4,
        "reconstruction.num_layers": 2, "reconstruction.num_hist": 2,
    })
    s2 = run_stage(c2, stage="stage2")
    c3 = stage_yaml("stage3", tmp / "stage3.yaml", {
        **_common(data, tmp / "s3"), "model.init_from": str(s2), "optim.lr": 2e-3,
        "data.families": ["field_boundaries", "growth_stages"], "trainable.llm.lora.r": 4,
    })
    s3 = run_stage(c3, stage="stage3")
    return {"data": data, "s1": s1, "s2": s2, "s3": s3, "c2": c2, "c3": c3}


def _sd(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _rows(final: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (final.parent / "logs" / "metrics.jsonl").read_text().splitlines()]


def _assert_changed_exactly(
    before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], trained: tuple[str, ...]
) -> None:
    assert before.keys() == after.keys()
    for key in before:
        same = torch.equal(before[key], after[key])
        if key.split(".", 1)[0] in trained:
            assert not same, f"{key} should have been trained"
        else:
            assert same, f"{key} should be frozen (bit-identical)"


def test_stage1_builds_without_lape_and_trains_only_projector_and_band_adapter(curriculum: dict[str, Path]) -> None:
    s1 = curriculum["s1"]
    info = read_stage_info(s1)
    assert info is not None and info["stage"] == "stage1" and info["lape"] is False
    settings = load_model_settings(TINY_CONFIG, {"lape.enabled": False})
    initial, _ = build_model(settings)  # seeded: the weights the stage started from
    assert info["init_digests"] == module_digests(initial)
    model, _ = load_pretrained(s1)
    assert not model.config.enable_lape and model.lape is None
    assert info["data"]["dropped_positions"] > 0 and info["data"]["kept"] > 0  # text-only alignment data
    _assert_changed_exactly(initial.state_dict(), _sd(s1), ("projector", "band_adapter"))


def test_stage2_starts_from_stage1_switches_lape_on_and_trains_projector_and_lape(curriculum: dict[str, Path]) -> None:
    s1, s2 = curriculum["s1"], curriculum["s2"]
    info = read_stage_info(s2)
    assert info is not None and info["stage"] == "stage2" and info["init_source"] == str(s1)
    prev, proc = load_pretrained(s1)
    prev_digests = module_digests(prev)
    for part in ("band_adapter", "vision_tower", "projector"):
        assert info["init_digests"][part] == prev_digests[part]
    # the starting model is stage 1's with LAPE switched on by the smart init, bit for bit
    start = enable_lape(prev, proc.tokenizer, LapeTrainConfig(), seed=0)
    assert info["init_digests"] == module_digests(start)
    emb = start.get_input_embeddings().weight.detach()
    table = start.lape.height_input.weight.detach()  # type: ignore[union-attr]
    assert abs(float(table.mean()) - float(emb.mean())) < 0.02 * float(emb.std())
    assert float(table.std()) == pytest.approx(0.1 * float(emb.std()), rel=0.05)
    model, _ = load_pretrained(s2)
    assert model.config.enable_lape
    assert model.config.spatial_loss_weight == 2.0 and model.config.temporal_loss_weight == 1.0
    assert model.config.num_spatial_tokens == 150 and model.config.num_temporal_tokens == 50
    _assert_changed_exactly(start.state_dict(), _sd(s2), ("projector", "band_adapter", "lape"))


def test_stage3_with_lora_on_the_tiny_random_llm_is_told_its_answers_cannot_end(curriculum: dict[str, Path]) -> None:
    # the tiny model's LLM is built from config: every stage records that its weights are not pretrained
    assert [read_stage_info(curriculum[s])["llm_pretrained"] for s in ("s1", "s2", "s3")] == [False] * 3  # type: ignore[index]
    lora = load_stage_config(curriculum["c3"])
    assert lora.trainable.llm.mode == "lora"
    assert "set trainable.llm.mode: full" in (frozen_head_warning(lora, False) or "")
    assert frozen_head_warning(lora, True) is None and frozen_head_warning(lora, None) is None
    assert frozen_head_warning(load_stage_config(curriculum["c3"], {"trainable.llm.mode": "full"}), False) is None
    assert frozen_head_warning(load_stage_config(curriculum["c2"]), False) is None  # stage 2 is not the final model


def test_stage2_lape_group_follows_its_warmup_and_losses_are_logged_apart(curriculum: dict[str, Path]) -> None:
    rows = [r for r in _rows(curriculum["s2"]) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    lr = 5e-3
    for r in rows:
        s = r["step"] - 1  # the LR used by optimizer step s (0-based)
        base = lr * base_lr_factor(s, STEPS, 0, "cosine")
        assert r["lr_main"] == pytest.approx(base, rel=1e-9)
        assert r["lr_lape"] == pytest.approx(base * lape_lr_factor(s, 0.5, 6), rel=1e-9)
    ratios = [r["lr_lape"] / r["lr_main"] for r in rows]
    # the LAPE report's warm-up: 0.1 · step / warmup for the 6 warm-up steps, then the multiplier 0.5
    assert ratios[:6] == pytest.approx([0.1 * k / 6 for k in range(6)]) and ratios[0] == 0.0
    assert all(x == pytest.approx(0.5) for x in ratios[6:])
    assert all(a < b for a, b in zip(ratios[:7], ratios[1:7], strict=False))
    for r in rows:  # main, position and reconstruction losses apart; total = main + 0.1 · reconstruction
        assert {"main_loss", "text_loss", "position_loss", "autoregressive_loss"} <= r.keys()
        assert r["loss"] == pytest.approx(r["main_loss"] + 0.1 * r["autoregressive_loss"], rel=1e-5)


def test_stage3_starts_from_stage2_and_trains_the_llm_through_lora(curriculum: dict[str, Path]) -> None:
    s2, s3 = curriculum["s2"], curriculum["s3"]
    info = read_stage_info(s3)
    assert info is not None and info["stage"] == "stage3" and info["init_source"] == str(s2)
    prev, _ = load_pretrained(s2)
    assert info["init_digests"] == module_digests(prev)
    start = prev.state_dict()
    ckpt = load_file(s3.parent / "checkpoints" / f"step_{STEPS:07d}" / "model.safetensors")
    model_sd = {k[len("model."):]: v for k, v in ckpt.items() if k.startswith("model.")}
    lora = [k for k in model_sd if "lora_" in k]
    assert lora and all(k.startswith("language_model.") for k in lora)
    assert all(not torch.equal(model_sd[k], torch.zeros_like(model_sd[k])) for k in lora if "lora_B" in k)
    for key, value in model_sd.items():
        if "lora_" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        trained = key.split(".", 1)[0] in ("projector", "band_adapter", "lape")
        assert torch.equal(start[plain], value) != trained, key  # the LLM's own weights stay frozen under LoRA
    final = _sd(s3)
    # the final weights are peft's merge of stage 2 + the adapter saved beside them, bit for bit
    base, _ = load_pretrained(s2)  # a fresh copy: peft merges into its weights in place
    merged = PeftModel.from_pretrained(base, str(s3 / ADAPTER_DIR)).merge_and_unload().state_dict()
    assert final.keys() == start.keys() == merged.keys()
    assert all(torch.equal(final[k], merged[k]) for k in final)
    q = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(final[q], start[q])
    model, proc = load_pretrained(s3)  # the final folder is a plain AgriVLM that runs
    records, _ = select_records(read_split([curriculum["data"]], "val"), _data_cfg(s3), 0, False)
    ds = RecordDataset(records[:2], _data_cfg(s3).frames, _data_cfg(s3).normalize, proc.vocab, 0,
                       _stats(s3), train=False)
    batch = Collator(proc, True)([ds[(0, 0)], ds[(0, 1)]])
    batch.pop("sample_ids"), batch.pop("is_fast")
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def _data_cfg(final: Path) -> Any:
    from agrivlm.train.config import StageConfig

    info = read_stage_info(final)
    assert info is not None
    return StageConfig.model_validate(info["config"]).data


def _stats(final: Path) -> Any:
    from agrivlm.pipeline.bands import BandStats

    return BandStats.from_dict(json.loads((final / "band_stats.json").read_text()))


@pytest.mark.parametrize("stage", ["s1", "s2", "s3"])
def test_loss_falls_in_every_stage(curriculum: dict[str, Path], stage: str) -> None:
    rows = _rows(curriculum[stage])
    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    assert set(evals) == {0, STEPS} and evals[STEPS] < evals[0] - 0.02, evals  # held-out val batches
    train = [r["loss"] for r in rows if "loss" in r]
    assert np.mean(train[-3:]) < np.mean(train[:3]), train


def test_band_stats_and_logs_carry_across_stages(curriculum: dict[str, Path]) -> None:
    stats = [json.loads((curriculum[s] / "band_stats.json").read_text()) for s in ("s1", "s2", "s3")]
    assert stats[0] == stats[1] == stats[2] and -1 < stats[0]["low"][0] < stats[0]["high"][0] <= 1  # NDVI
    for s in ("s1", "s2", "s3"):
        logs = curriculum[s].parent / "logs"
        assert (logs / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        header = (logs / "metrics.csv").read_text().splitlines()[0].split(",")
        assert {"step", "loss", "main_loss", "tokens_per_s", "lr_main", "eval_loss"} <= set(header)
        seen = read_seen(logs / "samples.jsonl")
        assert [r["step"] for r in seen] == list(range(1, STEPS + 1))
        samples = [int(r["samples"]) for r in _rows(curriculum[s]) if "loss" in r]
        assert np.cumsum([len(r["ids"]) for r in seen]).tolist() == samples  # a short batch ends each epoch
        assert all(0 < len(r["ids"]) <= BATCH for r in seen)


def test_killed_run_resumes_to_the_same_weights_and_samples(
    curriculum: dict[str, Path], tmp_path: Path
) -> None:
    """SIGKILL a real `agrivlm train stage2` process after its first checkpoint (plus a random delay), resume it,
    and compare with the uninterrupted stage-2 run of the curriculum: same weights bit for bit, same sample ids."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "agrivlm.cli", "train", "stage2", "--config", str(curriculum["c2"]),
           "--set", f"output_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 240
        while not any((out / "checkpoints").glob("step_???????")):
            assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.stderr.read()}"  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.02)
        time.sleep(random.SystemRandom().uniform(0.0, 0.6))  # a moment nobody chose (run_stage seeds `random`)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "final").exists(), "the run finished before it was killed; the test needs a mid-run kill"
    done = sorted(p.name for p in (out / "checkpoints").glob("step_???????"))
    assert done and done[-1] < f"step_{STEPS:07d}"
    resumed = run_stage(curriculum["c2"], {"output_dir": str(out)}, stage="stage2", resume=True)
    reference = curriculum["s2"]
    a, b = _sd(reference), _sd(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    seen_ref = read_seen(reference.parent / "logs" / "samples.jsonl")
    seen = read_seen(out / "logs" / "samples.jsonl")
    assert seen == seen_ref and len(seen) == STEPS
    rows_ref = [r for r in _rows(reference) if "loss" in r]
    rows = [r for r in _rows(resumed) if "loss" in r]
    assert [r["loss"] for r in rows] == [r["loss"] for r in rows_ref]


def test_final_folders_tell_inference_how_to_prepare_inputs(curriculum: dict[str, Path]) -> None:
    """The checkpoint carries its chip size, frame count, band preset and the training normalisation range."""
    from agrivlm.pipeline.inputs import load_input_config

    stats = _stats(curriculum["s3"])
    inputs, found = load_input_config(curriculum["s3"])
    assert found
    info = read_stage_info(curriculum["s3"])
    assert inputs.bands.low == pytest.approx(list(stats.low)) and inputs.bands.high == pytest.approx(list(stats.high))
    assert inputs.bands.preset == _data_cfg(curriculum["s3"]).normalize.preset
    assert inputs.frames.max_frames == inputs.min_frames == _data_cfg(curriculum["s3"]).frames.frames_per_sample
    assert inputs.chip_size == 32 and info is not None


def test_training_and_inference_render_a_question_identically(curriculum: dict[str, Path]) -> None:
    """Growth records asked in the wording ``agrivlm infer`` uses render, for training, to its very prompt."""
    from agrivlm.infer.prompts import build_prompt, stage_question
    from agrivlm.lape.tokens import LapeVocab
    from agrivlm.recipes.schema import read_records
    from agrivlm.train.data import render_record

    vocab = LapeVocab()
    records = [r for shard in sorted((curriculum["data"] / "shards").glob("*.jsonl"))
               for r in read_records(shard) if r.task == "stage_on_date"]
    compared = 0
    for rec in records:
        user = rec.conversation[0]
        if not user.times:
            continue  # the date in words (training asks both ways; inference gives the frame's <TEMP> token)
        asked = stage_question(vocab, user.boxes[0], user.times[0], str(rec.meta.get("class")))
        prompt, _, positions = render_record(rec, vocab, "<video>")
        if asked.text not in prompt:
            continue  # another of the recipes' phrasings
        assert build_prompt(asked.text, 4) == prompt
        assert list(asked.positions) == pytest.approx(positions[: len(asked.positions)])
        compared += 1
    assert compared > 0, f"none of {len(records)} stage_on_date records uses the inference wording"
