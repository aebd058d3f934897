"""The chip loop that one process and a cluster share: chips → questions → batched answers → journal records.

:class:`Producer` reads chip groups in a background thread, prepares each chip's questions and cuts them into
generation batches (never across two tasks, :func:`chip_segments`); :func:`run_batches` generates each batch and
turns the answers into journal records (:func:`answer_record`, :func:`batch_records`); :func:`tally` counts them
into the run's :class:`RunReport`. ``agrivlm.infer.batch`` runs it in this process, ``agrivlm.infer.distributed``
on dask workers; neither imports the other's internals.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import shapely

from agrivlm.errors import PipelineError
from agrivlm.geo.chips import Chip, ChipGroup, ChipStream
from agrivlm.geo.coords import GeoGrid
from agrivlm.infer.errors import InferError
from agrivlm.infer.fingerprint import weights_fingerprint
from agrivlm.infer.generate import DecodedAnswer, Predictor, Question
from agrivlm.infer.journal import AnswerRecord, ChipRecord
from agrivlm.infer.prepare import ChipPreparer
from agrivlm.infer.prompts import Task, listing_details, parse_stage, parse_timeline, says_no_fields, stages_at
from agrivlm.pipeline.inputs import InputConfig

log = logging.getLogger(__name__)


@dataclass
class StackOutcome:
    """What happened to one stack in this run."""

    name: str
    ok: bool
    message: str = ""
    chips_total: int = 0
    processed: int = 0
    resumed: int = 0
    skipped: int = 0


@dataclass
class RunReport:
    """Counts and timings of a run (written as ``<out>_report.json``)."""

    task: str
    stacks: list[StackOutcome] = field(default_factory=list)
    questions: int = 0
    unparsed: int = 0
    unmatched_tokens: int = 0
    degenerate: int = 0
    skip_reasons: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    #: Seconds generating (summed over workers on a cluster).
    model_seconds: float = 0.0
    #: Seconds reading, preparing and encoding chips in the reader thread(s), overlapping generation.
    io_seconds: float = 0.0
    #: Seconds the model waited for chips (the reading it did not hide).
    starved_seconds: float = 0.0
    #: Seconds of the chip loops (from the first chip read to the last batch journaled): ``seconds`` less opening,
    #: validating and fingerprinting the stacks. On one process only (0 on a cluster).
    loop_seconds: float = 0.0
    #: Workers that answered (0: this process).
    workers: int = 0
    outputs: dict[str, str] = field(default_factory=dict)
    features: int = 0
    features_before_nms: int = 0
    stage_rows: int = 0

    @property
    def failed(self) -> list[StackOutcome]:
        """Stacks that failed."""
        return [s for s in self.stacks if not s.ok]

    @property
    def processed(self) -> int:
        """Chips run through the model in this run."""
        return sum(s.processed for s in self.stacks)

    @property
    def chips_per_second(self) -> float:
        """Chips processed per second of this run's chip loop (reading, preparing and generating)."""
        return self.processed / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "task": self.task,
            "stacks": [s.__dict__ for s in self.stacks],
            "chips_processed": self.processed,
            "chips_resumed": sum(s.resumed for s in self.stacks),
            "chips_skipped": sum(s.skipped for s in self.stacks),
            "skip_reasons": dict(self.skip_reasons),
            "questions": self.questions,
            "unparsed_answers": self.unparsed,
            "unmatched_position_tokens": self.unmatched_tokens,
            "degenerate_boxes": self.degenerate,
            "features_before_nms": self.features_before_nms,
            "features": self.features,
            "stage_rows": self.stage_rows,
            "seconds": round(self.seconds, 3),
            "model_seconds": round(self.model_seconds, 3),
            "io_seconds": round(self.io_seconds, 3),
            "starved_seconds": round(self.starved_seconds, 3),
            "loop_seconds": round(self.loop_seconds, 3),
            "workers": self.workers,
            "chips_per_second": None if not np.isfinite(self.chips_per_second) else round(self.chips_per_second, 3),
            "outputs": self.outputs,
        }


