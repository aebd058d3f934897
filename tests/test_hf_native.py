"""Checkpoints as a transformers user picks them up: Auto classes, remote code, round trips, chat template, LoRA keys.

The tiny model of ``configs/model/tiny.yaml`` is saved as a stage's final folder
(:func:`agrivlm.train.final.save_final`) and then loaded the LLaVA way: ``AutoConfig`` /
``AutoModelForImageTextToText`` / ``AutoModelForCausalLM`` / ``AutoProcessor``, in this process and in fresh ones,
after ``import agrivlm.model`` or, never importing agrivlm, with ``trust_remote_code=True``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from infer_model import INPUTS, STATS, save_moved_tiny
from train_helpers import curriculum_recipe
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    BatchFeature,
    GenerationConfig,
    TextStreamer,
)
from typer.testing import CliRunner

from agrivlm.cli import app
from agrivlm.errors import ConfigError
from agrivlm.lape.tokens import POLYGON_SEP, Axis, LapeVocab, serialize_box, serialize_point, serialize_segment
from agrivlm.model import AgriVLMConfig, AgriVLMForConditionalGeneration, AgriVLMProcessor, build_model, load_pretrained
from agrivlm.pipeline.conversation import answer_end_id, answer_segments, answer_text, format_prompt
from agrivlm.pipeline.inputs import INPUT_CONFIG_FILE, load_input_config
from agrivlm.recipes.families import builders
from agrivlm.recipes.schema import Record, render_conversation
from agrivlm.remote_code import CONFIG_AUTO_MAP, PROCESSOR_AUTO_MAP, REMOTE_CODE_FILE
from agrivlm.tasks.turns import Turn
from agrivlm.train.card import MODEL_CARD
from agrivlm.train.config import LLMTraining, LoraSettings, Trainables
from agrivlm.train.curriculum import BAND_STATS, STAGE_INFO, read_band_stats, read_stage_info, set_trainable
from agrivlm.train.data import read_split, render_record
from agrivlm.train.final import write_model_card, write_side_files

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: The side files of a final folder, all written from its HF configs.
SIDE_FILES = (STAGE_INFO, INPUT_CONFIG_FILE, BAND_STATS)
#: Those and the model card: what a ``save_pretrained`` round trip drops and the configs write again.
FROM_CONFIGS = (*SIDE_FILES, MODEL_CARD)
INFO = {"stage": "stage3", "init_source": "runs/stage2/final", "llm_pretrained": False, "steps": 7,
        "config": {"train": {"max_steps": 7}}, "final_metrics": {"loss": 1.25}}


def _batch(proc: AgriVLMProcessor) -> BatchFeature:
    rng = np.random.default_rng(0)
    frames = [rng.normal(size=(2, 1, 32, 32)).astype(np.float32)]
    return proc(["USER: <video>\nOutline every field in this image.\nASSISTANT: "], images=frames)


def _logits(model: AgriVLMForConditionalGeneration, proc: AgriVLMProcessor) -> torch.Tensor:
    with torch.no_grad():
        return model(**_batch(proc)).logits  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def final(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stage's final folder of the tiny model (weights moved off their init), as the trainer writes it."""
    folder = tmp_path_factory.mktemp("hf") / "final"
    return save_moved_tiny(folder, {**INFO, "path": folder})  # a Path: stored as its text


def _essentials(folder: Path) -> dict[str, Any]:
    """What a round trip must keep: the HF files, the weights, the auto_maps, what the configs carry for agrivlm.

    (transformers itself adds keys of its own on a round trip, e.g. a sub-config's ``dtype``; they are left out.)
    """
    config = json.loads((folder / "config.json").read_text())
    return {
        "files": sorted(p.name for p in folder.iterdir() if p.name not in FROM_CONFIGS),
        "weights": (folder / "model.safetensors").read_bytes(),
        "config": {k: config[k] for k in ("auto_map", "stage_info", "model_type", "architectures")},
        "processor_config.json": (folder / "processor_config.json").read_bytes(),
        "generation_config.json": (folder / "generation_config.json").read_bytes(),
        "chat_template.jinja": (folder / "chat_template.jinja").read_bytes(),
        REMOTE_CODE_FILE: (folder / REMOTE_CODE_FILE).read_bytes(),
    }


