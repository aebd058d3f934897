from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from agrivlm.errors import ConfigError
from agrivlm.lape.embedding import cell_centres, token_transfer
from agrivlm.lape.tokens import Axis, position_interp, serialize_box, serialize_segment
from agrivlm.model import AgriVLMConfig, ModelSettings, build_model, load_model_settings
from agrivlm.model.builders import TINY_CONFIG
from agrivlm.model.modeling import BandAdapter
from agrivlm.pipeline.inputs import IGNORE_INDEX, num_visual_tokens

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():  # type: ignore[no-untyped-def]
    return build_model()


def _rand_frames(n: int, t: int, size: int = 32, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(t, 1, size, size)).astype(np.float32) for _ in range(n)]


def test_config_checks_values_and_round_trips() -> None:
    cfg = AgriVLMConfig()
    assert cfg.vision_config.model_type == "siglip_vision_model" and cfg.text_config.model_type == "qwen2"
    again = AgriVLMConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    with pytest.raises(ConfigError, match="pool_mode: 'median' is not one of"):
        AgriVLMConfig(pool_mode="median")
    with pytest.raises(ConfigError, match="vision_config: model_type 'vit' is not one of"):
        AgriVLMConfig(vision_config={"model_type": "vit"})
    with pytest.raises(ConfigError, match="num_spatial_tokens: must be ≥ 2"):
        AgriVLMConfig(num_spatial_tokens=1)


def test_tiny_yaml_is_the_default_and_unknown_keys_are_errors(tmp_path: Path) -> None:
    assert load_model_settings(TINY_CONFIG) == ModelSettings()
    bad = tmp_path / "m.yaml"
    bad.write_text("lape:\n  num_spatial_tokns: 100\n")
    with pytest.raises(ConfigError, match=r"m.yaml: lape.num_spatial_tokns: unknown key"):
        load_model_settings(bad)
    bad.write_text("lape:\n  spatial_pos_weight: 2.0\n")  # the old name of the injection scale
    with pytest.raises(ConfigError, match=r"m.yaml: lape: .*spatial_pos_weight was renamed spatial_injection_scale"):
        load_model_settings(bad)


def test_forward_shapes_for_images_and_frames(tiny) -> None:
    model, proc = tiny
    vocab_total = len(proc.tokenizer)
    # one image per sample, two samples
    b = proc(["<image> where?", "<image> box of the field:"], images=[f[0] for f in _rand_frames(2, 1)])
    with torch.no_grad():
        out = model(**b)
    assert out.logits.shape == (2, b["input_ids"].shape[1], vocab_total)
    # frames [N, T, C, H, W] of a size other than the encoder's 32 px: interpolate_pos_encoding
    frames = _rand_frames(1, 3, size=48)
    b = proc("<video> when?", images=frames)
    assert b["pixel_values"].shape == (1, 3, 1, 48, 48)
    with torch.no_grad():
        vis = model.get_visual_features(b["pixel_values"], b["frame_times"])
        out = model(**b)
    assert vis.shape == (1, num_visual_tokens(3, 48, 48, 4, 2), 64) == (1, 3 * 36, 64)
    assert torch.isfinite(out.logits).all()


def test_placeholder_count_mismatch_is_a_clear_error(tiny) -> None:
    model, proc = tiny
    b = proc("<image> where?", images=[_rand_frames(1, 1)[0][0]])
    with pytest.raises(ValueError, match=r"hold 16 <image>/<video> tokens but the 1 visual items give 64"):
        model(input_ids=b["input_ids"], pixel_values=torch.zeros(1, 1, 1, 64, 64))
    with pytest.raises(ValueError, match="num_bands=1"):
        model(input_ids=b["input_ids"], pixel_values=torch.zeros(1, 1, 3, 32, 32))


def test_band_adapter_starts_as_identity_or_grey() -> None:
    three = BandAdapter(3, 3)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(torch.nn.functional.conv2d(x, three.default_weight()), x)
    one = BandAdapter(1, 3).default_weight()
    assert torch.equal(one, torch.ones(3, 1, 1, 1))
    model, _ = build_model(ModelSettings(num_bands=3))
    with torch.no_grad():
        torch.testing.assert_close(model.band_adapter(x), x)  # the model's own init is the identity
    grey, _ = build_model(ModelSettings(num_bands=1))
    with torch.no_grad():
        torch.testing.assert_close(grey.band_adapter(x[:, :1]), x[:, :1].expand(2, 3, 5, 5))


def _mean_token_cosine(model, frames: torch.Tensor) -> float:  # type: ignore[no-untyped-def]
    n, t, c, h, w = frames.shape
    with torch.no_grad():
        feats = model.vision_tower(pixel_values=model.band_adapter(frames.reshape(n * t, c, h, w))).last_hidden_state
        p = model.projector(feats).reshape(-1, model.config.text_config.hidden_size)
    p = p / p.norm(dim=-1, keepdim=True)
    return float((p @ p.T).mean())