def file_stamp(path: Path) -> list[Any]:
    """``[name, size, mtime_ns]`` of a file (what a journal records of an input it does not hash)."""
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns]


def model_fingerprint(folder: Path) -> dict[str, Any]:
    """The checkpoint's identity: its path, the hash of its config, and ``[name, size, sha256]`` of its weights.

    The weights are hashed (once per run), so weights rewritten in place are told apart even with the same
    size, and a copy with new file times is still the same checkpoint.
    """
    config = folder / "config.json"
    return {
        "path": str(folder.resolve()),
        "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
        "weights": weights_fingerprint(folder),
    }


@dataclass
class ChipJob:
    """A chip on its way through the model: where it is and what is asked about it."""

    chip_id: str
    index: int
    grid: GeoGrid
    questions: list[Question]
    note: str = ""


@dataclass
class ChipSkip:
    """A chip that cannot be asked about, and why."""

    chip_id: str
    index: int
    reason: str


def _score(value: float) -> float | None:
    return None if not np.isfinite(value) else float(value)


def _holds_point(kind: str, value: Any, point: Sequence[float], tol: float) -> bool:
    """Whether a box ``(u1, v1, u2, v2)`` or ring of normalized points holds ``point`` (within ``tol``)."""
    if kind == "box":
        shape = shapely.box(min(value[0], value[2]), min(value[1], value[3]), max(value[0], value[2]),
                            max(value[1], value[3]))
    else:
        shape = shapely.make_valid(shapely.Polygon(value))
    return bool(shape.distance(shapely.Point(point[0], point[1])) <= tol)


def answer_record(task: Task, grid: GeoGrid, question: Question, answer: DecodedAnswer,
                  decode: Any) -> AnswerRecord:
    """One answer as a journal record: its text, score, parse status and features (WKB hex, stack CRS).

    ``decode`` turns token ids back into text (the item's own tokens, for the ``tokens`` column).
    """
    pos = answer.positions
    rec: AnswerRecord = {
        "meta": question.meta, "text": answer.text, "score": _score(answer.score), "finished": answer.finished,
        "unmatched": pos.unmatched, "features": [], "degenerate": 0, "unparsed": False,
    }
    axis = question.visual.time_axis

    def day(t: float) -> str:
        return str(axis.from_norm(t).astype("datetime64[D]"))

    if task in ("fields", "ask"):
        _add_listed_shapes(rec, task, grid, question, answer, decode)
        if task == "ask":
            _add_ask_positions(rec, grid, answer, decode, day)
        else:
            rec["unparsed"] = not pos.boxes and not pos.polygons and not says_no_fields(answer.text)
    elif "dates" in question.meta:  # growth_prompt: timeline
        spans = parse_timeline(answer.text, pos.segments)
        rec["spans"] = [[stage, day(a), day(b)] for stage, a, b in spans] if spans else []
        rec["stages"] = dict(zip(question.meta["dates"], stages_at(spans, question.meta["t"]), strict=True)) \
            if spans else {}
        rec["unparsed"] = spans is None
    else:
        stage = parse_stage(answer.text)
        rec["stage"] = stage
        rec["unparsed"] = stage is None
    return rec


def _listed_shapes(answer: DecodedAnswer) -> list[tuple[int, Literal["box", "polygon"], Any, list[int]]]:
    """``(first step, kind, value, steps)`` of the answer's boxes and polygons, in the order it lists them."""
    pos = answer.positions
    # boxes and polygons in the order the answer lists them (the order of their first tokens)
    return sorted(
        [(steps[0], "box", box, steps) for box, steps in zip(pos.boxes, answer.box_steps, strict=True)]
        + [(steps[0], "polygon", ring, steps)
           for ring, steps in zip(pos.polygons, answer.polygon_steps, strict=True)],
        key=lambda item: item[0],
    )