# -- Auto classes ---------------------------------------------------------------------------------------------------


def test_the_auto_classes_give_the_agrivlm_classes_after_import(final: Path) -> None:
    config = json.loads((final / "config.json").read_text())
    assert config["auto_map"] == CONFIG_AUTO_MAP
    assert json.loads((final / "processor_config.json").read_text())["auto_map"] == PROCESSOR_AUTO_MAP
    assert (final / REMOTE_CODE_FILE).is_file() and (final / "chat_template.jinja").is_file()
    assert isinstance(AutoConfig.from_pretrained(final), AgriVLMConfig)
    model, proc = load_pretrained(final)
    auto = AutoModelForImageTextToText.from_pretrained(final).eval()
    causal = AutoModelForCausalLM.from_pretrained(final).eval()
    auto_proc = AutoProcessor.from_pretrained(final)
    assert type(auto) is type(causal) is AgriVLMForConditionalGeneration
    assert type(auto_proc) is AgriVLMProcessor
    want = _logits(model, proc)
    assert torch.equal(_logits(auto, auto_proc), want) and torch.equal(_logits(causal, auto_proc), want)


def test_as_a_causal_lm_a_text_only_prompt_generates(final: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(final)
    proc = AutoProcessor.from_pretrained(final)
    prompt = proc.apply_chat_template([{"role": "user", "content": "What is NDVI?"}], add_generation_prompt=True)
    assert prompt == "USER: What is NDVI?\nASSISTANT: "
    batch = proc(prompt)
    out = model.generate(**batch, max_new_tokens=3, min_new_tokens=3)
    assert out.shape == (1, batch["input_ids"].shape[1] + 3)


def test_generation_follows_the_saved_generation_config_and_streams(final: Path) -> None:
    config = GenerationConfig.from_pretrained(final)
    model = AutoModelForImageTextToText.from_pretrained(final).eval()
    proc = AutoProcessor.from_pretrained(final)
    end = answer_end_id(proc.tokenizer)
    assert (config.do_sample, config.max_new_tokens, config.eos_token_id) == (False, 32, end)
    assert model.generation_config.eos_token_id == end and model.generation_config.do_sample is False
    batch = _batch(proc)
    n = batch["input_ids"].shape[1]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        ids = model.generate(**batch, streamer=TextStreamer(proc.tokenizer, skip_prompt=True))
    new = ids[0, n:]
    assert 1 <= len(new) <= 32 and (len(new) == 32 or int(new[-1]) == end)  # max_new_tokens, or stopped at the end
    assert not set(new.tolist()) & set(config.suppress_tokens)  # never a placeholder or a LAPE control token
    assert printed.getvalue() == proc.tokenizer.decode(new) + "\n"  # the streamer printed the answer as generated
    assert torch.equal(model.generate(**batch), ids)  # greedy: the same again
    # the saved eos ends an answer: made the likeliest first token, it is the only one generated
    forced = model.generate(**batch, sequence_bias=[[[end], 100.0]])
    assert forced[0, n:].tolist() == [end]


#: Run in a fresh interpreter: load the folder through the Auto classes (after ``import agrivlm.model``, or with
#: ``trust_remote_code=True`` and no import), write what it saw.
FRESH = r"""
import json, sys
from pathlib import Path
mode, folder, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
if mode == "import":
    import agrivlm.model
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor
seen = {"agrivlm_before": any(m == "agrivlm" or m.startswith("agrivlm.") for m in sys.modules)}
kw = {} if mode == "import" else {"trust_remote_code": True}
if mode == "no-import":
    try:
        AutoConfig.from_pretrained(folder)
    except ValueError as exc:
        seen["without_trust"] = str(exc)
config = AutoConfig.from_pretrained(folder, **kw)
model = AutoModelForImageTextToText.from_pretrained(folder, **kw).eval()
causal = AutoModelForCausalLM.from_pretrained(folder, **kw)
proc = AutoProcessor.from_pretrained(folder, **kw)
seen["classes"] = [f"{type(o).__module__}.{type(o).__name__}" for o in (config, model, causal, proc)]
import numpy as np, torch
frames = [np.random.default_rng(0).normal(size=(2, 1, 32, 32)).astype(np.float32)]
batch = proc(["USER: <video>\nOutline every field in this image.\nASSISTANT: "], images=frames)
with torch.no_grad():
    torch.save(model(**batch).logits, out / "logits.pt")
seen["template"] = proc.apply_chat_template(
    [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Outline every field."}]}],
    add_generation_prompt=True)
seen["stage"] = model.config.stage_info["stage"]
seen["preset"] = proc.inputs["bands"]["preset"]
model.save_pretrained(out / "resaved")
proc.save_pretrained(out / "resaved")
(out / "seen.json").write_text(json.dumps(seen))
"""


@pytest.mark.parametrize("mode", ["import", "no-import"])
def test_a_fresh_process_loads_the_folder_after_import_or_with_trust_remote_code(
    final: Path, tmp_path: Path, mode: str
) -> None:
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # cwd: a folder without agrivlm in it, so `import agrivlm` can only find the installed package
    proc = subprocess.run([sys.executable, "-c", FRESH, mode, str(final), str(tmp_path)], cwd=tmp_path, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen["agrivlm_before"] is (mode == "import")
    if mode == "no-import":
        assert "trust_remote_code=True" in seen["without_trust"]
    assert seen["classes"] == [
        "agrivlm.model.configuration.AgriVLMConfig",  # the installed package's classes, not copies of them
        "agrivlm.model.modeling.AgriVLMForConditionalGeneration",
        "agrivlm.model.modeling.AgriVLMForConditionalGeneration",
        "agrivlm.model.processing.AgriVLMProcessor",
    ]
    model, proc_here = load_pretrained(final)
    assert torch.equal(torch.load(tmp_path / "logits.pt"), _logits(model, proc_here))
    assert seen["template"] == format_prompt([("user", "Outline every field.")], "<video>")
    assert (seen["stage"], seen["preset"]) == ("stage3", "ndvi")
    # saved again (after a remote-code load too): no module copied in, the same auto_map, the same files
    resaved = tmp_path / "resaved"
    assert _essentials(resaved) == _essentials(final)


# -- round trips ----------------------------------------------------------------------------------------------------


def test_a_triple_round_trip_keeps_outputs_and_everything_infer_needs(final: Path, tmp_path: Path) -> None:
    model, proc = load_pretrained(final)
    want = _logits(model, proc)
    folder = final
    for k in range(3):  # save_pretrained → from_pretrained, three times: no side file is ever written
        nxt = tmp_path / f"round{k}"
        model.save_pretrained(nxt)
        proc.save_pretrained(nxt)
        model, proc = load_pretrained(nxt)
        assert torch.equal(_logits(model, proc), want)
        folder = nxt
    assert _essentials(folder) == _essentials(final)
    assert not any((folder / name).exists() for name in SIDE_FILES)
    # the readers fall back to the HF configs
    assert load_input_config(folder) == (INPUTS, True)
    assert read_stage_info(folder) == read_stage_info(final) == json.loads((final / STAGE_INFO).read_text())
    assert read_stage_info(folder)["path"] == str(final)  # type: ignore[index]
    assert read_band_stats(folder) == read_band_stats(final) == STATS.to_dict()
    # and the side files come back from them, byte for byte
    assert sorted(p.name for p in write_side_files(folder)) == sorted(SIDE_FILES)
    assert write_model_card(folder) == folder / MODEL_CARD
    assert all((folder / name).read_bytes() == (final / name).read_bytes() for name in FROM_CONFIGS)
    for name in SIDE_FILES:
        (folder / name).unlink()
    # `agrivlm infer` on the re-saved folder: the band preset and the chips come from the processor's config
    from agrivlm.sample import SAMPLE_ROOT

    out = tmp_path / "pred.gpkg"
    res = CliRunner().invoke(app, ["infer", str(SAMPLE_ROOT / "ndvi"), "--model", str(folder), "--out", str(out),
                                   "--stride", "64", "--batch-size", "9", "--max-new-tokens", "4", "--device", "cpu",
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "pred_report.json").read_text())["questions"] == 9


def test_the_processor_chip_config_follows_the_input_settings(final: Path) -> None:
    proc = AgriVLMProcessor.from_pretrained(final)
    chips = proc.chip_settings
    assert chips.sampling == INPUTS.frames
    assert chips.bands is not None and chips.bands.preset == INPUTS.bands.preset == "ndvi"
    assert (chips.bands.low, chips.bands.high, chips.bands.percentiles) == (
        INPUTS.bands.low, INPUTS.bands.high, INPUTS.bands.percentiles)
    saved = json.loads((final / "processor_config.json").read_text())
    wrong = {**saved["chip_config"], "sampling": {**saved["chip_config"]["sampling"], "max_frames": 5}}
    with pytest.raises(ConfigError, match="chip_config: its sampling/bands disagree with inputs"):
        AgriVLMProcessor(proc.tokenizer, chip_config=wrong, inputs=saved["inputs"])
    with pytest.raises(ConfigError, match="band_stats"):
        proc.set_checkpoint_inputs(None, {"low": [0.0]})


def test_a_folder_saved_without_agrivlm_train_has_no_side_files_and_the_defaults(tmp_path: Path) -> None:
    model, proc = build_model()
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    assert write_side_files(tmp_path) == [] and write_model_card(tmp_path) is None
    assert load_input_config(tmp_path)[1] is False
    assert read_stage_info(tmp_path) is None and read_band_stats(tmp_path) is None
    (tmp_path / "processor_config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="processor_config.json: the top level must be an object of keys, not list"):
        load_input_config(tmp_path)


# -- chat template --------------------------------------------------------------------------------------------------


def _lape_turns(record: Record, vocab: LapeVocab) -> list[tuple[str, str]]:
    return render_conversation(record, lambda b: serialize_box(b, vocab), lambda p: serialize_point(p, vocab),
                               lambda s: serialize_segment(s, vocab), lambda t: vocab.encode(Axis.TEMP, t),
                               polygon_sep=POLYGON_SEP)


def _messages(turns: list[tuple[str, str]], visual: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for k, (role, text) in enumerate(turns):
        content: Any = [{"type": visual}, {"type": "text", "text": text}] if k == 0 else text
        out.append({"role": role, "content": content})
    return out


def test_the_chat_template_writes_the_training_prompts_of_every_task_family(
    final: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    records = [sr.record for sr in read_split([curriculum_recipe(tmp_path_factory)], "train")]
    by_task = {(r.family, r.task): r for r in records}  # one record of every task
    assert {family for family, _ in by_task} == set(builders())
    # the recipes ask one question per record here; a multi-turn one is supervised on every answer
    base = by_task["growth_stages", "green_up_date"]
    extra = [Turn(role="assistant", text="Let me look."), Turn(role="user", text="And when exactly?")]
    multi = base.model_copy(update={"conversation": [base.conversation[0], *extra, base.conversation[1]]})
    proc = AgriVLMProcessor.from_pretrained(final)  # the template as saved and loaded
    eos = proc.tokenizer.eos_token
    vocab = LapeVocab(proc.num_spatial_tokens, proc.num_temporal_tokens)
    for record in [*by_task.values(), multi]:
        for visual, token in (("video", "<video>"), ("image", "<image>")):
            prompt, answer, _ = render_record(record, vocab, token)
            messages = _messages(_lape_turns(record, vocab), visual)
            # asking for the last answer: the prompt and every earlier segment (answers ended by eos)
            before_last = prompt + "".join(text + (eos if supervised else "")
                                           for text, supervised in answer_segments(answer)[:-1])
            asked = proc.apply_chat_template(messages[:-1], add_generation_prompt=True)
            assert asked == before_last, record.sample_id
            by_tokenizer = proc.tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
            assert by_tokenizer == before_last
            # the answer as training supervises it (a multi-turn record: every answer, each ended by eos)
            assert proc.apply_chat_template(messages) == prompt + answer_text(answer, eos)
    with pytest.raises(Exception, match="user and assistant turns only"):
        proc.apply_chat_template([{"role": "system", "content": "You are helpful."}, *messages])


# -- LoRA -----------------------------------------------------------------------------------------------------------


def test_videos_with_dates_numpy_returns_and_a_tokenized_chat_template(final: Path) -> None:
    """The processor takes videos (LLaVA-NeXT-Video's argument) with their dates, returns numpy on request, and
    ``apply_chat_template(tokenize=True)`` gives the same batch as the processor on the rendered prompt."""
    proc = AgriVLMProcessor.from_pretrained(final)
    video = np.random.default_rng(1).normal(size=(3, 1, 32, 32)).astype(np.float32)
    dates = ["2021-03-01", "2021-05-01", "2021-09-01"]  # t on their calendar year: days 59, 120, 243 of 365
    prompt = format_prompt([("user", "Outline every field in this image.")], "<video>")
    by_dates = proc([prompt], videos=[video], video_dates=[dates])
    np.testing.assert_allclose(by_dates["frame_times"].numpy(), [[59 / 365, 120 / 365, 243 / 365]], atol=1e-6)
    by_times = proc([prompt], images=[video], frame_times=[[0.0, 61 / 184, 1.0]])
    assert torch.equal(by_dates["input_ids"], by_times["input_ids"])
    as_np = proc([prompt], videos=[video], video_dates=[dates], return_tensors="np")
    assert all(isinstance(v, np.ndarray) for v in as_np.values())
    np.testing.assert_array_equal(as_np["input_ids"], by_dates["input_ids"].numpy())
    messages = [{"role": "user", "content": [{"type": "video", "video": video},
                                             {"type": "text", "text": "Outline every field in this image."}]}]
    out = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                   processor_kwargs={"video_dates": [dates]})
    assert torch.equal(out["input_ids"], by_dates["input_ids"])
    assert torch.equal(out["pixel_values"], by_dates["pixel_values"])
    with pytest.raises(ValueError, match="images= or as videos="):
        proc([prompt], images=[video], videos=[video])
    with pytest.raises(ValueError, match="1 bands|num_bands=1"):
        proc([prompt], videos=[np.zeros((3, 4, 32, 32), np.float32)])


def test_every_lora_key_reaches_peft() -> None:
    from peft.tuners.lora import LoraLayer

    settings = {"r": 3, "alpha": 12.0, "dropout": 0.5, "target_modules": ["q_proj", "down_proj"]}
    assert set(settings) == set(LoraSettings.model_fields)  # a new key fails here until it is checked below
    model, _ = build_model()
    set_trainable(model, Trainables(llm=LLMTraining.model_validate({"mode": "lora", "lora": settings})))
    config = model.language_model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (3, 12.0, 0.5)
    assert set(config.target_modules) == {"q_proj", "down_proj"}
    layers = {name: m for name, m in model.language_model.named_modules() if isinstance(m, LoraLayer)}
    assert {name.rsplit(".", 1)[-1] for name in layers} == {"q_proj", "down_proj"}
    for layer in layers.values():
        assert layer.r["default"] == 3 and layer.scaling["default"] == 12.0 / 3
        assert layer.lora_A["default"].weight.shape[0] == 3
        drop = layer.lora_dropout["default"]
        assert type(drop) is torch.nn.Dropout and drop.p == 0.5
