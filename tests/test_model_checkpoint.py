from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPConfig,
    CLIPModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from agrivlm.errors import ConfigError
from agrivlm.lape.tokens import serialize_box
from agrivlm.model import AgriVLMConfig, AgriVLMForConditionalGeneration, ModelSettings, build_model, load_pretrained
from agrivlm.model.processing import AgriVLMProcessor
from agrivlm.model.tokenizer import default_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(proc: AgriVLMProcessor, size: int = 32):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    items = [rng.normal(size=(2, 1, size, size)).astype(np.float32) for _ in range(2)]
    texts = ["<video> box:", "<video> at <WIDTH-INPUT><HEIGHT-INPUT>?"]
    answers = [serialize_box((0.1, 0.2, 0.6, 0.7)), "green-up"]
    return proc(texts, images=items, answers=answers, positions=[[0.1, 0.2, 0.6, 0.7], [0.4, 0.45]])


def test_save_pretrained_round_trip_gives_identical_logits(tmp_path: Path) -> None:
    model, proc = build_model()
    with torch.no_grad():
        # move the LAPE weights away from their init so the test sees them saved
        model.lape.width_input.weight.add_(torch.randn_like(model.lape.width_input.weight))
        model.band_adapter.weight.mul_(1.5)
        before = model(**_batch(proc))
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    again, proc2 = load_pretrained(tmp_path)
    assert isinstance(again, AgriVLMForConditionalGeneration)
    assert len(proc2.tokenizer) == len(proc.tokenizer)
    assert proc2.tokenizer.convert_tokens_to_ids("<TEMP-049>") == len(proc.tokenizer) - 1
    assert again.config.position_token_offset == model.config.position_token_offset
    assert again.generation_config.suppress_tokens == model.generation_config.suppress_tokens
    b2 = _batch(proc2)
    assert torch.equal(b2["input_ids"], _batch(proc)["input_ids"])
    with torch.no_grad():
        after = again(**b2)
    assert torch.equal(before.logits, after.logits)
    assert torch.equal(before.loss, after.loss)
    # the HF auto classes find both
    auto_model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert isinstance(auto_model, AgriVLMForConditionalGeneration)
    assert isinstance(AutoProcessor.from_pretrained(tmp_path), AgriVLMProcessor)


def test_a_config_json_saved_with_the_old_injection_keys_still_loads(tmp_path: Path) -> None:
    # spatial/temporal_pos_weight were the model config's names of the injection scales (now *_injection_scale)
    settings = ModelSettings.model_validate({"lape": {"spatial_injection_scale": 0.5, "temporal_injection_scale": 2.0}})
    model, proc = build_model(settings)
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    with torch.no_grad():
        before = model(**_batch(proc)).logits
        default = build_model()[0](**_batch(proc)).logits
    assert not torch.equal(before, default)  # the scales change the logits, so the check below can fail
    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    data["spatial_pos_weight"] = data.pop("spatial_injection_scale")
    data["temporal_pos_weight"] = data.pop("temporal_injection_scale")
    path.write_text(json.dumps(data))
    again, proc2 = load_pretrained(tmp_path)
    assert (again.config.spatial_injection_scale, again.config.temporal_injection_scale) == (0.5, 2.0)
    assert not hasattr(again.config, "spatial_pos_weight")
    with torch.no_grad():
        assert torch.equal(again(**_batch(proc2)).logits, before)
    again.save_pretrained(tmp_path / "resaved")  # saved again: the new names only
    resaved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert resaved["spatial_injection_scale"] == 0.5 and "spatial_pos_weight" not in resaved
    with pytest.raises(ConfigError, match="both spatial_pos_weight .* keep only spatial_injection_scale"):
        AgriVLMConfig(spatial_pos_weight=0.5, spatial_injection_scale=2.0)
    assert AgriVLMConfig(temporal_pos_weight=3.0, temporal_injection_scale=3.0).temporal_injection_scale == 3.0


