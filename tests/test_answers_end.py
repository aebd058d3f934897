"""A trained model says when its answer is done: it ends with the answer's end token, before the token budget.

Real records of the curriculum recipe (embedded sample) go through the training data path (``RecordDataset``
+ ``Collator``, as ``agrivlm train``), the tiny model trains on them for a few real steps (its LLM fully, as the
quickstart's stage 3), and ``agrivlm infer``'s ``Predictor`` generates: each answer must stop with the end
token, not run to ``max_new_tokens`` repeating boxes. One answer is a bare box, so the end comes right after a
position token, where the LAPE heads compete with it.
"""

from __future__ import annotations

import re

import pytest
import torch
from train_helpers import curriculum_recipe

from agrivlm.infer.errors import InferError
from agrivlm.infer.generate import Predictor, Question, Visual
from agrivlm.model import build_model
from agrivlm.pipeline.conversation import answer_end_id
from agrivlm.train.config import FramesConfig, NormalizeConfig, Trainables
from agrivlm.train.curriculum import set_trainable
from agrivlm.train.data import Collator, RecordDataset, SourceRecord, read_split

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 80
BUDGET = 48
POSITION = re.compile(r"<(?:WIDTH|HEIGHT|TEMP)-\d{3}>")


def _records(tmp_path_factory: pytest.TempPathFactory) -> list[SourceRecord]:
    records = read_split([curriculum_recipe(tmp_path_factory)], "train")
    box = next(sr for sr in records if sr.record.task == "largest_of_class")  # the answer is a bare box
    text = next(sr for sr in records if sr.record.task == "edge_fields")  # "1 field: grassland <box>."
    return [box, text]


def test_a_trained_model_ends_its_answers_with_the_end_token(tmp_path_factory: pytest.TempPathFactory) -> None:
    records = _records(tmp_path_factory)
    torch.manual_seed(0)
    model, proc = build_model()
    end = answer_end_id(proc.tokenizer)
    assert model.generation_config.eos_token_id == end  # generation stops on the token answers end with
    ds = RecordDataset(records, FramesConfig(sampler="uniform", num_frames=2), NormalizeConfig(mode="chip"),
                       proc.vocab, 0, train=False)
    samples = [ds[(0, i)] for i in range(len(records))]
    batch = Collator(proc, lape=True)(samples)
    for row in batch["labels"]:  # each supervised answer ends with that token
        assert row[row != -100][-1].item() == end
    groups, _ = set_trainable(model, Trainables.model_validate({"llm": {"mode": "full"}}))
    opt = torch.optim.AdamW(groups["main"] + groups["lape"], lr=3e-3, weight_decay=0.0)
    inputs = {k: v for k, v in batch.items() if k not in ("sample_ids", "is_fast")}
    model.train()
    for _ in range(STEPS):
        loss = model(**inputs).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()

    questions = []
    for sr, s in zip(records, samples, strict=True):
        axis = sr.record.chip.time_axis
        visual = Visual(pixels=s.pixels, frame_times=s.frame_times, dates=axis.from_norm(s.frame_times),
                        time_axis=axis)
        in_prompt = len(s.positions) - len(POSITION.findall(s.answer))
        questions.append(Question(visual, s.prompt, tuple(s.positions[:in_prompt])))
    predictor = Predictor(model, proc, torch.device("cpu"), max_new_tokens=BUDGET)
    answers = predictor.generate(predictor.encode(questions, len(questions)))
    for a, s in zip(answers, samples, strict=True):
        assert a.finished and len(a.ids) < BUDGET, f"no end after {len(a.ids)} tokens: {a.text!r} (want {s.answer!r})"
        assert len(a.positions.boxes) == 1, a.text  # one box, not the box repeated to the budget


def test_a_checkpoint_that_would_not_stop_on_the_answer_end_is_refused() -> None:
    model, proc = build_model()
    model.generation_config.eos_token_id = proc.tokenizer.pad_token_id
    with pytest.raises(InferError, match="generation would run to the token budget"):
        Predictor(model, proc, torch.device("cpu"))
