"""Batch inference over stacks: chips → questions → batched generation → features in map coordinates.

``run_inference`` is ``agrivlm infer`` as a function (its options checked by :class:`InferOptions`). Per stack
(each INPUT is one stack, ingested on its own):

1. open the stack (:func:`agrivlm.geo.open_stack`) and validate every block of every file
   (:func:`agrivlm.geo.validate_files`). A stack that fails — an unreadable or truncated file, no CRS, no
   date, a band count the preset does not take — is reported with the file's name and skipped; the other
   stacks go on and the run ends with a failure status. ("One bad file" of a stack fails that stack: a stack
   is one co-registered time series, and a missing date would silently change every chip's frames.)
2. a background thread streams the chips (:class:`agrivlm.geo.ChipStream`, block-aligned reads with its own
   reader threads), turns each into questions (:mod:`agrivlm.infer.prepare`) and encodes full batches with
   the processor, while the main thread generates (:class:`agrivlm.infer.generate.Predictor`): reading and
   decoding chips overlap the model.
3. answers → features through the chip's own grid and time axis (``GeoGrid.norm_box_to_polygon``,
   ``GeoGrid.norm_polygon_to_crs``, ``GeoGrid.norm_to_crs``, ``TimeAxis.from_norm``) → one journal line per
   batch (:mod:`agrivlm.infer.journal`). Steps 2-3 are :mod:`agrivlm.infer.runner`, the loop this process and
   a cluster (:mod:`agrivlm.infer.distributed`) share.

Then the outputs are written atomically from the journal (:mod:`agrivlm.infer.outputs`): overlapping chips'
detections merged by NMS in map units, growth stages merged per field and day.

A chip is skipped (and journaled with the reason, so it is not retried) when it holds no data at all, has
fewer usable frames than the checkpoint wants, or its bands cannot be normalised. Answers the model gets
wrong (no box where boxes were asked for, no stage word) are counted as unparsed and kept raw in the journal.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from agrivlm.errors import AgriVLMError
from agrivlm.geo.chips import ChipGroup, ChipStream, chip_id
from agrivlm.geo.remote import is_remote
from agrivlm.geo.stack import Stack, open_stack
from agrivlm.geo.validate import validate_files
from agrivlm.infer.errors import InferError
from agrivlm.infer.fingerprint import describe_stack_change, stack_fingerprint
from agrivlm.infer.generate import Predictor
from agrivlm.infer.journal import Journal, StackEntry
from agrivlm.infer.prepare import ChipPreparer, FieldLayer, channels_of, check_stack_bands
from agrivlm.infer.prompts import Task
from agrivlm.infer.runner import (
    CHIPS_PER_TASK,
    Producer,
    RunReport,
    StackOutcome,
    chip_segments,
    file_stamp,
    model_fingerprint,
    run_batches,
    tally,
)
from agrivlm.pipeline.inputs import InputConfig

if TYPE_CHECKING:
    from agrivlm.infer.distributed import ClusterRun
    from agrivlm.lape.tokens import LapeVocab

log = logging.getLogger(__name__)

#: Bumped when prompts or decoding change in a way that makes old journals' answers differ.
#: 2: answers may list polygons (points chained by the polygon separator), journaled as ``kind="polygon"``.
#: 3: point prompts (``fields_prompt: points``): many questions per chip, answers off their point dropped.
#: 4: growth as a timeline (``growth_prompt: timeline``): one question per field and season, stage spans.
PIPELINE_VERSION = 4

#: Default ``--max-new-tokens`` per task: a listing of up to 12 fields as outlines of 8 vertices (3 tokens a
#: vertex with its separator; with its label and cut mark an item takes up to 40 tokens on the sample, 34 on
#: average), a stage word, a short answer.
DEFAULT_MAX_NEW_TOKENS: dict[str, int] = {"fields": 512, "growth": 8, "ask": 64}
#: ``--task fields`` with point prompts: one item per answer (label, 8 vertices, cut mark: ≤ 40 tokens).
POINT_PROMPT_MAX_NEW_TOKENS = 48
#: ``--task growth`` as a timeline: up to 20 spans (a grassland mown five times lists 16) of a stage word, two
#: ``TEMP`` tokens and a separator.
TIMELINE_MAX_NEW_TOKENS = 128


@dataclass(frozen=True)
class StackInput:
    """One stack to run on: the INPUT as given (a folder, a glob, a file, remote files or a STAC JSON), its masks."""

    #: The INPUT as given on the command line (shown in messages and the ``stack`` column).
    name: str
    #: Per-date mask files (a folder, glob or file), or None.
    masks: str | None = None
    #: A STAC INPUT's assets that are the bands (None: the items' one raster asset).
    assets: tuple[str, ...] | None = None
    #: STAC masks' asset, and the mask values meaning masked (None: any non-zero value).
    mask_assets: tuple[str, ...] | None = None
    mask_values: tuple[int, ...] | None = None

    @property
    def key(self) -> str:
        """The stack's identity in the journal: the absolute path (or glob) of the INPUT, a remote one as given."""
        return input_key(self.name)

    def open(self) -> Stack:
        """The stack (:func:`~agrivlm.geo.stack.open_stack` with the STAC and mask settings)."""
        return open_stack(self.name, masks=self.masks, assets=self.assets, mask_assets=self.mask_assets,
                          mask_values=self.mask_values)