def _shape_polygon(grid: GeoGrid, kind: str, value: Any) -> tuple[Any, tuple[Any, Any, Any, Any]]:
    """``(polygon in the stack CRS or None when it has no area, normalized bounds (u1, v1, u2, v2))``."""
    if kind == "box":
        u1, u2 = sorted((value[0], value[2]))
        v1, v2 = sorted((value[1], value[3]))
        polygon = grid.norm_box_to_polygon((u1, v1, u2, v2)) if u2 > u1 and v2 > v1 else None
    else:
        polygon = grid.norm_polygon_to_crs(value)
        us, vs = [p[0] for p in value], [p[1] for p in value]
        u1, v1, u2, v2 = min(us), min(vs), max(us), max(vs)
    return polygon, (u1, v1, u2, v2)


def _add_listed_shapes(rec: AnswerRecord, task: Task, grid: GeoGrid, question: Question, answer: DecodedAnswer,
                       decode: Any) -> None:
    """Add the answer's boxes and polygons to ``rec["features"]`` (and count ``degenerate``, ``off_point``)."""
    items = _listed_shapes(answer)
    details = listing_details(answer.text, len(items))
    point = question.meta.get("point") if task == "fields" else None
    rec["off_point"] = 0
    for k, (_, kind, value, steps) in enumerate(items):
        polygon, (u1, v1, u2, v2) = _shape_polygon(grid, kind, value)
        if polygon is None:  # a box or ring without area
            rec["degenerate"] += 1
            continue
        if point is not None and not _holds_point(kind, value, point, 1.5 / max(grid.width, 1)):
            rec["off_point"] += 1  # a point prompt answered with another field's outline
            continue
        label, cut = details[k]
        rec["features"].append({
            "kind": kind, "geometry": shapely.to_wkb(polygon, hex=True), "score": _score(answer.item_score(steps)),
            "tokens": decode(answer.ids[steps[0]:steps[-1] + 1]), "label": label, "cut": cut,
            "box": [float(u1), float(v1), float(u2), float(v2)],
        })


def _add_ask_positions(rec: AnswerRecord, grid: GeoGrid, answer: DecodedAnswer, decode: Any,
                       day: Callable[[float], str]) -> None:
    """``--task ask``: add the answer's points (else the whole chip) to ``rec["features"]``, its dates and spans."""
    pos = answer.positions
    for point, steps in zip(pos.points, answer.point_steps, strict=True):
        x, y = grid.norm_to_crs(point[0], point[1])
        rec["features"].append({
            "kind": "point", "geometry": shapely.to_wkb(shapely.Point(float(x), float(y)), hex=True),
            "score": _score(answer.item_score(steps)), "tokens": decode([answer.ids[s] for s in steps]),
            "label": "", "cut": False, "box": [float(point[0]), float(point[1])],
        })
    if not rec["features"]:  # an answer without positions is about the whole chip
        rec["features"].append({
            "kind": "chip", "geometry": shapely.to_wkb(grid.footprint(), hex=True), "score": rec["score"],
            "tokens": "", "label": "", "cut": False, "box": [0.0, 0.0, 1.0, 1.0],
        })
    rec["dates"] = [day(t) for t in answer.times]
    rec["segments"] = [[day(a), day(b)] for a, b in pos.segments]
    rec["unparsed"] = False


_END = object()


#: Chips per task by default (``--chips-per-task``): a generation batch never spans two tasks, on one
#: process or on a cluster, so both give the same batches and the same answers to the bit.
CHIPS_PER_TASK = 64


