"""LoRA through peft end to end, the model card and accelerate's trackers, on the tiny model.

A "stage 2" folder of the tiny model is the base; stage 3 trains its LLM through LoRA. The adapter a LoRA stage
saves (``final/adapter``) loads with ``PeftModel.from_pretrained(base, ...)`` and gives the final folder's model,
merged or not; ``model.adapter`` starts a stage from base + adapter. A real 2-step stage-3 run writes all of it, a
model card a re-save writes again byte for byte, and TensorBoard events through ``train.report_to``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from infer_model import INPUTS, STATS, save_moved_tiny
from peft import PeftModel
from safetensors.torch import load_file
from train_helpers import curriculum_recipe, stage_yaml
from transformers import AutoModelForImageTextToText, BatchFeature

from agrivlm.config import parse_config
from agrivlm.errors import ConfigError
from agrivlm.model import AgriVLMForConditionalGeneration, AgriVLMProcessor, build_model, load_pretrained
from agrivlm.model.builders import TINY_CONFIG, load_model_settings
from agrivlm.pipeline.conversation import answer_end_id
from agrivlm.train.card import MODEL_CARD
from agrivlm.train.config import StageConfig
from agrivlm.train.curriculum import build_stage_model, final_model, read_stage_info
from agrivlm.train.final import save_final, write_model_card
from agrivlm.train.logs import TRACKER_PROJECT, check_trackers, tracker_config
from agrivlm.train.lora import ADAPTER_CONFIG, ADAPTER_DIR
from agrivlm.train.trainer import run_stage

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LORA = {"r": 4, "alpha": 8.0, "dropout": 0.1, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def _batch(proc: AgriVLMProcessor) -> BatchFeature:
    rng = np.random.default_rng(0)
    frames = [rng.normal(size=(2, 1, 32, 32)).astype(np.float32)]
    return proc(["USER: <video>\nOutline every field in this image.\nASSISTANT: "], images=frames)


def _logits(model: Any, proc: AgriVLMProcessor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**_batch(proc)).logits  # type: ignore[no-any-return]


def _stage3(init: Path, out: Path, data: str = "unused", **model: Any) -> StageConfig:
    return StageConfig.model_validate({
        "stage": "stage3", "output_dir": str(out), "model": {"init_from": str(init), **model}, "lape": {},
        "trainable": {"llm": {"mode": "lora", "lora": LORA}}, "data": {"roots": [data]},
    })


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stage-2 final folder of the tiny model (LAPE on), weights moved off their init."""
    folder = tmp_path_factory.mktemp("peft") / "stage2_final"
    return save_moved_tiny(folder, {"stage": "stage2", "init_source": "tiny", "llm_pretrained": False})