def input_key(text: str) -> str:
    """A local INPUT's absolute path, a remote one (URL, ``/vsi…/``) as given."""
    return text if is_remote(text) else os.path.abspath(text)


# -- the settings a journal belongs to ------------------------------------------------------------------


def run_settings(
    model_dir: Path, task: str, stacks: Sequence[StackInput], config: InputConfig, question: str | None,
    max_new_tokens: int, dtype: str, fields: FieldLayer | None, field_id: str | None, field_class: str | None,
) -> dict[str, Any]:
    """Everything that decides the answers (the journal's header); batch size and device are not in it."""
    return {
        "pipeline_version": PIPELINE_VERSION,
        "model": model_fingerprint(model_dir),
        "task": task,
        "question": question,
        # the STAC settings only when given, so journals of file stacks written before them still resume
        "stacks": [[s.key, input_key(s.masks) if s.masks else None]
                   + ([list(s.assets or []), list(s.mask_assets or []), list(s.mask_values or [])]
                      if s.assets or s.mask_assets or s.mask_values else []) for s in stacks],
        "inputs": config.model_dump(mode="json"),
        "max_new_tokens": max_new_tokens,
        "dtype": dtype,
        "fields": None if fields is None else {**dict(zip(("name", "size", "mtime_ns"), file_stamp(fields.path),
                                                          strict=True)), "path": str(fields.path.resolve()),
                                               "id": field_id, "class": field_class},
    }


# -- answers → journal records --------------------------------------------------------------------------


def _write_rasters(out: Path, task: str, frame: Any, stages: Any, journal: Journal, keys: Sequence[str],
                   names: Sequence[str]) -> dict[str, str]:
    """``--raster``: one COG per stack that was read (see :mod:`agrivlm.infer.rasters`); ``{what: path}``."""
    from agrivlm.infer.rasters import raster_path, write_extent_raster, write_stage_raster

    written = {}
    for k, (key, name) in enumerate(zip(keys, names, strict=True)):
        info = journal.stack_info(key)
        if info is None or "fingerprint" not in info:
            continue
        which = None if len(keys) == 1 else k
        if task == "fields":
            mine = frame[frame["stack"] == name] if "stack" in frame and len(frame) else frame
            path = write_extent_raster(mine, info, raster_path(out, "extent", which))
        else:
            mine = stages[stages["stack"] == name] if len(stages) else stages
            path = write_stage_raster(mine, frame, info, raster_path(out, "stages", which))
        written["raster" if which is None else f"raster_{k}"] = str(path)
    return written


# -- the chip loop ------------------------------------------------------------------------------------


