"""A model's answer without a model: the ids of a text and LAPE logits peaked at its position tokens, decoded
by the real :func:`~agrivlm.infer.generate.decode_answer` (shared by the decoding-chain tests)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from agrivlm.infer.generate import DecodedAnswer, Predictor, decode_answer
from agrivlm.lape.tokens import LapeVocab

VOCAB = LapeVocab()


def decoded_answer(text: str, tokenizer: Any, offset: int) -> DecodedAnswer:
    """The answer a model writes when it writes ``text``: its ids, and LAPE logits peaked at each position token."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    logits = np.full((len(ids), VOCAB.num_position_tokens), -30.0)
    for s, t in enumerate(ids):
        if 0 <= t - offset < VOCAB.num_position_tokens:
            logits[s, t - offset] = 10.0
    logprobs = [math.log(0.9)] * len(ids)
    pos, times, bs, ps, ss, gs = decode_answer(ids, logprobs, logits, offset, VOCAB, 2,
                                               Predictor._separator_ids(tokenizer))
    return DecodedAnswer(text=tokenizer.decode(ids), ids=ids, finished=True, score=0.9, positions=pos, times=times,
                         box_steps=bs, point_steps=ps, segment_steps=ss, logprobs=logprobs, polygon_steps=gs)