@pytest.fixture(scope="module")
def lora_final(base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Stage 3's model from ``base`` with its LoRA B matrices, projector and LAPE moved as training would move them,
    saved as the trainer saves it (:func:`final_model` → :func:`save_final`); and that trained model itself."""
    folder = tmp_path_factory.mktemp("peft") / "stage3_final"
    sm = build_stage_model(_stage3(base, folder.parent))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in sm.model.named_parameters():
            if "lora_B" in name or name.startswith(("projector.", "lape.")):
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model = final_model(sm, sm.model.state_dict(), _stage3(base, folder).trainable.llm.lora)
    save_final(folder, model, sm.processor, INPUTS, STATS, {"stage": "stage3", "init_source": str(base)})
    return {"folder": folder, "trained": sm.model, "processor": sm.processor}


# -- the adapter ----------------------------------------------------------------------------------------------------


def test_the_adapter_is_saved_in_peft_format_with_every_lora_key(lora_final: dict[str, Any], base: Path) -> None:
    adapter = lora_final["folder"] / ADAPTER_DIR
    assert {p.name for p in adapter.iterdir()} >= {ADAPTER_CONFIG, "adapter_model.safetensors"}
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["lora_dropout"]) == ("LORA", 4, 8.0, 0.1)
    assert config["target_modules"] == r"language_model\..*\.(q_proj|v_proj|down_proj)"
    assert config["base_model_name_or_path"] == str(base)
    # what stage 3 changed besides the LLM is saved whole (here the band adapter, trainable, kept its weights)
    assert sorted(config["modules_to_save"]) == ["lape", "projector"]
    weights = load_file(adapter / "adapter_model.safetensors")
    lora = [k for k in weights if "lora_" in k]
    assert len(lora) == 2 * 3 * 2  # A and B × 3 targets × the tiny LLM's 2 layers
    assert all(k.startswith("base_model.model.language_model.") for k in lora)
    assert {k.split(".")[2] for k in weights if "lora_" not in k} == {"lape", "projector"}


def test_base_plus_adapter_is_the_merged_final_folder(lora_final: dict[str, Any], base: Path) -> None:
    folder = lora_final["folder"]
    merged, proc = load_pretrained(folder)
    want = _logits(lora_final["trained"], proc)  # the model as it trained: LoRA injected, not merged
    # peft on the base, unmerged: the very same computation as in training
    unmerged = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), str(folder / ADAPTER_DIR))
    assert torch.equal(_logits(unmerged, proc), want)
    # merged weights: the same logits up to float rounding of W + s·B·A
    got = _logits(merged, proc)
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()
    assert not torch.equal(got, _logits(load_pretrained(base)[0], proc))  # and not the base's
    # peft's merge of base + adapter is the final folder's weights, bit for bit
    remerged = unmerged.merge_and_unload()
    assert type(remerged) is AgriVLMForConditionalGeneration
    assert _same_state(remerged.state_dict(), load_file(folder / "model.safetensors"))


def test_a_stage_starts_from_base_plus_adapter(lora_final: dict[str, Any], base: Path, tmp_path: Path) -> None:
    adapter = lora_final["folder"] / ADAPTER_DIR
    cfg = _stage3(base, tmp_path, adapter=str(adapter))
    cfg.trainable.llm.mode = "full"
    sm = build_stage_model(cfg)
    assert sm.init_adapter == str(adapter) and sm.init_source == str(base)
    assert _same_state(sm.model.state_dict(), load_file(lora_final["folder"] / "model.safetensors"))


def test_an_adapter_that_is_not_one_or_does_not_fit_is_a_config_error(
    lora_final: dict[str, Any], base: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=rf"model.adapter: {tmp_path} has no adapter_config.json"):
        build_stage_model(_stage3(base, tmp_path, adapter=str(tmp_path)))
    other, proc = build_model(load_model_settings(TINY_CONFIG, {"llm.hidden_size": 48}))
    odd = tmp_path / "odd"
    save_final(odd, other, proc, INPUTS, STATS, {"stage": "stage2"})
    with pytest.raises(ConfigError, match=rf"model.adapter: .*adapter does not fit the model of {odd}"):
        build_stage_model(_stage3(odd, tmp_path, adapter=str(lora_final["folder"] / ADAPTER_DIR)))
    stage1 = StageConfig.model_validate({"stage": "stage1", "output_dir": str(tmp_path), "data": {"roots": ["x"]},
                                         "model": {"adapter": "a"}})
    with pytest.raises(ConfigError, match="model.adapter: stage1 builds its model from model.config"):
        build_stage_model(stage1)


# -- trackers -------------------------------------------------------------------------------------------------------


def test_a_tracker_not_installed_is_one_clear_config_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for module in ("tensorboard", "tensorboardX"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails, find_spec finds nothing
    with pytest.raises(ConfigError) as err:
        check_trackers(["tensorboard"])
    assert str(err.value) == ("train.report_to: tensorboard needs the tensorboard package, which is not installed; "
                              "pip install 'agrivlm[track]' (or pip install tensorboard), or remove tensorboard from "
                              "train.report_to")
    cfg = _stage3(tmp_path, tmp_path / "run")
    cfg.train.report_to = ["tensorboard"]
    with pytest.raises(ConfigError, match="tensorboard needs the tensorboard package"):
        run_stage(cfg)
    assert not (tmp_path / "run").exists()  # refused before anything was written
    assert check_trackers([]) == []


def test_report_to_reaches_the_accelerator(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import accelerate

    from agrivlm.train import trainer

    seen: dict[str, Any] = {}

    class Stop(Exception):
        pass

    class Spy(accelerate.Accelerator):
        def __init__(self, **kwargs: Any) -> None:
            seen.update(kwargs)
            raise Stop

    # the check is tested above; here every tracker counts as installed
    monkeypatch.setattr(trainer, "check_trackers", lambda names: list(dict.fromkeys(names)))
    monkeypatch.setattr(accelerate, "Accelerator", Spy)
    cfg = _stage3(tmp_path, tmp_path / "run")
    cfg.train.report_to = ["tensorboard", "wandb", "tensorboard"]
    with pytest.raises(Stop):
        run_stage(cfg)
    assert seen["log_with"] == ["tensorboard", "wandb"] and seen["project_dir"] == str(tmp_path / "run" / "logs")
    cfg.train.report_to = []
    with pytest.raises(Stop):
        run_stage(cfg)
    assert seen["log_with"] is None


def test_report_to_names_only_accelerate_trackers() -> None:
    with pytest.raises(ConfigError, match=r"stage.yaml: train.report_to.0: .*'tensorboard'"):
        parse_config(StageConfig, {"stage": "stage1", "output_dir": "x", "data": {"roots": ["x"]},
                                   "train": {"report_to": ["tensorbord"]}}, "stage.yaml")


def test_the_tracker_config_is_flat_scalars() -> None:
    flat = tracker_config(_stage3(Path("base"), Path("out")).model_dump(mode="json"))
    assert flat["trainable.llm.lora.r"] == 4 and flat["optim.lr"] == 1e-3 and flat["train.report_to"] == "[]"
    assert flat["trainable.llm.lora.target_modules"] == '["q_proj", "v_proj", "down_proj"]'
    assert flat["model.adapter"] == "null" and flat["data.roots"] == '["unused"]'
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())


# -- a real stage-3 run with LoRA: adapter, card, trackers, generation settings -------------------------------------


@pytest.fixture(scope="module")
def run(base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two optimizer steps of stage 3 through LoRA from ``base``, on the tiny curriculum recipe, with TensorBoard
    through accelerate when it is installed (the test extra installs it)."""
    data = curriculum_recipe(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("peft_run")
    tensorboard = _has("tensorboard")
    config = stage_yaml("stage3", tmp / "stage3.yaml", {
        "output_dir": str(tmp / "s3"), "model.init_from": str(base), "data.roots": [str(data)],
        "trainable.llm.lora": LORA, "train.max_steps": 2, "train.batch_size": 4, "train.save_every": 2,
        "train.torch_threads": 1, "train.progress": False, "train.eval_every": -1, "optim.warmup_steps": 0,
        "optim.lr": 1e-2, "train.report_to": ["tensorboard"] if tensorboard else [],
    })
    return {"final": run_stage(config, stage="stage3"), "data": data, "tensorboard": tensorboard}


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_a_lora_stage_writes_its_adapter_and_peft_merges_it_to_the_final_weights(
    run: dict[str, Any], base: Path
) -> None:
    final = run["final"]
    unmerged = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), str(final / ADAPTER_DIR))
    _, proc = load_pretrained(final)
    merged_logits = _logits(load_pretrained(final)[0], proc)
    got = _logits(unmerged, proc)
    assert (got - merged_logits).abs().max() <= 1e-6 * merged_logits.abs().max()
    assert _same_state(unmerged.merge_and_unload().state_dict(), load_file(final / "model.safetensors"))