def infer_stack(
    stack_input: StackInput, journal: Journal, predictor: Predictor | None, preparer: ChipPreparer,
    config: InputConfig, report: RunReport, batch_size: int, validate: bool, bar: tqdm,
    chips_per_task: int = CHIPS_PER_TASK, cluster: ClusterRun | None = None,
) -> StackOutcome:
    """Run one stack (see the module docstring); its failure is returned, not raised.

    On one process ``predictor`` answers; with ``cluster`` the workers do (and validate the files).
    """
    outcome = StackOutcome(name=stack_input.name, ok=True)
    key = stack_input.key
    done_entry = journal.stack_done(key)
    if done_entry is not None:
        outcome.chips_total = int(done_entry.get("chips_total", 0))
        outcome.resumed = len(journal.done_chips(key))
        log.info("stack %s: every chip is in the journal", stack_input.name)
        return outcome
    try:
        stack, stream, outcome.chips_total = _open_stack(stack_input, preparer, config, validate, cluster)
    except AgriVLMError as exc:
        return StackOutcome(name=stack_input.name, ok=False, message=str(exc))
    fingerprint = stack_fingerprint(stack)
    previous = journal.stack_info(key)
    if previous is not None:  # checked before the run (check_journaled_stacks); again, as it is read now
        _refuse_changed(stack_input, journal, previous, fingerprint)
    journal.append({"type": "stack", "stack": key, "name": stack_input.name, "crs": stack.crs.to_wkt(),
                    "bounds": list(stack.grid.bounds), "chips_total": outcome.chips_total,
                    "dates": [str(stack.times[0]), str(stack.times[-1])], "fingerprint": fingerprint})
    done = journal.done_chips(key)
    outcome.resumed = len(done)
    all_groups = stream.groups()
    groups = [g for g in all_groups if any(chip_id(w) not in done for _, w in g.members)]
    bar.total = (bar.total or 0) + outcome.chips_total - len(done)
    bar.refresh()
    segments = chip_segments(all_groups, chips_per_task)
    try:
        if cluster is not None:
            cluster.run_stack(stream, key, all_groups, done, segments, preparer.fields, journal, report, outcome,
                              bar)
        else:
            assert predictor is not None
            _run_local(stream, key, groups, done, segments, preparer, predictor, batch_size, journal, report,
                       outcome, bar)
    except AgriVLMError as exc:  # a damaged block found while streaming (without validation)
        outcome.ok, outcome.message = False, str(exc)
        return outcome
    journal.append({"type": "stack_done", "stack": key, "chips_total": outcome.chips_total,
                    "chips_skipped": outcome.skipped})
    return outcome


def _open_stack(stack_input: StackInput, preparer: ChipPreparer, config: InputConfig, validate: bool,
                cluster: ClusterRun | None) -> tuple[Stack, ChipStream, int]:
    """``(stack, chip stream, chips)``, the stack's bands checked and (``validate``) every block of its files read.

    ``preparer``'s field layer is brought into the stack's CRS.

    Raises:
        AgriVLMError: the stack cannot be opened, does not have the bands, a file is damaged, or the chips do
            not fit its grid.

    """
    stack = stack_input.open()
    check_stack_bands(config, len(stack.band_names), f"stack {stack_input.name}")
    if validate:
        masks = [m.path for step in stack.steps for m in step.masks if m is not None]
        if cluster is not None:
            cluster.validate(stack.files + masks)
        else:
            validate_files(stack.files + masks, progress=False)
    stream = ChipStream(stack, chip_size=config.chip_size, stride=config.stride, edge=config.edge)
    chips = len(stream)  # the grid's windows: a grid the chips do not fit fails the stack too
    if preparer.fields is not None:
        preparer.fields = preparer.fields.to_crs(stack.crs)
    return stack, stream, chips


def check_journaled_stacks(journal: Journal, stacks: Sequence[StackInput]) -> None:
    """Refuse a resume when a stack the journal has answers of is no longer the stack it was.

    Each journaled stack is opened (headers only) and its :func:`~agrivlm.infer.fingerprint.stack_fingerprint`
    compared with the journal's.

    Raises:
        InferError: a journaled stack changed or cannot be opened any more (saying what, and ``--restart``).

    """
    for s in stacks:
        info = journal.stack_info(s.key)
        if info is None:
            continue
        try:
            stack = s.open()
        except AgriVLMError as exc:
            raise InferError(f"stack {s.name}: the journal {journal.path} has answers of it, but it cannot be opened "
                             f"now ({exc}); pass --restart to start over") from exc
        _refuse_changed(s, journal, info, stack_fingerprint(stack))


def _refuse_changed(stack_input: StackInput, journal: Journal, info: StackEntry,
                    fingerprint: dict[str, Any]) -> None:
    """Raise :class:`InferError` when ``fingerprint`` differs from the journaled stack record ``info``."""
    old = info.get("fingerprint")
    change = "the journal holds no fingerprint of it" if old is None else describe_stack_change(old, fingerprint)
    if change is not None:
        raise InferError(f"stack {stack_input.name}: {change} since the journal {journal.path} was written; its "
                         "answers are of the stack as it was: pass --restart to start over")


