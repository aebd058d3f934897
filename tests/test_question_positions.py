"""``data.question_positions: input``: positions a question gives become ``-INPUT`` placeholders with exact values.

LLaVA-ST's token layout: a position the model is *given* (the field's box of a growth question, the point of a
point prompt) is a placeholder whose embedding is the LAPE table interpolated at its continuous value, a position
it *answers* stays a bin token. Training renders records so, ``agrivlm infer`` asks so when the checkpoint says
so, and the value reaches the model's embedding (a sub-bin shift changes it; with bins it cannot).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import curriculum_recipe, stage_yaml

from agrivlm.infer.prepare import ChipPreparer
from agrivlm.infer.prompts import build_prompt, field_at_point_question, stage_question, timeline_question
from agrivlm.lape.tokens import Axis, LapeVocab
from agrivlm.model import load_pretrained
from agrivlm.model.builders import TINY_CONFIG, build_model
from agrivlm.pipeline.inputs import load_input_config
from agrivlm.recipes.schema import Record, read_records
from agrivlm.train.data import render_record
from agrivlm.train.logs import read_metrics
from agrivlm.train.trainer import run_stage

W, H, T = (LapeVocab.input_token(a) for a in (Axis.WIDTH, Axis.HEIGHT, Axis.TEMP))


def _growth_records(data: Path) -> list[Record]:
    return [r for shard in sorted((data / "shards").glob("*.jsonl")) for r in read_records(shard)
            if r.task == "stage_on_date" and r.conversation[0].boxes and r.conversation[0].times]


def test_training_renders_given_positions_as_input_placeholders_and_answers_as_bins(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    data = curriculum_recipe(tmp_path_factory)
    vocab = LapeVocab()
    rec = _growth_records(data)[0]
    prompt_bins, answer_bins, values_bins = render_record(rec, vocab, "<video>")
    prompt, answer, values = render_record(rec, vocab, "<video>", "input")
    assert answer == answer_bins and values == values_bins  # the same values, in the same text order
    assert prompt.count(W + H + W + H) == 1 and prompt.count(T) == 1
    assert "<WIDTH-0" not in prompt and "<TEMP-0" not in prompt
    # inference renders the same question the same way (on the records phrased as inference asks)
    compared = 0
    for other in _growth_records(data):
        u = other.conversation[0]
        asked = stage_question(vocab, u.boxes[0], u.times[0], str(other.meta.get("class")), "input")
        rendered, _, vals = render_record(other, vocab, "<video>", "input")
        if asked.text in rendered:
            assert build_prompt(asked.text, 4) == rendered
            assert list(asked.positions) == pytest.approx(vals[: len(asked.positions)])
            compared += 1
    assert compared > 0
    point = field_at_point_question(vocab, (0.25, 0.75), "input")
    assert point.text.count(W + H) == 1 and point.positions == (0.25, 0.75)
    assert timeline_question(vocab, (0.1, 0.2, 0.3, 0.4), "grassland", "input").text.count(W + H + W + H) == 1


def test_an_input_placeholder_embeds_its_exact_value() -> None:
    torch.manual_seed(0)
    model, processor = build_model(TINY_CONFIG)
    vocab = processor.vocab
    embeds = []
    for u in (0.5, 0.502):  # the same bin (150 bins: 0.0067 wide), two values
        for mode in ("bins", "input"):
            q = field_at_point_question(vocab, (u, 0.3), mode)
            batch = processor([build_prompt(q.text, 1)], images=[np.zeros((1, 1, 32, 32), np.float32)],
                              positions=[list(q.positions)])
            ids = batch["input_ids"][0]
            where = (ids == processor.tokenizer.convert_tokens_to_ids(W)) if mode == "input" else (
                ids >= model.config.position_token_offset)
            with torch.no_grad():
                emb = model.embed_tokens(batch["input_ids"], batch["position_values"])[0][where][0]
            embeds.append(emb)
    bins_a, input_a, bins_b, input_b = embeds
    assert torch.equal(bins_a, bins_b)  # a bin token cannot tell 0.5 from 0.502
    assert not torch.allclose(input_a, input_b)  # the placeholder carries the value


def test_a_checkpoint_trained_with_input_positions_is_asked_so_by_infer(
        tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> None:
    data = curriculum_recipe(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("question_positions")
    common = {"data.roots": [str(data)], "train.max_steps": 2, "train.batch_size": 4, "train.save_every": 0,
              "train.torch_threads": 1, "train.progress": False, "train.eval_every": -1}
    s1 = run_stage(stage_yaml("stage1", tmp / "s1.yaml", {**common, "output_dir": str(tmp / "s1")}), stage="stage1")
    # LLaVA-ST's layout both ways: given positions as -INPUT, answered ones (in training) as -OUTPUT placeholders
    c2 = stage_yaml("stage2", tmp / "s2.yaml", {**common, "output_dir": str(tmp / "s2"), "model.init_from": str(s1),
                                                 "data.question_positions": "input", "data.answer_positions": "output"})
    s2 = run_stage(c2, stage="stage2")
    rows = [r for r in read_metrics(tmp / "s2") if "position_loss" in r]
    assert rows and all(np.isfinite(r["position_loss"]) for r in rows)
    inputs, found = load_input_config(s2)
    assert found and inputs.question_positions == "input"
    _, processor = load_pretrained(s2)
    preparer = ChipPreparer(inputs.model_copy(update={"fields_prompt": "points", "point_grid": 2}), "fields",
                            processor.vocab)
    assert all(W + H in q.text for _, q in preparer.point_prompts) and len(preparer.point_prompts) == 4


def test_answers_as_output_placeholders_keep_the_labels_and_carry_the_exact_value(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """``data.answer_positions: output``: the answer's positions become ``-OUTPUT`` placeholders.

    Their labels are the same soft targets as the bin tokens' (the same loss on the same logits), and the next
    step's input embeds the exact value instead of its bin's row.
    """
    data = curriculum_recipe(tmp_path_factory)
    vocab = LapeVocab()
    recs = [r for shard in sorted((data / "shards").glob("*.jsonl")) for r in read_records(shard)
            if r.task == "field_at_point"]
    rec = next(r for r in recs if "<WIDTH-" in str(render_record(r, vocab)[1]))  # an answer with an outline
    prompt_bins, answer_bins, values = render_record(rec, vocab, "<video>")
    prompt, answer, values_out = render_record(rec, vocab, "<video>", "bins", "output")
    assert prompt == prompt_bins and values_out == values
    outs = [LapeVocab.output_token(a) for a in (Axis.WIDTH, Axis.HEIGHT, Axis.TEMP)]
    n_bins = sum(str(answer_bins).count(f"<{a.value}-") for a in (Axis.WIDTH, Axis.HEIGHT, Axis.TEMP))
    assert n_bins >= 6 and sum(str(answer).count(t) for t in outs) == n_bins
    assert not any(f"<{a.value}-0" in str(answer) for a in (Axis.WIDTH, Axis.HEIGHT, Axis.TEMP))
    torch.manual_seed(0)
    model, processor = build_model(TINY_CONFIG)
    frames = [np.zeros((4, 1, 32, 32), np.float32)]
    b_bins = processor([prompt_bins], images=frames, answers=[answer_bins], positions=[values])
    b_out = processor([prompt], images=frames, answers=[answer], positions=[values])
    assert b_bins["labels"].shape == b_out["labels"].shape
    assert not torch.equal(b_bins["labels"], b_out["labels"])  # placeholder ids instead of bin ids
    logits = torch.randn(1, b_bins["labels"].shape[1], model.config.logits_size)
    loss_bins = model.compute_loss(logits, b_bins["labels"], b_bins["position_values"])[0]
    loss_out = model.compute_loss(logits, b_out["labels"], b_out["position_values"])[0]
    torch.testing.assert_close(loss_out, loss_bins)
    with torch.no_grad():
        e_bins = model.embed_tokens(b_bins["input_ids"], b_bins["position_values"])
        e_out = model.embed_tokens(b_out["input_ids"], b_out["position_values"])
    placeholder = torch.isin(b_out["input_ids"], torch.tensor(model.config.lape_output_token_ids))
    assert placeholder.sum() > 0
    assert not torch.allclose(e_bins[placeholder], e_out[placeholder])  # exact values, not the bins' rows
    same = ~placeholder
    torch.testing.assert_close(e_bins[same], e_out[same])
