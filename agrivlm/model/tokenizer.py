"""The embedded tokenizer (a byte-level BPE trained locally, nothing downloaded) and agrivlm's added tokens.

The embedded default is trained with HF ``tokenizers`` on ``tokenizer_corpus.txt``, a frozen snapshot of
the project's own text (its README, the sample's PROVENANCE, the package docstrings when the model was
written, and the growth-stage and land-use vocabulary). Training is deterministic and takes well under a
second; a trained tokenizer travels with every saved model (``save_pretrained``), so a saved model never
depends on the corpus again. Byte-level BPE encodes any text, so a small vocabulary is never a failure,
only longer sequences.

:func:`add_agrivlm_tokens` adds, to any tokenizer (the embedded one or a real checkpoint's), the visual
placeholders ``<image>`` and ``<video>``, the six LAPE ``-INPUT``/``-OUTPUT`` control tokens, and then all
LAPE position tokens with consecutive ids at the end of the vocabulary — the layout the model relies on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from agrivlm.errors import ConfigError
from agrivlm.lape.tokens import AXES, LapeVocab

#: The frozen text the embedded tokenizer is trained on.
CORPUS_PATH = Path(__file__).with_name("tokenizer_corpus.txt")
#: End of text (also the end of an answer).
EOS_TOKEN = "<|endoftext|>"
#: Padding.
PAD_TOKEN = "<|pad|>"
#: Placeholder of one image (one frame): expands to its visual tokens.
IMAGE_TOKEN = "<image>"
#: Placeholder of a frame sequence: expands to the visual tokens of all its frames.
VIDEO_TOKEN = "<video>"
#: Default vocabulary size of the embedded BPE (before the added tokens).
DEFAULT_VOCAB_SIZE = 1024


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and wrap it as a HF fast tokenizer (eos ``<|endoftext|>``, pad ``<|pad|>``).

    Deterministic for the same texts and ``vocab_size``.
    """
    if vocab_size < 300:
        raise ConfigError(f"tokenizer.vocab_size: {vocab_size} is too small for a byte-level BPE (need ≥ 300)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)


def default_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """The embedded tokenizer: a BPE trained on :data:`CORPUS_PATH` (paragraphs as training texts)."""
    paragraphs = [p for p in CORPUS_PATH.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    return train_bpe_tokenizer(paragraphs, vocab_size)


@dataclass(frozen=True)
class TokenLayout:
    """Where agrivlm's tokens sit in a tokenizer's vocabulary."""

    #: Id of ``<image>``.
    image_token_id: int
    #: Id of ``<video>``.
    video_token_id: int
    #: Ids of ``<HEIGHT-INPUT>``, ``<WIDTH-INPUT>``, ``<TEMP-INPUT>``.
    input_token_ids: tuple[int, int, int]
    #: Ids of ``<HEIGHT-OUTPUT>``, ``<WIDTH-OUTPUT>``, ``<TEMP-OUTPUT>``.
    output_token_ids: tuple[int, int, int]
    #: Id of ``<HEIGHT-000>``; position tokens occupy ``[offset, offset + P)`` in ``LapeVocab`` layout.
    position_token_offset: int
    #: ``len(tokenizer)``: text vocabulary + ``P`` position tokens.
    total_size: int


def add_agrivlm_tokens(tokenizer: PreTrainedTokenizerBase, vocab: LapeVocab) -> TokenLayout:
    """Add the visual placeholders, LAPE control tokens and LAPE position tokens (special tokens) to ``tokenizer``.

    Idempotent: a tokenizer that already has them (a saved one) is only checked. Position tokens must end
    the vocabulary with consecutive ids; a tokenizer that holds them elsewhere (or with another count) is
    an error, since the model maps ids ``≥ offset`` to the LAPE tables.
    """
    controls = [IMAGE_TOKEN, VIDEO_TOKEN, *vocab.control_tokens]
    positions = vocab.position_tokens
    missing_controls = [t for t in controls if t not in tokenizer.get_vocab()]
    have_positions = [t for t in positions if t in tokenizer.get_vocab()]
    if have_positions and len(have_positions) != len(positions):
        raise ConfigError(
            f"tokenizer has {len(have_positions)} of the {len(positions)} LAPE position tokens of a vocabulary with "
            f"{vocab.num_spatial} spatial / {vocab.num_temporal} temporal tokens; use the tokenizer saved with "
            "the model, or a tokenizer without any LAPE tokens"
        )
    if missing_controls:
        if have_positions:
            raise ConfigError(
                "tokenizer has the LAPE position tokens but not the control tokens; it was not made by agrivlm"
            )
        tokenizer.add_tokens(missing_controls, special_tokens=True)
    if not have_positions:
        tokenizer.add_tokens(positions, special_tokens=True)
    return token_layout(tokenizer, vocab)


def token_layout(tokenizer: PreTrainedTokenizerBase, vocab: LapeVocab) -> TokenLayout:
    """Read the :class:`TokenLayout` of a tokenizer prepared by :func:`add_agrivlm_tokens` (checked)."""
    converted = tokenizer.convert_tokens_to_ids(vocab.position_tokens)
    ids: list[int | None] = list(converted) if isinstance(converted, list) else [converted]
    unk = tokenizer.unk_token_id
    offset = ids[0] if ids and ids[0] is not None else -1
    if any(i is None or i == unk for i in ids) or ids != list(range(offset, offset + len(ids))):
        raise ConfigError("tokenizer: the LAPE position tokens are missing or not consecutive; call add_agrivlm_tokens")
    if offset + len(ids) != len(tokenizer):
        raise ConfigError(
            f"tokenizer: tokens were added after the LAPE position tokens (vocabulary {len(tokenizer)}, position "
            f"tokens end at {offset + len(ids)}); position tokens must be the last ones"
        )

    def one(token: str) -> int:
        i = tokenizer.convert_tokens_to_ids(token)
        if i is None or i == unk or not isinstance(i, int):
            raise ConfigError(f"tokenizer: {token} missing; call add_agrivlm_tokens")
        return i

    return TokenLayout(
        image_token_id=one(IMAGE_TOKEN),
        video_token_id=one(VIDEO_TOKEN),
        input_token_ids=(
            one(vocab.input_token(AXES[0])), one(vocab.input_token(AXES[1])), one(vocab.input_token(AXES[2]))
        ),
        output_token_ids=(
            one(vocab.output_token(AXES[0])), one(vocab.output_token(AXES[1])), one(vocab.output_token(AXES[2]))
        ),
        position_token_offset=offset,
        total_size=len(tokenizer),
    )