def ask_chip(predictor: Predictor, config: InputConfig, chip: Chip, question: str) -> tuple[Question, DecodedAnswer]:
    """One free question about one chip, prepared and answered exactly as ``agrivlm infer --task ask`` does.

    The chip's frames and bands are made with the checkpoint's input settings (``config``), the answer is
    generated greedily and its positions decoded with sub-bin precision. The explorer's question box asks
    through this; batch runs ask many chips at once through :class:`Producer` and :func:`run_batches`.

    Raises:
        PipelineError: the chip cannot become model input (too few usable frames, nothing to normalise).
        InferError: an empty question.

    """
    questions = ChipPreparer(config, "ask", predictor.vocab, question).prepare(chip).questions
    return questions[0], predictor.generate(predictor.encode(questions, 1))[0]


def chip_segments(groups: Sequence[ChipGroup], chips_per_task: int) -> dict[int, int]:
    """Chip index → task number: the grid's chips in reading order, cut every ``chips_per_task`` chips.

    The cut depends on the grid only (not on what is already journaled), so a resumed run, a run on one
    process and a run on a cluster cut the same tasks.
    """
    if chips_per_task < 1:
        raise InferError(f"--chips-per-task must be ≥ 1, got {chips_per_task}")
    out: dict[int, int] = {}
    k = 0
    for g in groups:
        for index, _ in g.members:
            out[index] = k // chips_per_task
            k += 1
    return out


class Producer(threading.Thread):
    """Streams a stack's chips, prepares their questions and encodes whole batches into a bounded queue.

    A batch is flushed when it holds ``batch_size`` questions or when the next chip belongs to another task
    (``segment_of``), and generated whole: a chip's questions are never split over two generations (a chip
    asked at the 36 points of a 6 × 6 grid is one generation of 36 questions at ``batch_size`` 8 or 32). Each
    generation runs until its longest answer ends, so splitting 36 questions into 32 + 4 cost almost two
    generations' steps for one chip (the default model's fields task: 4.1 s generating 16 chips at batch 32
    split so, 3.1 s whole). ``io_seconds`` is the thread's time reading, preparing and encoding (not waiting for
    the model to take a batch); ``starved_seconds`` the consumer's time waiting for a batch (the part of
    that work the model did not hide).
    """

    def __init__(self, stream: ChipStream, groups: Sequence[Any], done: set[str] | frozenset[str],
                 preparer: ChipPreparer, predictor: Predictor, batch_size: int,
                 segment_of: dict[int, int] | None = None, prefetch: int = 2) -> None:
        super().__init__(name="agrivlm-infer-prefetch", daemon=True)
        self.stream, self.groups, self.done = stream, groups, done
        self.preparer, self.predictor, self.batch_size = preparer, predictor, batch_size
        self.segment_of = segment_of or {}
        self.out: queue.Queue[object] = queue.Queue(maxsize=max(1, prefetch))
        self.stop = threading.Event()
        self.io_seconds = 0.0
        self.starved_seconds = 0.0
        self._blocked = 0.0

    def _put(self, item: object) -> bool:
        t0 = time.perf_counter()
        try:
            while not self.stop.is_set():
                try:
                    self.out.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False
        finally:
            self._blocked += time.perf_counter() - t0

    def _flush(self, pending: list[ChipJob | ChipSkip]) -> bool:
        questions = [q for job in pending if isinstance(job, ChipJob) for q in job.questions]
        encoded = self.predictor.encode(questions, self.predictor.split_at or len(questions)) if questions else []
        return self._put((pending, questions, encoded))

    def run(self) -> None:
        """The thread: read and prepare every group, then the end marker (or the exception that stopped it)."""
        started = time.perf_counter()
        try:
            self._run()
        except BaseException as exc:  # handed to the consumer, which raises it
            self._put(exc)
        finally:
            self.io_seconds = time.perf_counter() - started - self._blocked

    def _run(self) -> None:
        pending: list[ChipJob | ChipSkip] = []
        n_questions = 0
        segment: int | None = None
        with self.stream.stack:
            for chip, empty in self.stream.iter_groups(self.groups):
                if self.stop.is_set():
                    return
                if chip.chip_id in self.done:
                    continue
                seg = self.segment_of.get(chip.index)
                if pending and seg != segment:  # a batch never spans two tasks
                    if not self._flush(pending):
                        return
                    pending, n_questions = [], 0
                segment = seg
                item = self._prepare(chip, empty)
                pending.append(item)
                if isinstance(item, ChipJob):
                    n_questions += len(item.questions)
                if n_questions >= self.batch_size:
                    if not self._flush(pending):
                        return
                    pending, n_questions = [], 0
        if pending and not self._flush(pending):
            return
        self._put(_END)

    def _prepare(self, chip: Chip, empty: bool) -> ChipJob | ChipSkip:
        if empty:
            return ChipSkip(chip.chip_id, chip.index, "no data: every pixel of every date is nodata")
        try:
            prepared = self.preparer.prepare(chip)
        except PipelineError as exc:
            return ChipSkip(chip.chip_id, chip.index, str(exc))
        return ChipJob(chip.chip_id, chip.index, chip.grid, prepared.questions, prepared.note)

    def items(self) -> Iterator[tuple[list[ChipJob | ChipSkip], list[Question], list[Any]]]:
        """The prepared batches in order; raises what the thread raised."""
        while True:
            t0 = time.perf_counter()
            try:
                item = self.out.get(timeout=0.1)
            except queue.Empty:
                self.starved_seconds += time.perf_counter() - t0
                if not self.is_alive() and self.out.empty():
                    raise InferError("the chip reader stopped without finishing") from None
                continue
            self.starved_seconds += time.perf_counter() - t0
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]

    def close(self) -> None:
        """Stop the thread and wait for it."""
        self.stop.set()
        self.join()