def _run_local(stream: ChipStream, key: str, groups: Sequence[ChipGroup], done: set[str], segments: dict[int, int],
               preparer: ChipPreparer, predictor: Predictor, batch_size: int, journal: Journal, report: RunReport,
               outcome: StackOutcome, bar: tqdm) -> None:
    """The chips of one stack in this process: a reader thread feeds the model; a journal line per batch."""
    started = time.perf_counter()
    producer = Producer(stream, groups, done, preparer, predictor, batch_size, segments)
    producer.start()
    try:
        for records, seconds in run_batches(producer, predictor, preparer.task):
            report.model_seconds += seconds
            journal.append({"type": "chips", "stack": key, "chips": records})
            tally(records, report, outcome)
            bar.update(len(records))
            bar.set_postfix(unparsed=report.unparsed, skipped=sum(report.skip_reasons.values()), refresh=False)
    finally:
        producer.close()
        report.io_seconds += producer.io_seconds
        report.starved_seconds += producer.starved_seconds
        report.loop_seconds += time.perf_counter() - started


def count_journal(journal: Journal) -> Counter[str]:
    """Chip records per ``stack|chip_id`` in a journal (each is 1 when no chip was processed twice)."""
    return Counter(f"{rec['stack']}|{rec['chip_id']}" for rec in journal.chips())


def load_json(path: Path) -> Any:
    """Read a JSON file."""
    return json.loads(path.read_text())


# -- the run ------------------------------------------------------------------------------------------
def apply_overrides(config: InputConfig, overrides: dict[str, Any] | None) -> InputConfig:
    """``config`` with flag values set (dotted keys, e.g. ``bands.preset``, ``frames.max_frames``), validated."""
    data = config.model_dump(mode="json")
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    from agrivlm.config import parse_config

    return parse_config(InputConfig, data, "agrivlm infer options")


