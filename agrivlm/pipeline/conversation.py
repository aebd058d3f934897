"""The model's conversation format: one place, used by training (``agrivlm.train.data``) and inference.

A conversation is flattened into a prompt whose first user turn carries the visual placeholder, and the
model answers after the last ``ASSISTANT:``::

    USER: <video>
    Outline every field.
    ASSISTANT: <answer>

A model only answers well on prompts like those it was trained on, so training and ``agrivlm infer`` /
the explorer build their prompts with :func:`format_prompt` and nothing else. :data:`CHAT_TEMPLATE`, the
processor's and tokenizer's chat template, writes the same strings from transformers' messages
(``processor.apply_chat_template(messages, add_generation_prompt=True)``), built from the constants below.

An answer ends with the tokenizer's end-of-sequence token, :func:`answer_end_id`: the processor appends it
to every supervised answer (so the model learns to stop when the answer is complete) and generation stops
on it (``generation_config.eos_token_id``); both take it from here.

A **multi-turn** conversation (several questions about the same chip) is supervised on every assistant turn,
LLaVA's way: the prompt is the first user turn, and the answer is a list of segments (:data:`Answer`),
``[answer_1, continuation(question_2), answer_2, …]``: answers supervised and each ended by eos, the
continuations (:func:`continuation`) only read. So the model learns to end every answer with eos, as it must
when ``agrivlm infer`` asks one question, and one chip's pixels pay for several supervised answers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from agrivlm.lape.tokens import POLYGON_SEP as _POLYGON_SEP

#: Prefix of a user turn.
USER = "USER: "
#: Prefix of an assistant turn (and the end of every prompt).
ASSISTANT = "ASSISTANT: "
#: Separator between the vertices of a polygon answer (the codec's, :data:`agrivlm.lape.tokens.POLYGON_SEP`):
#: written back to back, four position tokens would read as a box; joined by it they read as a polygon.
POLYGON_SEP = _POLYGON_SEP


def answer_end_id(tokenizer: Any) -> int:
    """Id of the token that ends an answer: the tokenizer's eos, supervised after each answer and stopped on.

    Raises:
        ValueError: the tokenizer has no eos token (a model trained with it could never say it is done).
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    if not isinstance(eos, int):
        raise ValueError(
            f"the tokenizer has no eos token (eos_token_id={eos!r}); answers must end with one to be learned and "
            "stopped on: set tokenizer.eos_token (e.g. '<|endoftext|>' or '</s>')"
        )
    return eos


def visual_placeholder(num_frames: int) -> str:
    """``<image>`` for one frame, ``<video>`` for several."""
    if num_frames < 1:
        raise ValueError(f"a prompt needs at least one frame, got {num_frames}")
    return "<image>" if num_frames == 1 else "<video>"


def _chat_template() -> str:
    """The Jinja text of :data:`CHAT_TEMPLATE`.

    Its literals come from :data:`USER`, :data:`ASSISTANT` and :func:`visual_placeholder`, so it cannot drift from
    :func:`format_prompt`.
    """

    def lit(text: str) -> str:
        return json.dumps(text)  # a JSON string is a Jinja string literal with the same escapes

    role_error = lit("agrivlm conversations have user and assistant turns only (the model was trained without "
                     "others); got a turn of role ")
    return (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}{{ " + lit(USER) + " }}"
        "{%- elif message['role'] == 'assistant' -%}{{ " + lit(ASSISTANT) + " }}"
        "{%- else -%}{{ raise_exception(" + role_error + " ~ message['role']) }}"
        "{%- endif -%}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for item in message['content'] -%}"
        "{%- if item['type'] == 'image' -%}{{ " + lit(visual_placeholder(1) + "\n") + " }}"
        "{%- elif item['type'] == 'video' -%}{{ " + lit(visual_placeholder(2) + "\n") + " }}"
        "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
        "{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{%- if message['role'] == 'assistant' -%}{{ eos_token }}"
        "{%- else -%}{{ " + lit("\n") + " }}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ " + lit(ASSISTANT) + " }}{%- endif -%}"
    )


#: What a sample is supervised on: one answer, or a multi-turn conversation's segments after its first prompt
#: (``[answer_1, continuation(question_2), answer_2, …]``, odd length: even entries supervised, odd ones read).
Answer = str | Sequence[str]


def continuation(question: str) -> str:
    r"""The text between an answer's eos and the next answer: ``"USER: question\nASSISTANT: "``."""
    return USER + question + "\n" + ASSISTANT


def answer_segments(answer: Answer) -> list[tuple[str, bool]]:
    """``(text, supervised)`` pairs of an :data:`Answer` (a string is one supervised segment).

    Raises:
        ValueError: an even number of segments (a conversation must end with an answer) or none.
    """
    if isinstance(answer, str):
        return [(answer, True)]
    parts = list(answer)
    if len(parts) % 2 != 1:
        raise ValueError(f"a multi-turn answer needs an odd number of segments (answer, question, …, answer); "
                         f"got {len(parts)}")
    return [(text, k % 2 == 0) for k, text in enumerate(parts)]


def answer_text(answer: Answer, eos: str) -> str:
    """The text an :data:`Answer` stands for: its segments in order, each answer followed by ``eos``."""
    return "".join(text + (eos if supervised else "") for text, supervised in answer_segments(answer))


def format_prompt(turns: Sequence[tuple[str, str]], visual_token: str = "<video>", eos: str | None = None) -> str:
    r"""The flattened prompt of a conversation whose answer (the last assistant turn) is left out.

    ``[("user", "q1")]`` → ``"USER: <video>\nq1\nASSISTANT: "``. Earlier assistant turns end with the tokenizer's
    eos (as the chat template and training write them), so they need ``eos``, its text:
    ``[("user", "q1"), ("assistant", "a1"), ("user", "q2")]`` → ``"USER: <video>\nq1\nASSISTANT: a1<eos>USER:
    q2\nASSISTANT: "``.

    Raises:
        ValueError: an assistant turn without ``eos``.
    """
    parts: list[str] = []
    for k, (role, text) in enumerate(turns):
        if role == "user":
            parts.append(USER + (f"{visual_token}\n" if k == 0 else "") + text + "\n")
        elif eos is None:
            raise ValueError("a prompt with earlier assistant turns needs eos= (the tokenizer's eos token, which ends "
                             "each answer)")
        else:
            parts.append(ASSISTANT + text + eos)
    return "".join(parts) + ASSISTANT


#: The chat template of the processor and its tokenizer: transformers' messages → the strings of
#: :func:`format_prompt`. A user turn is ``USER: `` then its content items in order (an ``image`` item writes
#: ``<image>`` and a newline, a ``video`` item ``<video>`` and a newline, a ``text`` item its text; a string
#: content is the text) and a newline; an assistant turn is ``ASSISTANT: `` and its text, then the
#: eos token (every answer as training supervises it, :func:`answer_end_id`; earlier templates wrote a newline after
#: all but the last, when training supervised one answer per record);
#: ``add_generation_prompt`` appends ``ASSISTANT: ``. A system (or any other) turn is an error: training has none.
#: ``[{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "q"}]}]`` with
#: ``add_generation_prompt=True`` gives ``format_prompt([("user", "q")])`` = ``"USER: <video>\nq\nASSISTANT: "``.
CHAT_TEMPLATE = _chat_template()
