from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from agrivlm.geo import ChipStream, open_stack
from agrivlm.lape.tokens import LapeVocab, serialize_box, serialize_segment
from agrivlm.model.processing import AgriVLMProcessor
from agrivlm.model.tokenizer import add_agrivlm_tokens, default_tokenizer
from agrivlm.pipeline.inputs import IGNORE_INDEX, num_visual_tokens, visual_token_grid


@pytest.fixture(scope="module")
def processor() -> AgriVLMProcessor:
    tok = default_tokenizer()
    add_agrivlm_tokens(tok, LapeVocab())
    return AgriVLMProcessor(tokenizer=tok, patch_size=4, pool_stride=2, num_bands=1)


@pytest.fixture(scope="module")
def real_chips(sample_root: Path) -> list[np.ndarray]:
    """Real (T, 1, 32, 32) NDVI chips of the embedded sample, clouds set to NaN as a caller would."""
    stack = open_stack(sample_root / "ndvi", masks=sample_root / "cloud_mask")
    out = []
    for chip in ChipStream(stack, chip_size=32, stride=32):
        data = chip.data.copy()
        data[np.broadcast_to(chip.mask[:, None], data.shape)] = np.nan
        out.append(data)
        if len(out) == 3:
            break
    return out


def test_visual_token_grid_is_the_one_count() -> None:
    assert visual_token_grid(32, 32, 4, 2) == (4, 4)
    assert visual_token_grid(36, 44, 4, 2) == (5, 6)  # 9 x 11 patches, ceil over the stride
    assert visual_token_grid(64, 32, 8, 1) == (8, 4)
    assert num_visual_tokens(3, 36, 44, 4, 2) == 90
    with pytest.raises(ValueError, match="multiple of the vision encoder's patch size 4"):
        visual_token_grid(33, 32, 4, 2)


def test_image_and_video_placeholders_expand_to_the_exact_count(processor, real_chips) -> None:
    image = real_chips[0][10]  # one date, (1, 32, 32)
    video = real_chips[1][:3]  # three dates, (3, 1, 32, 32)
    b1 = processor("<image> Where is the field?", images=[image])
    image_id, video_id = processor.layout.image_token_id, processor.layout.video_token_id
    assert int((b1["input_ids"] == image_id).sum()) == 16
    assert b1["pixel_values"].shape == (1, 1, 1, 32, 32)
    b2 = processor("Season: <video> When is the peak?", images=[video])
    assert int((b2["input_ids"] == video_id).sum()) == 3 * 16
    assert b2["pixel_values"].shape == (1, 3, 1, 32, 32)
    torch.testing.assert_close(b2["frame_times"], torch.tensor([[0.0, 0.5, 1.0]]))
    # the placeholder tokens sit where the placeholder was: right after "Season:"
    ids = b2["input_ids"][0].tolist()
    first = ids.index(video_id)
    assert ids[first:first + 48] == [video_id] * 48


def test_nodata_becomes_zero_and_values_are_kept(processor, real_chips) -> None:
    frames = real_chips[0]
    assert np.isnan(frames).any(), "the sample has cloudy dates"
    batch = processor("<video>", images=[frames])
    pv = batch["pixel_values"][0].numpy()
    assert np.isfinite(pv).all()
    finite = np.isfinite(frames)
    np.testing.assert_array_equal(pv[finite], frames[finite])
    assert (pv[~finite] == 0).all()


def test_batch_of_items_in_reading_order_with_labels_and_left_padding(processor, real_chips) -> None:
    items = [real_chips[0][0], real_chips[1][0], real_chips[2][0]]
    texts = ["<image> box?", "compare <image> with <image> please"]
    answers = [serialize_box((0.1, 0.2, 0.3, 0.4)), "the second one"]
    batch = processor(texts, images=items, answers=answers)
    np.testing.assert_array_equal(batch["pixel_values"][:, 0].numpy(), np.stack(items))
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    tok = processor.tokenizer
    for b, answer in enumerate(answers):
        supervised = labels[b][labels[b] != IGNORE_INDEX].tolist()
        assert supervised == tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n = int(mask[b].sum())
        assert ids[b, :n][-len(supervised):].tolist() == supervised  # right padding: answer ends the real tokens
    left = processor(texts, images=items, padding_side="left")  # prompts only, for generation
    prompt0 = ids[0][labels[0] == IGNORE_INDEX][: int(mask[0].sum()) - int((labels[0] != IGNORE_INDEX).sum())]
    assert left["attention_mask"][0, 0] == 0 and left["attention_mask"][0, -1] == 1
    assert left["input_ids"][0, -len(prompt0):].tolist() == prompt0.tolist()


def test_positions_align_with_the_lape_tokens(processor) -> None:
    box = (0.123, 0.456, 0.789, 0.901)
    seg = (0.2, 0.6)
    prompt = "Is <WIDTH-INPUT><HEIGHT-INPUT> in the field? When?"
    answer = serialize_box(box) + " from " + serialize_segment(seg)
    batch = processor(prompt, answers=answer, positions=[[0.31, 0.72, *box, *seg]])
    vals = batch["position_values"][0]
    ids = batch["input_ids"][0]
    where = torch.nonzero(torch.isfinite(vals)).flatten().tolist()
    toks = processor.tokenizer.convert_ids_to_tokens(ids[where].tolist())
    assert toks[:2] == ["<WIDTH-INPUT>", "<HEIGHT-INPUT>"]
    assert [t.split("-")[0] for t in toks[2:]] == ["<WIDTH", "<HEIGHT", "<WIDTH", "<HEIGHT", "<TEMP", "<TEMP"]
    torch.testing.assert_close(vals[where], torch.tensor([0.31, 0.72, *box, *seg]))
    with pytest.raises(ValueError, match="8 position values for 7 LAPE tokens"):
        processor("<WIDTH-INPUT>", answers=answer, positions=[[0.1] * 8])


def test_bad_inputs_name_the_problem(processor, real_chips) -> None:
    img = real_chips[0][0]
    with pytest.raises(ValueError, match="no images were given"):
        processor("<image> hi")
    with pytest.raises(ValueError, match="2 visual items for 1"):
        processor("<image> hi", images=[img, img])
    with pytest.raises(ValueError, match="use <video>"):
        processor("<image> hi", images=[real_chips[0][:2]])
    with pytest.raises(ValueError, match="bands"):
        processor("<image> hi", images=[np.zeros((3, 32, 32), np.float32)])
    with pytest.raises(ValueError, match="share frames"):
        processor(["<image>", "<image>"], images=[img, np.zeros((1, 16, 16), np.float32)])
    with pytest.raises(ValueError, match="patch size"):
        processor("<image>", images=[np.zeros((1, 30, 30), np.float32)])
    with pytest.raises(ValueError, match=r"frame_times\[0\]"):
        processor("<video>", images=[real_chips[0][:2]], frame_times=[[0.0, 1.5]])


def test_save_and_load(processor, tmp_path: Path) -> None:
    processor.save_pretrained(tmp_path)
    again = AgriVLMProcessor.from_pretrained(tmp_path)
    assert (again.patch_size, again.pool_stride, again.num_bands) == (4, 2, 1)
    assert again.layout == processor.layout
    text = "<image> box " + serialize_box((0.1, 0.2, 0.3, 0.4))
    img = np.zeros((1, 32, 32), np.float32)
    assert torch.equal(again(text, images=[img])["input_ids"], processor(text, images=[img])["input_ids"])