@dataclass(frozen=True, kw_only=True)
class InferOptions:
    """The options of one run (:func:`run_inference`'s arguments, which builds it), checked.

    Constructing it makes the checks that need nothing but the options, in the order a run has always made them
    first. A run's other checks wait for what they need — the output folder cleared of what a killed run left,
    the checkpoint's input settings, the field layer, the model — and are the methods the run calls at that
    point (:meth:`stack_inputs`, :meth:`answer_tokens`, :meth:`field_layer`, :meth:`check_predictor`,
    :meth:`check_chips_per_task`), so a run with several problems reports the one it always reported, after doing
    what it always did before it.

    Raises:
        InferError: options that cannot work (naming what to change).

    """

    #: One stack per item (a folder, a glob or a file of GeoTIFFs, one file per date; remote files; a STAC JSON:
    #: :mod:`agrivlm.geo.stac`).
    inputs: Sequence[str]
    #: Checkpoint folder (``save_pretrained`` of model and processor; ``agrivlm_inputs.yaml``).
    model_dir: str | os.PathLike[str]
    #: ``.gpkg``, ``.parquet`` (GeoParquet 1.1), ``.fgb`` or ``.geojson`` (RFC 7946, EPSG:4326; see
    #: :mod:`agrivlm.infer.outputs`); beside it ``<name>.journal.jsonl``, ``<stem>_report.json`` and, for growth,
    #: ``<stem>_stages.csv``.
    out: str | os.PathLike[str]
    #: ``fields``, ``growth`` or ``ask``.
    task: Task
    #: Per-date mask files of each stack (one item per input), or None.
    masks: Sequence[str] | None
    #: The question of ``task="ask"``.
    question: str | None
    #: Growth: the field polygons to ask about (any CRS).
    fields: str | os.PathLike[str] | None
    #: The column of ``fields`` with unique ids (default: field_id, id, index, else the row number).
    field_id: str | None
    #: The column of ``fields`` with land-use classes, used in the questions' wording.
    field_class: str | None
    #: Questions per generation batch (chips are batched together until it is reached; one chip's questions are
    #: never split over two generations).
    batch_size: int
    #: Per answer (default :data:`DEFAULT_MAX_NEW_TOKENS` of the task).
    max_new_tokens: int | None
    #: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
    device: str
    #: Model weights' dtype: ``float32``, ``bfloat16``, ``float16``.
    dtype: str
    #: Input settings that win over the checkpoint's (dotted keys of :class:`InputConfig`).
    overrides: dict[str, Any] | None
    #: Read every block of every file before a stack's chips (a damaged file fails the stack early).
    validate: bool
    #: NMS threshold: a detection overlapping a better one by IoU above this is dropped.
    nms_iou: float
    #: Detections scored below this are dropped.
    min_score: float
    #: Discard an existing journal and start over.
    restart: bool
    #: Replace an existing output that has no journal to resume.
    overwrite: bool
    #: Show a progress bar.
    progress: bool
    #: An already loaded model (its device and dtype are used as they are; not with a cluster).
    predictor: Predictor | None
    #: Chips of the grid per task (reading order); a batch never spans two tasks, so the same value gives the
    #: same answers on one process and on a cluster.
    chips_per_task: int
    #: Run on a ``LocalCluster`` of this many single-threaded worker processes.
    workers: int | None
    #: Run on the dask.distributed scheduler at this address (``tcp://host:8786``); every worker must see the
    #: stacks and the checkpoint at the same paths and have agrivlm installed.
    scheduler: str | None
    #: Torch threads of each worker (default: the workers' own setting; 1 on a ``LocalCluster``).
    threads: int | None
    #: On a cluster, called as ``on_task_done(done, total)`` after each task's chips are journaled (tests use it
    #: to kill a worker mid-run).
    on_task_done: Callable[[int, int], None] | None
    #: Also write COGs on each stack's grid (:mod:`agrivlm.infer.rasters`): the field-score raster (fields) or a
    #: stage map per date (growth).
    raster: bool
    #: STAC inputs: the assets that are the bands, in order (every stack's).
    assets: Sequence[str] | None
    #: STAC masks: their asset.
    mask_assets: Sequence[str] | None
    #: The mask values that mean masked (default: any non-zero value).
    mask_values: Sequence[int] | None
    #: Questions per generation at most: a batch (whole chips) is generated in parts of this many (a memory cap;
    #: None: whole, :attr:`Predictor.split_at`). Like the batch size, not part of the journal's settings.
    max_batch: int | None = None

    def __post_init__(self) -> None:
        """Refuse options that cannot work whatever the inputs hold (a run's first checks, in their order)."""
        from agrivlm.infer.outputs import check_format
        from agrivlm.infer.prompts import TASKS

        if self.task not in TASKS:
            raise InferError(f"--task {self.task!r}: use one of {', '.join(TASKS)}")
        check_format(self.out_path)
        if not self.inputs:
            raise InferError("no INPUTS: give one or more stacks (folders, globs or files of GeoTIFFs)")
        if self.masks and len(self.masks) != len(self.inputs):
            raise InferError(f"{len(self.masks)} --masks for {len(self.inputs)} INPUTS: give one --masks per input, "
                             "in order")
        if self.batch_size < 1:
            raise InferError(f"--batch-size must be ≥ 1, got {self.batch_size}")
        if self.max_batch is not None and self.max_batch < 1:
            raise InferError(f"--max-batch must be ≥ 1, got {self.max_batch}")
        if self.raster and self.task == "ask":
            raise InferError("--raster writes field extents (--task fields) or stage maps (--task growth), not answers")
        if not 0.0 <= self.nms_iou <= 1.0:
            raise InferError(f"--nms-iou must be in [0, 1], got {self.nms_iou}")
        if not (self.model_path / "config.json").is_file():
            raise InferError(f"{self.model_path}: not a checkpoint folder (no config.json); pass --model with a folder "
                             "saved by save_pretrained")

    @property
    def out_path(self) -> Path:
        """``out`` as a path."""
        return Path(self.out)

    @property
    def model_path(self) -> Path:
        """``model_dir`` as a path."""
        return Path(self.model_dir)

    @property
    def on_cluster(self) -> bool:
        """Whether dask workers answer (``workers`` or ``scheduler`` given) rather than this process."""
        return self.workers is not None or self.scheduler is not None

    def stack_inputs(self) -> list[StackInput]:
        """One :class:`StackInput` per INPUT, with its ``masks`` and the STAC settings.

        Raises:
            InferError: the same stack given twice.

        """
        masks, assets, mask_assets, mask_values = self.masks, self.assets, self.mask_assets, self.mask_values
        stacks = [StackInput(name, masks[i] if masks else None, tuple(assets) if assets else None,
                             tuple(mask_assets) if mask_assets else None, tuple(mask_values) if mask_values else None)
                  for i, name in enumerate(self.inputs)]
        if len({s.key for s in stacks}) != len(stacks):
            raise InferError("the same stack is given twice in INPUTS")
        return stacks

    def answer_tokens(self, config: InputConfig) -> int:
        """Most new tokens per answer: ``max_new_tokens``, else the task's default for ``config``'s prompts.

        Raises:
            InferError: fewer than 1.

        """
        task, max_new_tokens = self.task, self.max_new_tokens
        max_new = max_new_tokens if max_new_tokens is not None else DEFAULT_MAX_NEW_TOKENS[task]
        if max_new_tokens is None and task == "fields" and config.fields_prompt == "points":
            max_new = POINT_PROMPT_MAX_NEW_TOKENS
        if max_new_tokens is None and task == "growth" and config.growth_prompt == "timeline":
            max_new = TIMELINE_MAX_NEW_TOKENS
        if max_new < 1:
            raise InferError(f"--max-new-tokens must be ≥ 1, got {max_new}")
        return max_new

    def field_layer(self) -> FieldLayer | None:
        """The ``fields`` layer, read (None without ``fields``).

        Raises:
            InferError: ``task="growth"`` without ``fields``.

        """
        layer = FieldLayer.read(self.fields, self.field_id, self.field_class) if self.fields is not None else None
        if self.task == "growth" and layer is None:
            raise InferError("--task growth needs --fields PATH: the field polygons whose stages to predict")
        return layer

    def check_predictor(self) -> None:
        """Refuse a loaded ``predictor`` with a cluster (made once the field layer is read)."""
        if self.on_cluster and self.predictor is not None:
            raise InferError("a loaded predictor runs in this process; it cannot be used with --workers/--scheduler")

    def check_chips_per_task(self) -> None:
        """Refuse ``chips_per_task`` below 1 (made once the model is known to take the band settings)."""
        if self.chips_per_task < 1:
            raise InferError(f"--chips-per-task must be ≥ 1, got {self.chips_per_task}")


