"""The model side of inference: questions → batched greedy generation with a KV cache → decoded answers.

:class:`Predictor` loads a checkpoint (:func:`agrivlm.model.load_pretrained`), turns :class:`Question` s
into processor batches (left padding, one batch per frame shape, at most ``batch_size`` questions each) and
generates greedily with the KV cache. While generating, a logits processor records per step only what
decoding needs — the log-probability of the chosen token and the LAPE heads' logits — never the whole
vocabulary's logits of every step.

Decoding (:func:`decode_answer`) uses the LAPE codec (:func:`agrivlm.lape.tokens.parse_token_ids`: boxes,
points, polygons — points chained by the tokenizer's ids of :data:`~agrivlm.lape.tokens.POLYGON_SEP` —,
segments, with sub-bin refinement from the heads' logits) and adds every ``TEMP`` value (a lone time such
as ``"The peak was at <TEMP-030>"`` is no box, point or segment).

Scores: the probability the model gave its own answer. A feature's score is the geometric mean of the
probabilities of the tokens that make it up (a box: its four position tokens), an answer's score the
geometric mean over all its tokens (the end-of-sequence token excluded); probabilities are the softmax of
the final generation scores (after the generation config's token suppression), so they are in ``(0, 1]``.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from agrivlm.geo.coords import TimeAxis
from agrivlm.infer.errors import InferError
from agrivlm.lape.tokens import (
    POLYGON_SEP,
    Axis,
    LapeVocab,
    ParsedPositions,
    PositionItem,
    group_positions,
    parse_token_ids,
    position_items,
    refine_position,
)
from agrivlm.pipeline.conversation import answer_end_id
from agrivlm.pipeline.inputs import frames_as_bands as stack_dates

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Visual:
    """The frames a question is about.

    Attributes:
        pixels: ``(T, C, h, w)`` float32 normalized to [0, 1], NaN = no data (the processor makes it 0).
        frame_times: ``(T,)`` normalized time of each frame on ``time_axis``
            (:func:`agrivlm.pipeline.frames.frame_time_positions`, the rule training follows).
        dates: ``(T,)`` acquisition times of the frames (``datetime64``).
        time_axis: the season windows of the frames' candidate dates (as a record's ``time_range``): decoded
            ``t`` → dates with ``time_axis.from_norm``.

    """

    pixels: npt.NDArray[np.float32]
    frame_times: FloatArray
    dates: npt.NDArray[np.datetime64]
    time_axis: TimeAxis


@dataclass(frozen=True)
class Question:
    """One prompt about one visual item.

    Attributes:
        visual: the frames.
        prompt: the prompt text with its visual placeholder (:func:`agrivlm.infer.prompts.build_prompt`).
        positions: continuous values of the prompt's position tokens in text order (may be empty).
        meta: what the answer is about (JSON-able), e.g. ``{"field_id": "7", "date": "2016-06-05"}``.

    """

    visual: Visual
    prompt: str
    positions: tuple[float, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class DecodedAnswer:
    """A generated answer, decoded.

    Attributes:
        text: the answer's text (position tokens kept, end-of-sequence token removed).
        ids: ``(S,)`` generated token ids, without the end-of-sequence token and what follows.
        finished: whether the model ended the answer (False: cut at ``max_new_tokens``).
        score: geometric mean of the tokens' probabilities (NaN for an empty answer).
        positions: boxes, points, polygons and segments, normalized, sub-bin refined.
        times: every ``TEMP`` value in order, normalized on the visual's :attr:`Visual.time_axis`.
        box_steps: per box, the indices into ``ids`` of its four tokens.
        point_steps: per point, its two token indices; ``segment_steps`` likewise.
        polygon_steps: per polygon, the indices of its ``2 * vertices`` position tokens.

    """

    text: str
    ids: list[int]
    finished: bool
    score: float
    positions: ParsedPositions
    times: list[float]
    box_steps: list[list[int]]
    point_steps: list[list[int]]
    segment_steps: list[list[int]]
    logprobs: list[float]
    polygon_steps: list[list[int]] = field(default_factory=list)

    def item_score(self, steps: Sequence[int]) -> float:
        """Geometric mean of the probabilities of the tokens at ``steps``."""
        if not steps:
            return math.nan
        return float(math.exp(float(np.mean([self.logprobs[s] for s in steps]))))


def decode_answer(
    ids: Sequence[int],
    logprobs: Sequence[float],
    lape_logits: npt.ArrayLike,
    offset: int,
    vocab: LapeVocab,
    window: int = 2,
    separator_ids: Sequence[int] = (),
) -> tuple[ParsedPositions, list[float], list[list[int]], list[list[int]], list[list[int]], list[list[int]]]:
    """Position tokens of one answer → positions, times and the token indices of each item.

    Args:
        ids: ``(S,)`` generated ids (end-of-sequence removed).
        logprobs: ``(S,)`` log-probability of each id.
        lape_logits: ``(S, P)`` the LAPE heads' logits at each step (``P = vocab.num_position_tokens``).
        offset: id of the first position token.
        vocab: the LAPE vocabulary.
        window: bins on each side of the argmax for the sub-bin expectation.
        separator_ids: the tokenizer's ids of :data:`~agrivlm.lape.tokens.POLYGON_SEP` (chain polygon
            vertices); empty: no polygons.

    Returns:
        ``(positions, times, box_steps, point_steps, segment_steps, polygon_steps)``.

    """
    arr = np.asarray(ids, dtype=np.int64)
    lg = np.asarray(lape_logits, dtype=np.float64).reshape(arr.size, vocab.num_position_tokens)
    if len(logprobs) != arr.size:
        raise ValueError(f"{len(logprobs)} log-probabilities for {arr.size} ids")
    # the codec on ids relative to <HEIGHT-000> (the LAPE logits' columns): text ids become negative
    rel = arr - offset
    seps = [int(i) - offset for i in separator_ids]
    positions = parse_token_ids(rel, 0, vocab, lg, window, seps)
    # the same grouping on token indices gives each item's tokens (the codec's grouping, not a copy of it)
    where = np.flatnonzero((rel >= 0) & (rel < vocab.num_position_tokens))
    index_items = [PositionItem(it.axis, float(step), it.adjacent, it.chained) for it, step in
                   zip(position_items(rel, 0, vocab, None, window, seps), where.tolist(), strict=True)]
    times: list[float] = []
    steps = group_positions(index_items)
    temporal = [it for it in index_items if it.axis is Axis.TEMP]
    start, n = vocab.axis_offset(Axis.TEMP), vocab.size(Axis.TEMP)
    for it in temporal:  # every TEMP value, refined as the codec refines it
        s = int(it.value)
        times.append(refine_position(lg[s, start:start + n], int(arr[s]) - offset - start, window))
    box_steps = [[int(x) for x in b] for b in steps.boxes]
    point_steps = [[int(x) for x in p] for p in steps.points]
    segment_steps = [[int(x) for x in s] for s in steps.segments]
    polygon_steps = [[int(x) for p in poly for x in p] for poly in steps.polygons]
    if (len(box_steps), len(point_steps), len(segment_steps), len(polygon_steps)) != (
        len(positions.boxes), len(positions.points), len(positions.segments), len(positions.polygons)
    ):
        raise AssertionError("position grouping of values and of indices disagree")  # pragma: no cover
    return positions, times, box_steps, point_steps, segment_steps, polygon_steps


class _StepRecorder(LogitsProcessor):
    """Records, per generation step, the chosen token's log-probability and the LAPE heads' logits.

    Placed last among the logits processors, it sees the final scores, whose argmax greedy search takes.
    """

    def __init__(self, lape_start: int, lape_end: int) -> None:
        self.lape_start, self.lape_end = lape_start, lape_end
        self.top: list[torch.Tensor] = []
        self.lape: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        s = scores.float()
        lse = torch.logsumexp(s, dim=-1)
        self.top.append(s.max(dim=-1).values - lse)
        self.lape.append(s[:, self.lape_start:self.lape_end])
        return scores


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA if available, else MPS, else CPU; anything else as torch reads it.

    Raises:
        InferError: a device this machine does not have.

    """
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise InferError(f"--device {device!r}: not a torch device ({exc}); use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InferError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return dev


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Predictor:
    """A loaded checkpoint that answers :class:`Question` s in batches (greedy, KV cache).

    ``encode`` (CPU work: stacking pixels, tokenizing) and ``generate`` may run in different threads; the
    tokenizer is used under a lock (a fast tokenizer must not be used by two threads at once).
    """

    def __init__(self, model: Any, processor: Any, device: torch.device, dtype: torch.dtype = torch.float32,
                 max_new_tokens: int = 128, layout: Any = None, frames_as_bands: bool = False) -> None:
        self.model = model.to(device=device, dtype=dtype).eval()
        self.processor = processor
        #: AnyRes / multi-scale items of every question's frames, as the checkpoint was trained (its saved
        #: ``anyres`` / ``scales``, :func:`~agrivlm.pipeline.inputs.item_layout`); None: one item per question.
        self.layout = layout
        #: Each question's frames as the bands of one image, as the checkpoint was trained (its saved
        #: ``frames_as_bands``, :func:`~agrivlm.pipeline.inputs.frames_as_bands`).
        self.frames_as_bands = frames_as_bands
        self.device = device
        self.dtype = dtype
        self.max_new_tokens = max_new_tokens
        self.offset = int(model.config.position_token_offset)
        self.vocab: LapeVocab = model.vocab
        self.window = int(model.config.decode_window)
        self.eos = model.generation_config.eos_token_id
        stops = {self.eos} if isinstance(self.eos, int) else set(self.eos or [])
        end = answer_end_id(processor.tokenizer)
        if end not in stops:
            raise InferError(
                f"the checkpoint's generation_config.eos_token_id is {self.eos!r} but its answers end with token {end} "
                f"({processor.tokenizer.convert_ids_to_tokens(end)!r}, the tokenizer's eos the model was trained to "
                "say): generation would run to the token budget; set eos_token_id in its generation_config.json"
            )
        #: The tokenizer's ids of the polygon vertex separator (as training tokenizes it between two points).
        self.separator_ids = self._separator_ids(processor)
        #: Generate with the KV cache (off only to measure what it saves: every step then re-reads the prompt).
        self.use_cache = True
        #: Generate a batch in parts of at most this many questions; None: whole (a chip's questions are never
        #: split, :class:`~agrivlm.infer.runner.Producer`). A number caps memory, or measures what whole batches save.
        self.split_at: int | None = None
        self._tok_lock = threading.Lock()
        self._gen_lock = threading.Lock()

    @classmethod
    def load(cls, folder: str | os.PathLike[str], device: str = "auto", dtype: str = "float32",
             max_new_tokens: int = 128) -> Predictor:
        """Load a checkpoint saved with ``save_pretrained`` (model and processor in one folder).

        Raises:
            InferError / ConfigError: no checkpoint there, or an unknown dtype or device.

        """
        from agrivlm.model import load_pretrained

        if dtype not in DTYPES:
            raise InferError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        from agrivlm.pipeline.inputs import item_layout, load_input_config

        model, processor = load_pretrained(folder)
        if not model.config.answers_positions:
            raise InferError(f"{folder}: the model has LAPE off (stage-1 checkpoint); it cannot answer with positions")
        inputs = load_input_config(folder)[0]
        return cls(model, processor, resolve_device(device), DTYPES[dtype], max_new_tokens,
                   item_layout(inputs.anyres, inputs.scales, inputs.max_patches), inputs.frames_as_bands)

    @staticmethod
    def _separator_ids(processor: Any) -> tuple[int, ...]:
        tokenizer = getattr(processor, "tokenizer", processor)
        ids = tokenizer(POLYGON_SEP, add_special_tokens=False)["input_ids"]
        return tuple(int(i) for i in ids)

    @property
    def num_bands(self) -> int:
        """Channels each frame must have."""
        return int(self.processor.num_bands)

    # -- encode ------------------------------------------------------------------------------------
    def encode(self, questions: Sequence[Question], batch_size: int) -> list[tuple[list[int], Any]]:
        """Processor batches of the questions: grouped by frame shape, at most ``batch_size`` each.

        Returns:
            ``[(indices into questions, BatchFeature), ...]`` in a fixed order (first appearance of a shape).

        """
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, q in enumerate(questions):
            groups.setdefault(tuple(q.visual.pixels.shape), []).append(i)
        out = []
        for idx in groups.values():
            for k in range(0, len(idx), batch_size):
                part = idx[k:k + batch_size]
                qs = [questions[i] for i in part]
                with self._tok_lock:
                    prompts = [q.prompt for q in qs]
                    pixels = [q.visual.pixels for q in qs]
                    times = [q.visual.frame_times for q in qs]
                    if self.frames_as_bands:
                        stacked = [stack_dates(p, t) for p, t in zip(pixels, times, strict=True)]
                        pixels, times = [s[0] for s in stacked], [s[1] for s in stacked]
                    given = [list(q.positions) if q.positions else None for q in qs]
                    # tiles or scales when the checkpoint was trained so, else one item per question
                    batch = self.processor.from_frames(prompts, pixels, self.layout, frame_times=times,
                                                       positions=given, padding_side="left")
                out.append((part, batch))
        return out

    # -- generate ----------------------------------------------------------------------------------
    def generate(self, encoded: Sequence[tuple[list[int], Any]], max_new_tokens: int | None = None
                 ) -> list[DecodedAnswer]:
        """Generate and decode the answers of :meth:`encode`'s batches, in question order.

        One call at a time per predictor (threads sharing it take turns); ``max_new_tokens`` overrides
        the predictor's for this call.
        """
        with self._gen_lock:
            return self._generate(encoded, self.max_new_tokens if max_new_tokens is None else max_new_tokens)

    @torch.inference_mode()
    def _generate(self, encoded: Sequence[tuple[list[int], Any]], max_new_tokens: int) -> list[DecodedAnswer]:
        n = sum(len(idx) for idx, _ in encoded)
        answers: list[DecodedAnswer | None] = [None] * n
        start = self.offset
        end = start + self.vocab.num_position_tokens
        for idx, batch in encoded:
            inputs = {k: v.to(self.device) for k, v in batch.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            recorder = _StepRecorder(start, end)
            out = self.model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                use_cache=self.use_cache,
                logits_processor=LogitsProcessorList([recorder]),
                return_dict_in_generate=True,
            )
            new = out.sequences[:, inputs["input_ids"].shape[1]:].cpu().numpy()
            if recorder.top:
                top = torch.stack(recorder.top, dim=1).cpu().numpy()  # (B, S)
                lape = torch.stack(recorder.lape, dim=1).cpu().numpy()  # (B, S, P)
            else:
                top = np.zeros((new.shape[0], 0))
                lape = np.zeros((new.shape[0], 0, end - start))
            for row, q_index in enumerate(idx):
                answers[q_index] = self._decode_row(new[row], top[row], lape[row])
        return [a for a in answers if a is not None]

    def decode_ids(self, ids: Sequence[int]) -> str:
        """Token ids → text, position tokens kept."""
        with self._tok_lock:
            return str(self.processor.decode(list(ids), skip_special_tokens=False))

    def _decode_row(self, new: npt.NDArray[np.int64], top: FloatArray, lape: FloatArray) -> DecodedAnswer:
        ids = new.tolist()
        eos = {self.eos} if isinstance(self.eos, int) else set(self.eos or [])
        stop = next((k for k, t in enumerate(ids) if t in eos), None)
        finished = stop is not None
        cut = stop if stop is not None else len(ids)
        ids, logprobs = ids[:cut], [float(x) for x in top[:cut]]
        positions, times, box_steps, point_steps, segment_steps, polygon_steps = decode_answer(
            ids, logprobs, lape[:cut], self.offset, self.vocab, self.window, self.separator_ids
        )
        text = self.decode_ids(ids)
        score = float(math.exp(float(np.mean(logprobs)))) if logprobs else math.nan
        return DecodedAnswer(text=text, ids=ids, finished=finished, score=score, positions=positions, times=times,
                             box_steps=box_steps, point_steps=point_steps, segment_steps=segment_steps,
                             logprobs=logprobs, polygon_steps=polygon_steps)
