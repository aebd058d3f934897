"""Instruction records → training samples → batches.

One record (:class:`~agrivlm.recipes.schema.Record`) becomes one sample:

1. **Frames.** The stack of the record (``record.stack``; the same-day rule of the recipe that built it,
   from its ``manifest.json``) is opened once per process and kept open; for each sample the chip's
   window is read once, for the record's ``frame_indices`` only (``Stack.read_window``), and the file
   names are checked against ``record.stack.frame_files`` (a stack that changed since the recipe was built
   is an error, not silently different data). ``num_frames`` of the record's frames are chosen
   (``random``: a sorted random subset seeded by ``sample_seed(seed, epoch, index)``; ``uniform``; or
   ``fast_slow`` from :mod:`agrivlm.pipeline.frames`).
2. **Normalisation** (:mod:`agrivlm.pipeline.bands`): ``dataset`` — one per-band 2–98 % percentile range
   over the training chips (:func:`dataset_band_stats`); ``chip`` — the sample's own frames; ``fixed``.
   No data stays NaN; the processor turns it into 0. With ``data.growth_focus: box`` a growth-stage question's
   pixels outside its field's box become no data; with ``data.point_marker: square`` a question's point is drawn
   into its frames (:mod:`agrivlm.pipeline.focus`).
3. **Time.** Each frame's ``t`` is its date on the record's ``time_range``, the season windows its frames
   fall in (:func:`~agrivlm.pipeline.frames.frame_time_positions`, the rule ``agrivlm infer`` follows too);
   it is the axis the record's ``times``/``segments`` use, so ``TEMP`` tokens in the text and the frames'
   temporal embeddings agree whichever frames were sampled, and a bin names the same days of the season on
   every chip. Records without ``time_range`` (written before it) use their frames' range, on which their
   answers were written.
4. **Text.** The conversation is rendered with the LAPE codec (:func:`~agrivlm.lape.tokens.serialize_box`
   etc.; polygon vertices separated by :data:`POLYGON_SEP` so they decode as a polygon), and the continuous
   value of every position token is kept, in text order, for the model's sub-bin soft targets
   (``position_values``); with ``data.question_positions: input`` the positions a question gives are
   ``-INPUT`` placeholders carrying those values instead. **Multi-turn** conversations (``field_at_point`` with
   ``points_per_record`` > 1) are supervised on every assistant turn: the prompt is the first user turn
   (:func:`agrivlm.pipeline.conversation.format_prompt`, a plain ``USER:``/``ASSISTANT:`` template with the visual
   placeholder), the answer its segments (:data:`~agrivlm.pipeline.conversation.Answer`), each answer ended by
   eos, the next questions read unsupervised.

Batches: :class:`Collator` calls :class:`~agrivlm.model.processing.AgriVLMProcessor` (unchanged) on
the samples of a micro-batch and adds ``sample_ids`` and ``is_fast``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import numpy as np
import numpy.typing as npt
import torch
from rasterio.windows import Window
from torch.utils.data import Dataset, Sampler

from agrivlm.errors import ConfigError, PipelineError, RecordError
from agrivlm.geo.stack import Stack
from agrivlm.lape.tokens import AnswerPositions, LapeVocab, QuestionPositions, position_formatters
from agrivlm.pipeline.bands import BandStats, normalize, robust_stats, to_reflectance
from agrivlm.pipeline.conversation import POLYGON_SEP, Answer, continuation, format_prompt, visual_placeholder
from agrivlm.pipeline.focus import GrowthFocus, PointMarker, focus_on_box, mark_point
from agrivlm.pipeline.frames import FrameSamplingConfig, frame_time_positions, select_indices, uniform_indices
from agrivlm.pipeline.inputs import ChipInputConfig, ChipRule
from agrivlm.pipeline.inputs import frames_as_bands as stack_dates
from agrivlm.recipes.mixture import mix
from agrivlm.recipes.schema import Record, iter_records
from agrivlm.tasks.turns import Turn, render_text
from agrivlm.train.config import DataConfig, FramesConfig, NormalizeConfig, resolve
from agrivlm.train.sampler import ResumableSampler, sample_seed

log = logging.getLogger(__name__)



# -- records -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceRecord:
    """A record and the recipe output it came from."""

    record: Record
    #: Same-day rule of the recipe that built it (needed to reopen its stack with the same time axis).
    same_day: str


def _manifest(root: Path) -> dict[str, Any]:
    path = root / "manifest.json"
    if not path.is_file():
        raise ConfigError(
            f"{root}: no manifest.json; data.roots must be outputs of `agrivlm recipe build --recipe R --out {root}`"
        )
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def recipe_chips(roots: Sequence[str | Path]) -> ChipRule | None:
    """How the recipes behind ``roots`` cut chips and chose their dates (each manifest's ``config.chips``).

    The first root's rule; roots whose rule differs (size, edge or clear fraction) are trained on as they are,
    with a warning naming them, since a checkpoint's inputs can follow one rule only. None when no manifest
    records one.
    """
    found: list[tuple[Path, ChipRule]] = []
    for root_s in roots:
        root = resolve(root_s)
        chips = _manifest(root).get("config", {}).get("chips")
        if chips is not None:
            found.append((root, ChipRule.model_validate(chips)))
    if not found:
        return None
    first_root, first = found[0]
    key = ("size", "edge", "min_clear")
    for root, chips in found[1:]:
        if any(getattr(chips, k) != getattr(first, k) for k in key):
            log.warning("%s cuts chips as %s, %s as %s; the checkpoint's inputs follow %s", root,
                        {k: getattr(chips, k) for k in key}, first_root, {k: getattr(first, k) for k in key},
                        first_root)
    return first


def read_split(roots: Sequence[str | Path], split: str) -> list[SourceRecord]:
    """Every record of ``split`` in the shards of the recipe outputs ``roots``, in shard order."""
    out: list[SourceRecord] = []
    for root_s in roots:
        root = resolve(root_s)
        manifest = _manifest(root)
        source = manifest.get("config", {}).get("source") or {}  # None in a recipe with `sources:`
        same_day = str(manifest.get("same_day") or source.get("same_day", "keep"))
        for shard in manifest.get("shards", []):
            if shard["split"] != split:
                continue
            for rec in iter_records(root / shard["path"]):
                out.append(SourceRecord(rec, same_day))
    return out


def select_records(
    records: Sequence[SourceRecord], cfg: DataConfig, seed: int, mixed: bool
) -> tuple[list[SourceRecord], dict[str, Any]]:
    """Filter records (``text_only``, ``families``, enough frames) and, with ``mixed``, apply ``cfg.mixture``.

    Returns:
        ``(records, report)``; the report counts what was left out and the mixture achieved.
    """
    need = cfg.frames.frames_per_sample
    report: dict[str, Any] = {"read": len(records), "dropped_positions": 0, "dropped_family": 0, "dropped_frames": 0}
    kept: list[SourceRecord] = []
    for sr in records:
        r = sr.record
        if cfg.text_only and r.has_positions:
            report["dropped_positions"] += 1
        elif cfg.families is not None and r.family not in cfg.families:
            report["dropped_family"] += 1
        elif frames_available(len(r.chip.frame_indices), cfg.frames) != need:
            report["dropped_frames"] += 1
        else:
            kept.append(sr)
    if mixed and cfg.mixture is not None:
        unique: dict[str, SourceRecord] = {}
        for sr in kept:
            unique.setdefault(sr.record.sample_id, sr)
        pools = {
            name: [sr for sr in unique.values() if sr.record.family in comp.families]
            for name, comp in cfg.mixture.items()
        }
        empty = [name for name, pool in pools.items() if not pool]
        if empty:
            raise ConfigError(
                f"data.mixture.{empty[0]}: no records of families {cfg.mixture[empty[0]].families} left; check "
                "data.roots, data.families and data.text_only"
            )
        n = cfg.samples_per_epoch or len({sr.record.sample_id for p in pools.values() for sr in p})
        try:
            kept, mix_report = mix(pools, {k: c.weight for k, c in cfg.mixture.items()}, n, seed, "train")
        except ValueError as exc:
            raise ConfigError(f"data.mixture: {exc}; check data.roots, data.families and data.text_only") from exc
        report["mixture"] = mix_report.as_dict()
    report["kept"] = len(kept)
    return kept, report


def frames_available(n: int, cfg: FramesConfig) -> int:
    """How many frames the sampler gives a record of ``n`` frames (records must give ``frames_per_sample``)."""
    if cfg.sampler == "fast_slow":
        idx, _ = select_indices(np.arange(n).astype("datetime64[D]"), _fast_slow(cfg))
        return int(idx.size)
    return min(n, cfg.num_frames)


def _fast_slow(cfg: FramesConfig) -> FrameSamplingConfig:
    # the checkpoint's own sampler, so a question gets the frames a training sample got (select_indices reads
    # only the sampler's strides, counts and merge order)
    return cfg.input_frames()


def choose_frames(
    n: int, cfg: FramesConfig, rng: np.random.Generator | None
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """Indices into a record's ``n`` frames, and which are fast frames.

    ``random`` needs ``rng`` (a sorted draw without replacement); ``uniform`` keeps the first and last.
    """
    if cfg.sampler == "fast_slow":
        return select_indices(np.arange(n).astype("datetime64[D]"), _fast_slow(cfg))
    k = min(n, cfg.num_frames)
    if cfg.sampler == "random" and rng is not None:
        idx = np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)
    else:
        idx = uniform_indices(n, k)
    return idx, np.zeros(idx.size, dtype=bool)


# -- rendering ---------------------------------------------------------------------------------------


@dataclass
class _Collector:
    """LAPE formatters that remember each position token's continuous value, in text order.

    ``mode`` (set per turn): bins, ``-INPUT`` or ``-OUTPUT`` placeholders
    (:func:`~agrivlm.lape.tokens.position_formatters`).
    """

    vocab: LapeVocab
    values: list[float] = field(default_factory=list)
    mode: QuestionPositions | AnswerPositions = "bins"

    def __post_init__(self) -> None:
        # every mode's formatters once per record, not once per position
        modes = dict.fromkeys(get_args(QuestionPositions) + get_args(AnswerPositions))
        self._formatters = {m: position_formatters(self.vocab, m) for m in modes}

    def _fmt(self, kind: str, v: Any) -> str:
        return str(self._formatters[self.mode][kind](v))

    def box(self, b: Sequence[float]) -> str:
        self.values.extend(float(x) for x in b)  # WIDTH u1, HEIGHT v1, WIDTH u2, HEIGHT v2
        return self._fmt("fmt_box", b)

    def point(self, p: Sequence[float]) -> str:
        self.values.extend(float(x) for x in p)
        return self._fmt("fmt_point", p)

    def segment(self, s: Sequence[float]) -> str:
        self.values.extend(float(x) for x in s)
        return self._fmt("fmt_segment", s)

    def time(self, t: float) -> str:
        self.values.append(float(t))
        return self._fmt("fmt_time", t)


def render_record(record: Record, vocab: LapeVocab, visual_token: str = "<video>",
                  question_positions: QuestionPositions = "bins",
                  answer_positions: AnswerPositions = "bins") -> tuple[str, Answer, list[float]]:
    """``(prompt, answer, position values in text order)`` of a record, positions as LAPE tokens.

    The prompt is the first user turn; the answer the one assistant turn, or for a multi-turn record the
    segments ``[answer_1, continuation(question_2), answer_2, …]`` (every answer supervised).

    ``question_positions`` / ``answer_positions``: how the user / assistant turns' positions are written.
    """
    coll = _Collector(vocab)
    rendered: list[tuple[str, str]] = []
    for turn in record.conversation:
        coll.mode = question_positions if turn.role == "user" else answer_positions
        rendered.append((turn.role, _render_turn(turn, coll)))
    roles = [role for role, _ in rendered]
    if len(roles) < 2 or roles != ["user", "assistant"] * (len(roles) // 2):
        raise RecordError(f"record {record.sample_id}: turns must alternate user, assistant, … and end with the "
                          f"assistant's answer; got {roles}")
    prompt = format_prompt(rendered[:1], visual_token)
    if len(rendered) == 2:
        return prompt, rendered[1][1], coll.values
    # every answer supervised, each next question read (agrivlm.pipeline.conversation's multi-turn rule)
    segments = [text if role == "assistant" else continuation(text) for role, text in rendered[1:]]
    return prompt, segments, coll.values


def _render_turn(turn: Turn, coll: _Collector) -> str:
    return render_text(turn, coll.box, coll.point, coll.segment, coll.time, polygon_sep=POLYGON_SEP)


# -- frames from the stack -------------------------------------------------------------------------------


class StackCache:
    """Stacks of the records, opened once per process (per data spec, mask spec and same-day rule) and kept open."""

    def __init__(self) -> None:
        self._stacks: dict[tuple[Any, ...], Stack] = {}

    def get(self, record: Record, same_day: str) -> Stack:
        """The record's stack (files kept open until :meth:`close`)."""
        ref = record.stack
        key = (ref.data, ref.masks, same_day, tuple(ref.assets or ()), tuple(ref.mask_assets or ()),
               tuple(ref.mask_values or ()))
        stack = self._stacks.get(key)
        if stack is None:
            stack = ref.open(same_day)
            stack.open()
            self._stacks[key] = stack
        return stack

    def close(self) -> None:
        """Close every stack."""
        for stack in self._stacks.values():
            stack.close()
        self._stacks.clear()

    def __getstate__(self) -> dict[str, Any]:  # a DataLoader worker reopens its own
        return {"_stacks": {}}


def read_record_frames(
    record: Record, stack: Stack, preset: str | None = None
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """The record's frames: ``(T, C, h, w)`` float32 (NaN = no data) and clouds ``(T, h, w)``, one read of the window.

    With a band ``preset`` (:data:`agrivlm.pipeline.bands.PRESETS`) stored values become reflectance / index
    units (:func:`~agrivlm.pipeline.bands.to_reflectance`, as ``agrivlm infer`` does), else they stay as stored.

    Raises:
        RecordError: the stack's files at ``frame_indices`` are not the record's ``frame_files``.
    """
    idx = list(record.chip.frame_indices)
    if max(idx) >= len(stack.steps):
        raise RecordError(
            f"record {record.sample_id}: frame index {max(idx)} but the stack {record.stack.data} has "
            f"{len(stack.steps)} dates; rebuild the recipe"
        )
    have = ["+".join(s.path.name for s in stack.steps[i].sources) for i in idx]
    want = ["+".join(Path(f).name for f in name.split("+")) for name in record.stack.frame_files]
    if have != want:
        bad = next(k for k, (a, b) in enumerate(zip(have, want, strict=True)) if a != b)
        raise RecordError(
            f"record {record.sample_id}: frame {bad} should be {want[bad]} but the stack {record.stack.data} has "
            f"{have[bad]} there; the stack changed since the recipe was built — rebuild it"
        )
    w = record.chip.window
    data, _nodata, clouds = stack.read_window(Window(w.col_off, w.row_off, w.width, w.height), steps=idx)
    if preset is not None:
        times = np.asarray(record.chip.frame_dates, dtype="datetime64[s]")
        data = to_reflectance(data, preset, times, source=record.sample_id).astype(np.float32)
    return data, clouds


def dataset_band_stats(
    records: Sequence[SourceRecord], stacks: StackCache, cfg: NormalizeConfig
) -> BandStats:
    """Per-band percentile range over the frames of up to ``cfg.max_chips`` distinct training chips.

    Chips are taken in sorted ``(data, chip_id)`` order (deterministic), each with the frames of its first record.
    """
    first: dict[tuple[str, str], SourceRecord] = {}
    for sr in records:
        first.setdefault((sr.record.stack.data, sr.record.chip.chip_id), sr)
    chosen = [first[k] for k in sorted(first)][: cfg.max_chips]
    if not chosen:
        raise PipelineError("no training records to compute band statistics from")
    values = []
    for sr in chosen:
        data, _ = read_record_frames(sr.record, stacks.get(sr.record, sr.same_day), cfg.preset)
        values.append(np.moveaxis(data, 1, 0).reshape(data.shape[1], -1))
    flat = np.concatenate(values, axis=1)[None, :, None, :]  # (1, C, 1, N)
    return robust_stats(flat, cfg.percentiles, source=f"{len(chosen)} training chips")


def fixed_band_stats(cfg: NormalizeConfig) -> BandStats:
    """The ``fixed`` normalisation range as :class:`BandStats`."""
    assert cfg.low is not None and cfg.high is not None
    return BandStats(np.asarray(cfg.low, dtype=np.float64), np.asarray(cfg.high, dtype=np.float64), (0.0, 100.0))


# -- dataset -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One training sample before batching.

    Attributes:
        sample_id: the record's id.
        prompt: flattened prompt with one ``<video>``/``<image>`` placeholder.
        answer: the supervised answer (or a multi-turn record's segments, every answer supervised).
        positions: continuous value of each position token of prompt + answer, in text order.
        pixels: ``(T, C, H, W)`` float32 normalised to [0, 1], NaN = no data.
        frame_times: ``(T,)`` normalised ``t`` of each frame on the range of the record's frame dates.
        is_fast: ``(T,)`` True for fast-stream frames.
    """

    sample_id: str
    prompt: str
    answer: Answer
    positions: list[float]
    pixels: npt.NDArray[np.float32]
    frame_times: npt.NDArray[np.float64]
    is_fast: npt.NDArray[np.bool_]


class RecordDataset(Dataset[Sample]):
    """Records → :class:`Sample`; indexed by ``(epoch, index)`` so per-sample randomness depends on nothing else."""

    def __init__(
        self,
        records: Sequence[SourceRecord],
        frames: FramesConfig,
        normalize_cfg: NormalizeConfig,
        vocab: LapeVocab,
        seed: int,
        stats: BandStats | None = None,
        train: bool = True,
        stacks: StackCache | None = None,
        growth_focus: GrowthFocus = "none",
        question_positions: QuestionPositions = "bins",
        point_marker: PointMarker = "none",
        answer_positions: AnswerPositions = "bins",
        frames_as_bands: bool = False,
    ) -> None:
        if not records:
            raise ConfigError("no records left to train on; check data.roots, data.text_only, data.families, "
                              "data.frames (records with fewer frames than a sample needs are left out)")
        self.records = list(records)
        self.frames, self.norm, self.vocab, self.seed = frames, normalize_cfg, vocab, seed
        self.stats = stats
        self.growth_focus = growth_focus
        self.question_positions = question_positions
        self.answer_positions = answer_positions
        self.frames_as_bands = frames_as_bands
        self.point_marker = point_marker
        self.train = train
        self.stacks = stacks if stacks is not None else StackCache()
        if normalize_cfg.mode != "chip" and stats is None:
            raise ValueError("dataset/fixed normalisation needs stats")
        if point_marker != "none":
            several = next((sr.record.sample_id for sr in self.records
                            if sum(bool(t.points) for t in sr.record.conversation if t.role == "user") > 1), None)
            if several is not None:
                raise ConfigError(f"data.point_marker: {point_marker} draws one point into a sample's frames, but "
                                  f"record {several} asks about several points (a recipe's points_per_record > 1); "
                                  "use one or the other")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int] | int) -> Sample:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        sr = self.records[index]
        rec = sr.record
        data, clouds = read_record_frames(rec, self.stacks.get(rec, sr.same_day), self.norm.preset)
        rng = np.random.default_rng(sample_seed(self.seed, epoch, index)) if self.train else None
        idx, is_fast = choose_frames(data.shape[0], self.frames, rng)
        pixels = data[idx]
        if self.frames.clouds_as_nodata:
            pixels = np.where(clouds[idx][:, None], np.float32(np.nan), pixels)
        stats = self.stats if self.norm.mode != "chip" else robust_stats(pixels, self.norm.percentiles, rec.sample_id)
        assert stats is not None
        pixels = normalize(pixels, stats)
        if self.growth_focus == "box" and rec.family == "growth_stages" and rec.conversation[0].boxes:
            pixels = focus_on_box(pixels, rec.conversation[0].boxes[0])
        if self.point_marker == "square" and rec.conversation[0].points:
            pixels = mark_point(pixels, rec.conversation[0].points[0])
        _, times = frame_time_positions(np.asarray(rec.chip.frame_dates, dtype="datetime64[s]"), idx,
                                        axis=rec.chip.time_axis)
        token = visual_placeholder(len(idx))
        if self.frames_as_bands:
            pixels, times = stack_dates(pixels, times)
        prompt, answer, positions = render_record(rec, self.vocab, token, self.question_positions,
                                                  self.answer_positions)
        return Sample(rec.sample_id, prompt, answer, positions, pixels, times, is_fast)


class EpochIndexSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)`` from a :class:`ResumableSampler` (per-sample randomness is seeded with both)."""

    def __init__(self, sampler: ResumableSampler) -> None:
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.sampler.epoch
        for index in self.sampler:
            yield epoch, index


class Collator:
    """Samples → the processor's batch, plus ``sample_ids`` (list) and ``is_fast`` ``(B, T)``."""

    def __init__(self, processor: Any, lape: bool, layout: ChipInputConfig | None = None) -> None:
        self.processor = processor
        self.lape = lape
        #: AnyRes / multi-scale items per sample (``data.anyres`` / ``data.scales``), None: one item.
        self.layout = layout

    def __call__(self, samples: Sequence[Sample]) -> dict[str, Any]:
        """One micro-batch."""
        text = [s.prompt for s in samples]
        pixels = [s.pixels for s in samples]
        answers = [s.answer for s in samples]
        times = [s.frame_times for s in samples]
        given = [s.positions for s in samples] if self.lape else None
        batch = self.processor.from_frames(text, pixels, self.layout, answers=answers, frame_times=times,
                                           positions=given)
        out: dict[str, Any] = dict(batch)
        out["sample_ids"] = [s.sample_id for s in samples]
        out["is_fast"] = torch.from_numpy(np.stack([s.is_fast for s in samples]))
        return out
