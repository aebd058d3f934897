from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from agrivlm.errors import ConfigError
from agrivlm.lape.tokens import LapeVocab, serialize_box
from agrivlm.model.tokenizer import CORPUS_PATH, add_agrivlm_tokens, default_tokenizer, token_layout


def test_embedded_tokenizer_is_trained_locally_and_deterministically() -> None:
    assert CORPUS_PATH.is_file()
    a, b = default_tokenizer(), default_tokenizer()
    assert len(a) == 1024 and a.get_vocab() == b.get_vocab()
    text = "Box of the largest grassland parcel: green-up on 2016-05-06, NDVI 0.73 — ü"
    ids = a(text, add_special_tokens=False)["input_ids"]
    assert a.decode(ids) == text  # byte-level BPE: any text round-trips
    assert len(ids) < len(text) / 2  # and it learned the project's words
    assert a.eos_token == "<|endoftext|>" and a.pad_token == "<|pad|>"


def test_added_tokens_layout_and_idempotence(tmp_path: Path) -> None:
    tok = default_tokenizer()
    vocab = LapeVocab()
    layout = add_agrivlm_tokens(tok, vocab)
    assert layout.position_token_offset == 1024 + 8 and layout.total_size == len(tok) == 1032 + 350
    assert tok.convert_tokens_to_ids("<HEIGHT-000>") == layout.position_token_offset
    assert tok.convert_tokens_to_ids("<TEMP-049>") == len(tok) - 1
    # a serialized box is exactly four tokens
    ids = tok(serialize_box((0.1, 0.2, 0.3, 0.4)), add_special_tokens=False)["input_ids"]
    assert len(ids) == 4 and all(i >= layout.position_token_offset for i in ids)
    assert add_agrivlm_tokens(tok, vocab) == layout  # idempotent
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert token_layout(again, vocab) == layout


def test_tokenizers_that_do_not_fit_are_refused() -> None:
    tok = default_tokenizer()
    add_agrivlm_tokens(tok, LapeVocab())
    with pytest.raises(ConfigError, match="of the 300 LAPE position tokens"):
        add_agrivlm_tokens(tok, LapeVocab(100, 100))  # another vocabulary size
    tok.add_tokens(["<extra>"], special_tokens=True)
    with pytest.raises(ConfigError, match="position tokens must be the last ones"):
        token_layout(tok, LapeVocab())