def test_projector_norm_keeps_visual_tokens_apart_and_survives_a_round_trip(tmp_path: Path) -> None:
    from agrivlm.model.builders import load_pretrained

    settings = load_model_settings(TINY_CONFIG)
    frames = torch.rand(4, 4, 1, 32, 32)
    assert settings.projector_norm == "batch"  # configs/model/tiny.yaml (and small.yaml) standardise
    plain, _ = build_model(settings.model_copy(update={"projector_norm": "none"}))
    normed, processor = build_model(settings.model_copy(update={"projector_norm": "batch"}))
    # a random encoder's tokens share one direction; standardised features do not
    assert _mean_token_cosine(plain, frames) > 0.8
    normed.train()  # training standardises with the batch's statistics and updates the running ones
    assert _mean_token_cosine(normed, frames) < 0.2
    normed.eval()
    normed.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    again, _ = load_pretrained(tmp_path)
    assert again.config.projector_norm == "batch"
    torch.testing.assert_close(again.projector.norm.running_mean, normed.projector.norm.running_mean)
    with torch.no_grad():
        x = torch.randn(3, 7, normed.config.vision_config.hidden_size)
        torch.testing.assert_close(again.projector(x), normed.projector(x))
    assert plain.projector.norm is None and AgriVLMConfig().projector_norm == "none"  # older checkpoints load as before


def test_position_tokens_use_the_lape_tables_and_heads(tiny) -> None:
    model, proc = tiny
    cfg = model.config
    offset = cfg.position_token_offset
    vocab = model.vocab
    text = "at <WIDTH-INPUT> " + serialize_box((0.1, 0.2, 0.3, 0.4))
    b = proc(text, positions=[[0.555, 0.1, 0.2, 0.3, 0.4]])
    ids = b["input_ids"]
    with torch.no_grad():
        emb = model.embed_tokens(ids, b["position_values"])
        tables = {a: model.lape.input_table(a) for a in (Axis.HEIGHT, Axis.WIDTH, Axis.TEMP)}
    row = {tok: i for i, tok in enumerate(proc.tokenizer.convert_ids_to_tokens(ids[0].tolist()))}
    w15 = row["<WIDTH-015>"]
    torch.testing.assert_close(emb[0, w15], tables[Axis.WIDTH][15])
    inp = row["<WIDTH-INPUT>"]
    torch.testing.assert_close(emb[0, inp], token_transfer(tables[Axis.WIDTH], torch.tensor([0.555]))[0])
    assert int(ids[0, 0]) < offset  # "at": a text token keeps the LLM's own embedding
    torch.testing.assert_close(emb[0, 0], model.get_input_embeddings().weight[ids[0, 0]])
    # logits: text columns from the LLM head, position columns from the LAPE heads (in vocabulary layout)
    hidden = torch.randn(3, cfg.text_config.hidden_size)
    with torch.no_grad():
        logits = model.compute_logits(hidden)
        many = model.compute_logits(torch.randn(200, cfg.text_config.hidden_size))  # the stacked-weight path
    assert logits.shape == (3, offset + vocab.num_position_tokens) == (3, len(proc.tokenizer))
    assert many.shape == (200, len(proc.tokenizer))
    torch.testing.assert_close(logits[:, :offset], model.get_output_embeddings()(hidden))
    start = offset + vocab.axis_offset(Axis.TEMP)
    torch.testing.assert_close(logits[:, start:], hidden @ model.lape.temporal_output.weight.T)