def run_inference(
    inputs: Sequence[str],
    model_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    task: Task = "fields",
    masks: Sequence[str] | None = None,
    question: str | None = None,
    fields: str | os.PathLike[str] | None = None,
    field_id: str | None = None,
    field_class: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    device: str = "auto",
    dtype: str = "float32",
    overrides: dict[str, Any] | None = None,
    validate: bool = True,
    nms_iou: float = 0.5,
    min_score: float = 0.0,
    restart: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    predictor: Predictor | None = None,
    chips_per_task: int = CHIPS_PER_TASK,
    workers: int | None = None,
    scheduler: str | None = None,
    threads: int | None = None,
    on_task_done: Callable[[int, int], None] | None = None,
    raster: bool = False,
    assets: Sequence[str] | None = None,
    mask_assets: Sequence[str] | None = None,
    mask_values: Sequence[int] | None = None,
    max_batch: int | None = None,
) -> RunReport:
    """Run a checkpoint over stacks and write the predictions (``agrivlm infer``; see the module docstring).

    The arguments are the fields of :class:`InferOptions`, each described there, and checked by it.

    Returns:
        The run's :class:`RunReport` (also written as ``<stem>_report.json``). ``report.failed`` lists
        stacks that failed; the outputs hold only their chips journaled before (by an earlier run or before a
        damaged block was met).

    Raises:
        InferError / ConfigError: options that cannot work (naming what to change).

    """
    started = time.perf_counter()
    options = InferOptions(
        inputs=inputs, model_dir=model_dir, out=out, task=task, masks=masks, question=question, fields=fields,
        field_id=field_id, field_class=field_class, batch_size=batch_size, max_new_tokens=max_new_tokens,
        device=device, dtype=dtype, overrides=overrides, validate=validate, nms_iou=nms_iou, min_score=min_score,
        restart=restart, overwrite=overwrite, progress=progress, predictor=predictor, chips_per_task=chips_per_task,
        workers=workers, scheduler=scheduler, threads=threads, on_task_done=on_task_done, raster=raster,
        assets=assets, mask_assets=mask_assets, mask_values=mask_values, max_batch=max_batch,
    )
    return _run(options, started)


