from __future__ import annotations

import numpy as np
import pytest
import torch

from agrivlm.lape.tokens import parse_positions
from agrivlm.model import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():  # type: ignore[no-untyped-def]
    model, proc = build_model()
    # make position tokens likely, so generation really emits them: raise the LAPE heads' scale
    with torch.no_grad():
        for head in (model.lape.height_output, model.lape.width_output, model.lape.temporal_output):
            head.weight.mul_(400.0)
    return model, proc


def _inputs(proc, padding_side: str = "left"):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(3)
    items = [rng.normal(size=(1, 32, 32)).astype(np.float32), rng.normal(size=(1, 32, 32)).astype(np.float32),
             rng.normal(size=(3, 1, 32, 32)).astype(np.float32)]
    texts = ["<image> box:", "<image> where is the largest field?", "<video> when?"]
    b1 = proc(texts[:2], images=items[:2], padding_side=padding_side)
    b2 = proc(texts[2:], images=items[2:], padding_side=padding_side)
    return b1, b2


def _greedy_without_cache(model, batch, steps: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, pixel_values=batch["pixel_values"],
                           frame_times=batch["frame_times"], use_cache=False).logits[:, -1]
        for t in model.generation_config.suppress_tokens:
            logits[:, t] = -float("inf")
        nxt = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        pos = torch.cat([pos, pos[:, -1:] + 1], 1)
    return ids[:, batch["input_ids"].shape[1]:]


def test_greedy_generate_with_kv_cache_matches_full_recomputation(tiny) -> None:
    model, proc = tiny
    offset = model.config.position_token_offset
    for batch in _inputs(proc):
        out = model.generate(**batch, max_new_tokens=6, do_sample=False, eos_token_id=None)
        new = out[:, batch["input_ids"].shape[1]:]
        assert new.shape[1] == 6
        assert torch.equal(new, _greedy_without_cache(model, batch, 6))
        assert (new >= offset).any(), "position tokens come out of generate()"


def test_generate_without_kv_cache_gives_the_cached_tokens(tiny) -> None:
    # use_cache=False re-reads the whole sequence each step (what benchmarks/infer.py measures the cache against):
    # the prompt's position values are padded for the generated tokens, and the answer is the same
    model, proc = tiny
    rng = np.random.default_rng(5)
    point = proc(["<image> Is <WIDTH-INPUT><HEIGHT-INPUT> in a field?"] * 2,
                 images=[rng.normal(size=(1, 32, 32)).astype(np.float32) for _ in range(2)],
                 positions=[[0.31, 0.72], [0.5, 0.1]], padding_side="left")
    assert torch.isfinite(point["position_values"]).sum() == 4
    for batch in (*_inputs(proc), point):
        cached = model.generate(**batch, max_new_tokens=6, do_sample=False, eos_token_id=None)
        uncached = model.generate(**batch, max_new_tokens=6, do_sample=False, eos_token_id=None, use_cache=False)
        assert torch.equal(cached, uncached)


def test_sampling_is_seeded_and_emits_valid_tokens(tiny) -> None:
    model, proc = tiny
    batch, _ = _inputs(proc)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        outs.append(model.generate(**batch, max_new_tokens=8, do_sample=True, top_k=50, temperature=1.0,
                                   eos_token_id=None))
    assert torch.equal(outs[0], outs[1])
    new = outs[0][:, batch["input_ids"].shape[1]:]
    assert int(new.max()) < len(proc.tokenizer) and int(new.min()) >= 0
    banned = set(model.generation_config.suppress_tokens)
    assert not banned & set(new.flatten().tolist())


def test_decode_positions_refines_within_the_generated_bin(tiny) -> None:
    model, proc = tiny
    batch, _ = _inputs(proc)
    res = model.generate(**batch, max_new_tokens=8, output_logits=True, return_dict_in_generate=True,
                         eos_token_id=None)
    new = res.sequences[:, batch["input_ids"].shape[1]:]
    coarse = model.decode_positions(new)
    fine = model.decode_positions(new, res.logits)
    text = proc.batch_decode(new, skip_special_tokens=False)
    for b in range(new.shape[0]):
        from_text = parse_positions(text[b], model.vocab)
        assert from_text.boxes == coarse[b].boxes and from_text.points == coarse[b].points
        assert len(fine[b].boxes) == len(coarse[b].boxes) and len(fine[b].points) == len(coarse[b].points)
        for c, f in zip(coarse[b].boxes + coarse[b].points, fine[b].boxes + fine[b].points, strict=True):
            # greedy ⇒ the token is the argmax; the expectation stays within the window around its centre
            assert np.all(np.abs(np.subtract(c, f)) <= 2.5 / 150 + 1e-9)
    assert any(p.boxes or p.points or p.segments for p in coarse)


def test_generate_with_continuous_input_positions(tiny) -> None:
    """A prompt point given as <WIDTH-INPUT><HEIGHT-INPUT> + values reaches the prefill, and changes the answer."""
    model, proc = tiny
    img = np.random.default_rng(5).normal(size=(1, 32, 32)).astype(np.float32)
    outs = []
    for point in ((0.1, 0.2), (0.9, 0.7)):
        b = proc("<image> what grows at <WIDTH-INPUT><HEIGHT-INPUT>?", images=[img], positions=[list(point)],
                 padding_side="left")
        with torch.no_grad():
            first = model(**b).logits[:, -1]
        out = model.generate(**b, max_new_tokens=4, eos_token_id=None, output_logits=True,
                             return_dict_in_generate=True)
        torch.testing.assert_close(out.logits[0], first)  # the prefill saw the interpolated embeddings
        outs.append(first)
    assert not torch.allclose(outs[0], outs[1])