def test_the_model_card_is_written_from_the_saved_configs(run: dict[str, Any], tmp_path: Path) -> None:
    final, data = run["final"], run["data"]
    card = (final / MODEL_CARD).read_text()
    info = read_stage_info(final)
    assert info is not None and info["steps"] == 2 and info["started_at"] <= info["finished_at"]
    manifest = json.loads((data / "manifest.json").read_text())
    assert info["data_sources"][0]["records_by_task"] == manifest["counts"]["by_task"]
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: image-text-to-text\n")
    assert "# agrivlm stage3 model" in card
    assert f"- starts from `{info['init_source']}`" in card
    assert f"- `{data}`: recipe `{manifest['recipe']}`" in card
    for task, counts in manifest["counts"]["by_task"].items():  # every task's record counts, from the manifest
        assert f"| {task} | {counts['train']} | {counts['val']} | {counts['test']} |" in card
    assert "| optimizer steps | 2 of 2 |" in card
    assert f"| loss | {info['final_metrics']['loss']:.4g} |" in card
    assert "LLM through LoRA (r 4, alpha 8.0, dropout 0.1, targets q_proj, v_proj, down_proj" in card
    assert "## Held-out scores\n\nNone recorded" in card and "## Intended use and limits" in card
    assert "Its LLM started from random weights" in card
    # a save_pretrained round trip loses the card; the saved configs write it again, the same bytes
    model, proc = load_pretrained(final)
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    assert not (tmp_path / MODEL_CARD).exists()
    assert write_model_card(tmp_path) == tmp_path / MODEL_CARD
    assert (tmp_path / MODEL_CARD).read_text() == card
    # held-out scores, when a later evaluation puts them into the stage info
    model.config.stage_info = {**info, "heldout": {"pannonian_9000": {"f1_at_0.5": 0.1234567}}}
    model.save_pretrained(tmp_path)
    write_model_card(tmp_path)
    assert "| pannonian_9000 / f1_at_0.5 | 0.1235 |" in (tmp_path / MODEL_CARD).read_text()


def test_the_trained_folder_keeps_the_generation_settings(run: dict[str, Any]) -> None:
    final = run["final"]
    saved = json.loads((final / "generation_config.json").read_text())
    _, proc = load_pretrained(final)
    assert saved["do_sample"] is False and saved["max_new_tokens"] == 32
    assert saved["eos_token_id"] == answer_end_id(proc.tokenizer)


def test_report_to_tensorboard_writes_events_through_accelerate(run: dict[str, Any]) -> None:
    if not run["tensorboard"]:
        pytest.skip("tensorboard is not installed (pip install -e '.[test]' installs it)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = run["final"].parent / "logs"
    events = list((logs / TRACKER_PROJECT).glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    rows = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
    assert [e.step for e in acc.Scalars("loss")] == [r["step"] for r in rows] == [1, 2]
    for event, row in zip(acc.Scalars("loss"), rows, strict=True):  # the JSONL rows, as float32
        assert event.value == pytest.approx(row["loss"], rel=1e-6)
    assert (logs / "metrics.csv").is_file() and (logs / "loss_curves.png").is_file()  # the own logs stay