@dataclass(frozen=True)
class _Prepared:
    """A run ready for its journal: the options and what was read and checked from them."""

    options: InferOptions
    journal_file: Path
    stacks: list[StackInput]
    #: The checkpoint's input settings with the overrides.
    config: InputConfig
    #: Most new tokens per answer (:meth:`InferOptions.answer_tokens`).
    max_new: int
    layer: FieldLayer | None
    #: The model in this process; None on a cluster (the workers load it).
    predictor: Predictor | None
    vocab: LapeVocab
    #: The journal's header (:func:`run_settings`).
    settings: dict[str, Any]


def _run(options: InferOptions, started: float) -> RunReport:
    """:func:`run_inference` once its options are checked; ``started``: its ``perf_counter`` at the call."""
    from agrivlm.infer.outputs import report_path

    run = _prepare(options)
    report = RunReport(task=options.task)
    with ExitStack() as scope:
        cluster = _connect_cluster(run, scope, report)
        journal = scope.enter_context(Journal.open(run.journal_file, run.settings, restart=options.restart))
        check_journaled_stacks(journal, run.stacks)
        if journal.resumed_entries:
            log.info("%s: resuming (%d journaled chip(s))", run.journal_file, sum(1 for _ in journal.chips()))
        _run_stacks(run, journal, cluster, report)
        _write_predictions(run, journal, report)
        report.outputs["journal"] = str(run.journal_file)
    report.outputs["report"] = str(report_path(options.out_path))
    from agrivlm.io import atomic_path

    with atomic_path(report_path(options.out_path)) as tmp:
        tmp.write_text(json.dumps({**report.to_dict(), "total_seconds": round(time.perf_counter() - started, 3)},
                                  indent=2) + "\n")
    return report


def _prepare(options: InferOptions) -> _Prepared:
    """Everything before the journal opens: the output folder, the stacks, the input settings, the model."""
    journal_file = _clear_output(options)
    stacks = options.stack_inputs()
    config, channels = _input_settings(options)
    max_new = options.answer_tokens(config)
    layer = options.field_layer()
    options.check_predictor()
    predictor, num_bands, vocab = _load_model(options, max_new)
    dates = ""
    if config.frames_as_bands:  # every frame's bands side by side: the model takes frames × bands
        channels *= config.frames.max_frames
        dates = f" x {config.frames.max_frames} dates as bands"
    if channels != num_bands:
        raise InferError(
            f"the band settings give {channels} channel(s) (preset {config.bands.preset!r}"
            f"{', composite ' + repr(config.bands.composite) if config.bands.composite else ''}{dates}) but the "
            f"model takes {num_bands}; pick the preset/composite (and frames) the model was trained with"
        )
    options.check_chips_per_task()
    task, field_id, field_class = options.task, options.field_id, options.field_class
    settings = run_settings(options.model_path, task, stacks, config, options.question if task == "ask" else None,
                            max_new, options.dtype, layer, field_id, field_class)
    return _Prepared(options, journal_file, stacks, config, max_new, layer, predictor, vocab, settings)


def _clear_output(options: InferOptions) -> Path:
    """The journal's path, once ``out``'s folder is known writable and what a killed run left beside it is gone.

    Raises:
        InferError: the folder cannot be written, or ``out`` exists without a journal (and no ``--overwrite``).

    """
    from agrivlm.infer.outputs import journal_path, report_path, stages_path

    out = options.out_path
    journal_file = journal_path(out)
    from agrivlm.io import ensure_writable_dir, remove_stale_temporaries

    ensure_writable_dir(out.parent, InferError)
    # what a killed run left beside the outputs (their hidden temporaries) goes before anything is written
    for target in (out, stages_path(out), report_path(out)):
        remove_stale_temporaries(target, time.time())
    if out.exists() and not journal_file.exists() and not options.overwrite and not options.restart:
        raise InferError(f"{out}: already exists; pass --overwrite to replace it")
    return journal_file


def _input_settings(options: InferOptions) -> tuple[InputConfig, int]:
    """``(settings, channels per frame)``: the checkpoint's input settings with the overrides, and their bands."""
    from agrivlm.pipeline.inputs import load_input_config

    config, found = load_input_config(options.model_path)
    if not found:
        log.warning("%s has no agrivlm_inputs.yaml and its processor no inputs; using the recipes' default chips, "
                    "frames and bands", options.model_path)
    config = apply_overrides(config, options.overrides)
    return config, channels_of(config)


