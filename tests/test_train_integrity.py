"""Nothing lost, nothing silently wrong in training: verified checkpoints, non-finite losses and weights stop the run,
a resume with changed optimiser or batch settings is refused unless allowed (tiny real model, real training)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from train_helpers import curriculum_recipe, stage_yaml
from typer.testing import CliRunner

from agrivlm.cli import app
from agrivlm.errors import ConfigError, TrainError
from agrivlm.train.checkpoint import MARKER, CheckpointError, list_checkpoints, verify_checkpoint
from agrivlm.train.schedule import base_lr_factor
from agrivlm.train.trainer import SETTINGS_CHANGES, SETTINGS_FILE, first_nonfinite, run_stage

STEPS = 4
LR = 1e-2

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _overrides(data: Path, out: Path, **extra: Any) -> dict[str, Any]:
    return {
        "output_dir": str(out), "data.roots": [str(data)], "train.max_steps": STEPS, "train.batch_size": 4,
        "train.save_every": 2, "train.keep_checkpoints": 2, "train.torch_threads": 1, "train.progress": False,
        "train.eval_every": -1, "optim.warmup_steps": 0, "optim.lr": LR, **extra,
    }


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One finished 4-step stage-1 run (checkpoints after steps 2 and 4), copied by each test that alters it."""
    data = curriculum_recipe(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("integrity")
    out = tmp / "run"
    config = stage_yaml("stage1", tmp / "stage1.yaml", _overrides(data, out))
    final = run_stage(config, stage="stage1")
    return {"data": data, "out": out, "final": final}


def _copy_run(pristine: dict[str, Path], tmp_path: Path, keep_final: bool = False) -> tuple[Path, Path]:
    """The pristine run copied to ``tmp_path/run`` (without ``final/``: a run killed after its last checkpoint),
    and a stage-1 YAML pointing at the copy."""
    out = tmp_path / "run"
    shutil.copytree(pristine["out"], out)
    if not keep_final:
        shutil.rmtree(out / "final")
    return out, stage_yaml("stage1", tmp_path / "stage1.yaml", _overrides(pristine["data"], out))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree_digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): _digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_markers_record_a_hash_of_every_checkpoint_file(pristine: dict[str, Path]) -> None:
    ckpts = list_checkpoints(pristine["out"] / "checkpoints")
    assert [p.name for p in ckpts] == ["step_0000002", "step_0000004"]
    for ckpt in ckpts:
        marker = json.loads((ckpt / MARKER).read_text())
        assert marker["step"] == int(ckpt.name[-7:])
        files = {p.name for p in ckpt.iterdir()} - {MARKER}
        assert set(marker["files"]) == files and "model.safetensors" in files
        for name, rec in marker["files"].items():
            assert rec == {"bytes": (ckpt / name).stat().st_size, "sha256": _digest(ckpt / name)}
        assert verify_checkpoint(ckpt) is True