def test_local_checkpoints_siglip_and_tied_qwen2_load_and_round_trip(tmp_path: Path) -> None:
    """A real-checkpoint layout: a SigLIP vision folder; a Qwen2 folder (tied, padded vocab) with its tokenizer."""
    torch.manual_seed(0)
    vdir, ldir = tmp_path / "siglip", tmp_path / "qwen2"
    vision = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                  num_attention_heads=2, image_size=32, patch_size=8))
    vision.save_pretrained(vdir)
    tok = default_tokenizer(512)
    llm = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok) + 24, hidden_size=48, intermediate_size=96,
                                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                       tie_word_embeddings=True))
    llm.save_pretrained(ldir)
    tok.save_pretrained(ldir)

    model, proc = build_model(ModelSettings.model_validate(
        {"vision": {"checkpoint": str(vdir)}, "llm": {"checkpoint": str(ldir)}}))
    ref_vision = SiglipVisionModel.from_pretrained(vdir).state_dict()
    mine = model.vision_tower.state_dict()
    assert set(mine) <= set(ref_vision) and all(torch.equal(mine[k], ref_vision[k]) for k in mine)
    offset = model.config.position_token_offset
    assert offset == len(tok) + 8  # <image>, <video>, 6 LAPE controls; position tokens after them
    emb = model.get_input_embeddings().weight
    assert emb.shape == (offset, 48)  # the padded LLM vocabulary resized to the tokenizer's text part
    assert torch.equal(emb[: len(tok)], llm.get_input_embeddings().weight[: len(tok)])
    assert model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()  # still tied
    # LAPE initialised from this LLM's embedding statistics (tied → heads copy the tables)
    src = llm.get_input_embeddings().weight.detach()
    table = model.lape.height_input.weight.detach()
    assert float(table.std()) == pytest.approx(0.1 * float(src.std()), rel=0.1)
    assert torch.equal(model.lape.height_output.weight, model.lape.height_input.weight)
    assert proc.patch_size == 8

    b = _batch(proc)
    with torch.no_grad():
        before = model(**b)
    assert before.logits.shape[-1] == len(proc.tokenizer)
    model.save_pretrained(tmp_path / "agrivlm")
    proc.save_pretrained(tmp_path / "agrivlm")
    again, proc2 = load_pretrained(tmp_path / "agrivlm")
    with torch.no_grad():
        after = again(**_batch(proc2))
    assert torch.equal(before.logits, after.logits)
    assert again.get_output_embeddings().weight.data_ptr() == again.get_input_embeddings().weight.data_ptr()


def test_full_clip_checkpoint_gives_its_vision_tower(tmp_path: Path) -> None:
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 4},
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 99},
        projection_dim=16))
    clip.save_pretrained(tmp_path / "clip")
    model, proc = build_model(ModelSettings.model_validate({"vision": {"checkpoint": str(tmp_path / "clip")}}))
    assert model.config.vision_config.model_type == "clip_vision_model"
    ref = {k.removeprefix("vision_model."): v for k, v in clip.state_dict().items() if k.startswith("vision_model.")}
    mine = model.vision_tower.state_dict()
    assert set(mine) == set(ref) and all(torch.equal(mine[k], ref[k]) for k in mine)
    with torch.no_grad():
        out = model(**_batch(proc))
    assert torch.isfinite(out.logits).all()


def test_missing_or_wrong_checkpoint_folders_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="llm.checkpoint: .*nowhere is not a folder"):
        build_model(ModelSettings.model_validate({"llm": {"checkpoint": str(tmp_path / "nowhere")}}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="vision.checkpoint: .*no config.json"):
        build_model(ModelSettings.model_validate({"vision": {"checkpoint": str(tmp_path / "empty")}}))
    with pytest.raises(ConfigError, match="no config.json"):
        load_pretrained(tmp_path / "empty")