def run_batches(producer: Producer, predictor: Predictor, task: Task, max_new_tokens: int | None = None
                ) -> Iterator[tuple[list[ChipRecord], float]]:
    """Generate the producer's batches in order: ``(chip records, seconds generating)`` per batch."""
    for pending, questions, encoded in producer.items():
        t0 = time.perf_counter()
        answers = predictor.generate(encoded, max_new_tokens) if encoded else []
        seconds = time.perf_counter() - t0
        yield batch_records(pending, questions, answers, task, predictor), seconds


def _skip_reason(reason: str) -> str:
    """A skip message without its chip id (for counting reasons)."""
    return reason.split(": ", 1)[1] if reason.startswith("chip ") and ": " in reason else reason


def tally(records: Sequence[ChipRecord], report: RunReport, outcome: StackOutcome) -> None:
    """Count journaled chip records into the run's report and the stack's outcome."""
    for rec in records:
        if rec["status"] == "skipped":
            outcome.skipped += 1
            report.skip_reasons[_skip_reason(rec["reason"])] += 1
            continue
        outcome.processed += 1
        for ans in rec["answers"]:
            report.questions += 1
            report.unparsed += int(ans["unparsed"])
            report.unmatched_tokens += int(ans["unmatched"])
            report.degenerate += int(ans["degenerate"])


def batch_records(pending: Sequence[ChipJob | ChipSkip], questions: Sequence[Question],
                  answers: Sequence[DecodedAnswer], task: Task, predictor: Predictor) -> list[ChipRecord]:
    """The journal records of one batch: a skipped chip with its reason, or a chip with its answers."""
    if len(answers) != len(questions):
        raise AssertionError(f"{len(answers)} answers for {len(questions)} questions")  # pragma: no cover
    records: list[ChipRecord] = []
    k = 0
    for job in pending:
        if isinstance(job, ChipSkip):
            records.append({"chip_id": job.chip_id, "index": job.index, "status": "skipped", "reason": job.reason})
            continue
        recs: list[AnswerRecord] = []
        for q in job.questions:
            recs.append(answer_record(task, job.grid, q, answers[k], predictor.decode_ids))
            k += 1
        records.append({"chip_id": job.chip_id, "index": job.index, "status": "ok", "note": job.note,
                        "answers": recs})
    return records