def _dense_soft_loss(model, logits, labels, values, weights_by_axis) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The loss written out the slow way: full soft-target distributions, −Σ p·log softmax, weighted mean."""
    offset = model.config.position_token_offset
    vocab = model.vocab
    total, wsum = 0.0, 0.0
    for b in range(labels.shape[0]):
        for i in range(1, labels.shape[1]):
            t = int(labels[b, i])
            if t == IGNORE_INDEX:
                continue
            p = torch.zeros(logits.shape[-1], dtype=torch.float64)
            w = 1.0
            if t >= offset:
                axis, index = vocab.locate(t - offset)
                n = vocab.size(axis)
                v = float(values[b, i]) if torch.isfinite(values[b, i]) else (index + 0.5) / n
                lo, hi, r = position_interp(v, n)
                base = offset + vocab.axis_offset(axis)
                p[base + lo] += 1 - r
                p[base + hi] += r
                w = weights_by_axis[axis]
            else:
                p[t] = 1.0
            logq = torch.log_softmax(logits[b, i - 1].double(), -1)
            total += w * float(-(p * logq).sum())
            wsum += w
    return torch.tensor(total / wsum)


@pytest.mark.parametrize(("sw", "tw"), [(1.0, 1.0), (2.0, 0.5)])
def test_loss_is_weighted_soft_target_cross_entropy(sw: float, tw: float) -> None:
    settings = ModelSettings.model_validate({"lape": {"spatial_loss_weight": sw, "temporal_loss_weight": tw}})
    model, proc = build_model(settings)
    box, seg = (0.1234, 0.5, 0.77, 0.9991), (0.3, 0.61)
    b = proc(
        ["<image> box?", "<image> when?"],
        images=[f[0] for f in _rand_frames(2, 1)],
        answers=[serialize_box(box), "green-up " + serialize_segment(seg)],
        positions=[list(box), [seg[0], float("nan")]],  # second TEMP without a value → its bin centre
    )
    model.train()
    out = model(**b)
    expect = _dense_soft_loss(model, out.logits.detach(), b["labels"], b["position_values"],
                              {Axis.WIDTH: sw, Axis.HEIGHT: sw, Axis.TEMP: tw})
    assert float(out.loss.detach()) == pytest.approx(float(expect), rel=1e-5)
    assert out.text_loss is not None and out.position_loss is not None
    out.loss.backward()
    assert model.lape.width_output.weight.grad.abs().sum() > 0
    assert model.band_adapter.weight.grad.abs().sum() > 0  # the loss reaches the pixels' adapter


def test_output_placeholder_labels_need_values(tiny) -> None:
    model, proc = tiny
    b = proc("<image> x?", images=[_rand_frames(1, 1)[0][0]], answers="<WIDTH-OUTPUT><HEIGHT-OUTPUT>",
             positions=[[0.42, float("nan")]])
    with pytest.raises(ValueError, match="-OUTPUT label has no value"):
        model(**b)
    b = proc("<image> x?", images=[_rand_frames(1, 1)[0][0]], answers="<WIDTH-OUTPUT><HEIGHT-OUTPUT>",
             positions=[[0.42, 0.58]])
    with torch.no_grad():
        out = model(**b)
    assert torch.isfinite(out.loss)


def test_injection_adds_exactly_the_interpolated_tables(tiny) -> None:
    model, proc = tiny
    cfg = model.config
    b = proc("<video>", images=_rand_frames(1, 2), frame_times=[[0.25, 0.9]])
    with torch.no_grad():
        with_lape = model.get_visual_features(b["pixel_values"], b["frame_times"])
        old = (cfg.spatial_injection_scale, cfg.temporal_injection_scale)
        cfg.spatial_injection_scale, cfg.temporal_injection_scale = 0.0, 0.0
        try:
            bare = model.get_visual_features(b["pixel_values"], b["frame_times"])
        finally:
            cfg.spatial_injection_scale, cfg.temporal_injection_scale = old
        rows, cols = cell_centres(8, 2), cell_centres(8, 2)  # 32 px / patch 4 = 8 patches, pooled by 2
        hgt = token_transfer(model.lape.input_table(Axis.HEIGHT), rows)
        wid = token_transfer(model.lape.input_table(Axis.WIDTH), cols)
        tmp = token_transfer(model.lape.input_table(Axis.TEMP), torch.tensor([0.25, 0.9]))
    diff = (with_lape - bare).reshape(2, 4, 4, -1)
    torch.testing.assert_close(diff[1, 2, 3], hgt[2] + wid[3] + tmp[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(diff[0, 0, 0], hgt[0] + wid[0] + tmp[0], rtol=1e-5, atol=1e-6)


def test_lape_off_makes_position_tokens_plain_vocabulary() -> None:
    model, proc = build_model(ModelSettings.model_validate({"lape": {"enabled": False}}))
    assert model.lape is None
    assert model.config.text_config.vocab_size == len(proc.tokenizer)
    b = proc("<image> box?", images=[_rand_frames(1, 1)[0][0]], answers=serialize_box((0.1, 0.2, 0.3, 0.4)))
    out = model(**b)
    assert out.logits.shape[-1] == len(proc.tokenizer)
    shift = out.logits[0, :-1]
    tgt = b["labels"][0, 1:]
    keep = tgt != IGNORE_INDEX
    expect = torch.nn.functional.cross_entropy(shift[keep], tgt[keep])
    torch.testing.assert_close(out.loss, expect)


def test_clip_vision_encoder_drops_its_cls_token() -> None:
    model, proc = build_model(ModelSettings.model_validate({"vision": {"type": "clip"}}))
    assert model.config.vision_config.model_type == "clip_vision_model"
    b = proc("<image> where?", images=[_rand_frames(1, 1)[0][0]])
    with torch.no_grad():
        vis = model.get_visual_features(b["pixel_values"])
        out = model(**b)
    assert vis.shape == (1, 16, 64) and torch.isfinite(out.logits).all()


def test_number_text_init_builds_from_the_llm_digit_embeddings() -> None:
    model, proc = build_model(ModelSettings.model_validate({"lape": {"init": "number_text"}}))
    emb = model.get_input_embeddings().weight.detach()
    ids = proc.tokenizer("7", add_special_tokens=False)["input_ids"]
    assert len(ids) == 1
    table = model.lape.height_input.weight.detach()
    noise = (table[7] - emb[ids[0]]).std()
    assert float(noise) == pytest.approx(0.1 * float(emb.std()), rel=0.5)  # the digit's row plus 0.1·std noise
    assert float((table[7] - emb[ids[0]]).norm()) < float((table[7] - emb[ids[0] + 1]).norm())