def _load_model(options: InferOptions, max_new: int) -> tuple[Predictor | None, int, LapeVocab]:
    """``(predictor, bands per frame, LAPE vocabulary)`` of the model that answers in this process.

    On a cluster the workers load the model: here only what the checks need of it, and no predictor.
    """
    if options.on_cluster:  # the workers load the model; here only what the checks need
        from agrivlm.infer.distributed import checkpoint_summary

        num_bands, vocab = checkpoint_summary(options.model_path)
        return None, num_bands, vocab
    predictor = options.predictor
    if predictor is None:
        predictor = Predictor.load(options.model_path, device=options.device, dtype=options.dtype,
                                   max_new_tokens=max_new)
    else:
        predictor.max_new_tokens = max_new
    if options.predictor is None or options.max_batch is not None:  # a caller's predictor keeps its own cap
        predictor.split_at = options.max_batch
    return predictor, predictor.num_bands, predictor.vocab


def _connect_cluster(run: _Prepared, scope: ExitStack, report: RunReport) -> ClusterRun | None:
    """The cluster the run's chips go to, connected in ``scope`` (None: they are answered in this process).

    Connected before the journal opens: a cluster that cannot be reached leaves no journal behind.
    """
    options = run.options
    if not options.on_cluster:
        return None
    from agrivlm.geo.distributed import dask_client
    from agrivlm.infer.distributed import ClusterRun, WorkerSpec

    spec = WorkerSpec(str(options.model_path.resolve()), options.device, options.dtype, run.max_new, options.task,
                      options.question, run.config, options.batch_size, options.threads, max_batch=options.max_batch)
    client = scope.enter_context(dask_client(options.workers, options.scheduler))
    cluster = ClusterRun(client, spec, options.on_task_done)
    report.workers = len(client.scheduler_info()["workers"])
    return cluster


def _run_stacks(run: _Prepared, journal: Journal, cluster: ClusterRun | None, report: RunReport) -> None:
    """Every stack's chips into the journal (:func:`infer_stack`), a failed stack reported and skipped.

    Raises:
        InferError: no stack could be read (an existing output is left as it was).

    """
    options = run.options
    bar = tqdm(total=0, desc=f"infer {options.task}", unit="chip", disable=not options.progress, dynamic_ncols=True)
    loop_start = time.perf_counter()
    try:
        for s in run.stacks:
            preparer = ChipPreparer(run.config, options.task, run.vocab, options.question, run.layer)
            outcome = infer_stack(s, journal, run.predictor, preparer, run.config, report, options.batch_size,
                                  options.validate, bar, options.chips_per_task, cluster)
            report.stacks.append(outcome)
            if not outcome.ok:
                log.error("stack %s skipped: %s", s.name, outcome.message)
                bar.write(f"error: stack {s.name} skipped: {outcome.message}")
    finally:
        bar.close()
    report.seconds = time.perf_counter() - loop_start
    if run.stacks and not any(o.ok for o in report.stacks):
        # nothing was read: an existing output (a previous run's, even with --restart/--overwrite) stays
        failed = "; ".join(f"{o.name}: {o.message}" for o in report.stacks)
        out = options.out_path
        kept = f"{out} left as it was" if out.exists() else "nothing written"
        raise InferError(f"no stack could be read ({failed}); {kept}")


def _write_predictions(run: _Prepared, journal: Journal, report: RunReport) -> None:
    """The outputs from the journal (NMS across chips, or growth stages per field and day), and ``--raster``'s."""
    from agrivlm.infer.outputs import detection_frame, growth_frame, output_crs, stage_table, suppress, write_outputs

    options = run.options
    task, out = options.task, options.out_path
    keys, names = [s.key for s in run.stacks], [s.name for s in run.stacks]
    if task == "growth":
        stages = stage_table(journal, keys, names)
        frame = growth_frame(stages, run.layer, output_crs(journal, keys))
        report.stage_rows = len(stages)
        report.features_before_nms = report.features = len(frame)
    else:
        stages = None
        frame = detection_frame(journal, keys, names, task)
        report.features_before_nms = len(frame)
        frame = suppress(frame, options.nms_iou, options.min_score)
        report.features = len(frame)
    # the GeoPackage's last_change: the newest acquisition of the stacks, not the clock (same answers, same bytes)
    last = [str(info["dates"][-1])[:10] for k in keys if (info := journal.stack_info(k)) and info.get("dates")]
    report.outputs = write_outputs(out, task, frame, stages, max(last) if last else None)
    if options.raster:
        report.outputs.update(_write_rasters(out, task, frame, stages, journal, keys, names))