def test_resume_skips_a_corrupt_newest_checkpoint_and_goes_on_from_the_older_one(
    pristine: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out, config = _copy_run(pristine, tmp_path)
    newest, older = out / "checkpoints" / "step_0000004", out / "checkpoints" / "step_0000002"
    weights = newest / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    mid = len(raw) // 2
    raw[mid: mid + 16] = bytes(b ^ 0xFF for b in raw[mid: mid + 16])  # same size, flipped bytes in the tensors
    weights.write_bytes(bytes(raw))
    older_before = _tree_digests(older)
    with caplog.at_level(logging.WARNING):
        final = run_stage(config, stage="stage1", resume=True)
    warned = caplog.text
    assert f"{weights}: corrupt" in warned and f"resuming from {older}" in warned
    # steps 3 and 4 were trained again from step 2: the same weights as the uninterrupted run, bit for bit
    assert _same_weights(final, pristine["final"])
    assert _tree_digests(older) == older_before  # the intact checkpoint it resumed from is untouched
    assert verify_checkpoint(newest) is True  # step 4 written again, whole
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_resume_without_an_intact_checkpoint_names_the_files_and_removes_nothing(
    pristine: dict[str, Path], tmp_path: Path
) -> None:
    out, config = _copy_run(pristine, tmp_path)
    cut = []
    for ckpt in list_checkpoints(out / "checkpoints"):
        weights = ckpt / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        cut.append(weights)
    before = _tree_digests(out)
    with pytest.raises(CheckpointError) as info:
        run_stage(config, stage="stage1", resume=True)
    msg = str(info.value)
    assert "\n" not in msg and str(out / "checkpoints") in msg and "no intact checkpoint" in msg
    for weights in cut:
        assert f"{weights}: truncated (1000 bytes" in msg
    assert _tree_digests(out) == before and not (out / "final").exists()


def test_a_checkpoint_from_before_the_hashes_still_resumes_unverified(
    pristine: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out, config = _copy_run(pristine, tmp_path)
    newest = out / "checkpoints" / "step_0000004"
    (newest / MARKER).write_text(json.dumps({"step": STEPS}))  # the old marker: the step only
    (out / SETTINGS_FILE).unlink()  # and no settings file: the run's settings come from its stage_info.json
    with caplog.at_level(logging.WARNING):
        final = run_stage(config, stage="stage1", resume=True)
    assert f"{newest}: saved without file hashes" in caplog.text
    assert _same_weights(final, pristine["final"])


def test_a_nan_weight_in_init_from_is_refused_before_training(pristine: dict[str, Path], tmp_path: Path) -> None:
    init = tmp_path / "stage1_final"
    shutil.copytree(pristine["final"], init)
    weights = load_file(init / "model.safetensors")
    name = next(k for k in sorted(weights) if k.startswith("vision_tower.") and k.endswith(".weight"))
    weights[name].view(-1)[:3] = float("nan")
    save_file(weights, init / "model.safetensors", metadata={"format": "pt"})
    init_before = _tree_digests(init)
    out = tmp_path / "s2"
    config = stage_yaml("stage2", tmp_path / "stage2.yaml",
                        _overrides(pristine["data"], out, **{"model.init_from": str(init)}))
    with pytest.raises(TrainError) as info:
        run_stage(config, stage="stage2")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{init}: parameter {name} (3 NaN, 0 inf of ")
    assert "not finite before training" in msg and "model.init_from" in msg
    assert _tree_digests(init) == init_before and not (out / "checkpoints").exists()


def test_a_loss_that_blows_up_stops_at_its_step_and_keeps_earlier_checkpoints(
    pristine: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "diverged"
    config = stage_yaml("stage1", tmp_path / "stage1.yaml",
                        _overrides(pristine["data"], out, **{"optim.lr": 1e30, "train.save_every": 1}))
    with pytest.raises(TrainError) as info:
        run_stage(config, stage="stage1")
    msg = str(info.value)
    # the first update sets the projector to ~1e30; the next forward overflows to NaN, caught before its update
    assert "\n" not in msg and msg.startswith(f"optimizer step 2 of {STEPS}: the loss is not finite (")
    assert "every parameter is finite (largest |value| 1e+30 in model.projector." in msg
    assert f"checkpoints up to {out / 'checkpoints' / 'step_0000001'} are kept" in msg and "optim.lr" in msg
    (ckpt,) = list_checkpoints(out / "checkpoints")
    assert ckpt.name == "step_0000001" and verify_checkpoint(ckpt) is True
    assert first_nonfinite(list(load_file(ckpt / "model.safetensors").items())) is None  # saved before the NaN
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and not (out / "final").exists()


def test_first_nonfinite_names_the_first_bad_tensor_with_its_counts() -> None:
    good = torch.ones(4)
    bad = torch.tensor([1.0, float("nan"), float("inf"), float("-inf")])
    assert first_nonfinite([("a", good), ("b", good)]) is None and first_nonfinite([]) is None
    assert first_nonfinite([("a", good), ("b", bad), ("c", bad)]) == "b (1 NaN, 2 inf of 4 values)"


def test_resume_with_a_changed_lr_is_refused_unless_allowed_and_then_recorded(
    pristine: dict[str, Path], tmp_path: Path
) -> None:
    out, config = _copy_run(pristine, tmp_path)
    shutil.rmtree(out / "checkpoints" / "step_0000004")  # killed between the checkpoints of steps 2 and 4
    before = _tree_digests(out)
    args = ["train", "stage1", "--config", str(config), "--resume", "--set", "optim.lr=0.02",
            "--set", "train.batch_size=2"]
    result = CliRunner().invoke(app, args)
    exc = result.exception
    assert isinstance(exc, ConfigError) and "\n" not in str(exc)
    assert "optim.lr 0.01 → 0.02, train.batch_size 4 → 2" in str(exc)
    assert "--allow-changed-settings" in str(exc) and "--overwrite" in str(exc)
    assert _tree_digests(out) == before and not (out / "logs" / SETTINGS_CHANGES).exists()

    result = CliRunner().invoke(app, [*args, "--allow-changed-settings"])
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in (out / "logs" / SETTINGS_CHANGES).read_text().splitlines()]
    assert record["step"] == 2
    assert record["changes"] == {"optim.lr": {"old": LR, "new": 0.02}, "train.batch_size": {"old": 4, "new": 2}}
    settings = json.loads((out / SETTINGS_FILE).read_text())
    assert settings["from_step"] == 2 and settings["settings"]["optim.lr"] == 0.02
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[1]["lr_main"] == pytest.approx(LR * base_lr_factor(1, STEPS, 0, "cosine"))
    assert rows[2]["lr_main"] == pytest.approx(0.02 * base_lr_factor(2, STEPS, 0, "cosine"))  # the new rate
    # the new settings are now the run's: resuming again with them needs no flag (and changes nothing)
    shutil.rmtree(out / "final")
    assert CliRunner().invoke(app, args).exit_code == 0
    assert len((out / "logs" / SETTINGS_CHANGES).read_text().splitlines()) == 1
