"""``agrivlm infer`` beyond one process: a stack's chip grid as tasks on a dask.distributed cluster.

The grid's chips, in reading order, are cut into tasks of ``chips_per_task`` chips
(:func:`agrivlm.infer.runner.chip_segments`: the cut depends on the grid only). A task carries the
:class:`~agrivlm.geo.stack.Stack` (paths, dates, grid: a few hundred bytes per file), the block-aligned
groups of its chips, the ids of its chips already journaled and a :class:`WorkerSpec` (checkpoint path,
device, dtype, task, input settings, batch size). The worker loads the checkpoint once per process
(:func:`worker_predictor`), reads its own windows, prepares and generates exactly as the single-process loop
does (the same reader thread and batching, :func:`agrivlm.infer.runner.run_batches`) and sends back only the
chips' journal records. No raster data and no weights go through the scheduler or the client.

The client journals each task's batches as they arrive, one fsynced line per batch, so the resume journal
holds as on one process: a restarted run skips every journaled chip, whether it ran here or on a worker.
Because a batch never spans two tasks in either mode, a run on a cluster gives the same batches — and so
the same answers, to the bit, on the same device and thread count — as one process with the same
``--batch-size`` and ``--chips-per-task``.

When a worker dies, the scheduler runs its tasks again elsewhere (``distributed``'s ``allowed-failures``,
3 by default, bounds how often one task may take a worker down). A task's result reaches the client once;
records of chips already journaled are dropped all the same, so no chip is written twice.

Every worker must see the stacks, the masks and the checkpoint at the same paths (a shared file system)
and have agrivlm installed; a worker whose checkpoint differs from the client's (another config or other
weight sizes) refuses to answer.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rasterio.windows import Window
from tqdm.auto import tqdm

from agrivlm.geo.chips import ChipGroup, ChipStream, chip_id
from agrivlm.geo.rasters import RasterPath
from agrivlm.geo.stack import Stack
from agrivlm.infer.errors import InferError
from agrivlm.infer.generate import Predictor
from agrivlm.infer.journal import ChipRecord, Journal
from agrivlm.lape.tokens import LapeVocab
from agrivlm.pipeline.inputs import InputConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to answer like the client would: the checkpoint and the run's settings."""

    model_dir: str
    device: str
    dtype: str
    max_new_tokens: int
    task: str
    question: str | None
    config: InputConfig
    batch_size: int
    #: torch threads per worker process (None: leave the worker's setting).
    threads: int | None = None
    #: The client's view of the checkpoint (config hash, weight files' names and sizes).
    fingerprint: dict[str, Any] = field(default_factory=dict)
    #: Questions per generation at most (``--max-batch``; None: a batch is generated whole).
    max_batch: int | None = None


@dataclass
class InferTaskResult:
    """What one task sends back: the journal records of its batches, and where its time went."""

    batches: list[list[ChipRecord]] = field(default_factory=list)
    model_seconds: float = 0.0
    io_seconds: float = 0.0
    starved_seconds: float = 0.0
    host: str = ""


def checkpoint_identity(folder: Path) -> dict[str, Any]:
    """The parts of a checkpoint's fingerprint that must agree across machines: config hash, weight sizes."""
    from agrivlm.infer.runner import model_fingerprint

    fp = model_fingerprint(folder)
    return {"config_sha256": fp["config_sha256"], "weights": [[w[0], w[1]] for w in fp["weights"]]}


def checkpoint_summary(folder: str | Path) -> tuple[int, LapeVocab]:
    """``(bands per frame, LAPE vocabulary)`` of a checkpoint, from its config alone (no weights loaded).

    Raises:
        InferError: the model has LAPE off (a stage-1 checkpoint cannot answer with positions).

    """
    from agrivlm.model import AgriVLMConfig

    config = AgriVLMConfig.from_pretrained(folder, local_files_only=True)
    if not config.answers_positions:
        raise InferError(f"{folder}: the model has LAPE off (stage-1 checkpoint); it cannot answer with positions")
    return int(config.num_bands), LapeVocab(config.num_spatial_tokens, config.num_temporal_tokens)


_PREDICTORS: dict[tuple[str, str, str, str], Predictor] = {}
_PREDICTOR_LOCK = threading.Lock()


def worker_predictor(spec: WorkerSpec) -> Predictor:
    """The worker process's loaded checkpoint (loaded on its first task, kept for the next ones).

    Raises:
        InferError: the checkpoint at ``spec.model_dir`` on this worker is not the client's.

    """
    folder = Path(spec.model_dir)
    if not (folder / "config.json").is_file():
        raise InferError(f"worker {socket.gethostname()}: no checkpoint at {folder}; every worker must see the "
                         "checkpoint at the client's path")
    ident = checkpoint_identity(folder)
    if spec.fingerprint and ident != spec.fingerprint:
        raise InferError(f"worker {socket.gethostname()}: the checkpoint at {folder} differs from the client's "
                         f"({ident} ≠ {spec.fingerprint}); give every worker the same files")
    key = (spec.model_dir, json.dumps(ident, sort_keys=True), spec.device, spec.dtype)
    with _PREDICTOR_LOCK:
        predictor = _PREDICTORS.get(key)
        if predictor is None:
            _PREDICTORS.clear()  # one checkpoint per worker process at a time
            predictor = Predictor.load(folder, device=spec.device, dtype=spec.dtype,
                                       max_new_tokens=spec.max_new_tokens)
            _PREDICTORS[key] = predictor
    return predictor


def infer_task(spec: WorkerSpec, stack: Stack, groups: Sequence[ChipGroup], done: frozenset[str],
               fields: Any = None) -> InferTaskResult:
    """Run on a worker: answer the questions about ``groups``' chips (except ``done``) as one task."""
    from agrivlm.infer.prepare import ChipPreparer
    from agrivlm.infer.runner import Producer, run_batches

    if spec.threads:
        import torch

        torch.set_num_threads(spec.threads)
    predictor = worker_predictor(spec)
    predictor.split_at = spec.max_batch  # a cached predictor may have served another run
    preparer = ChipPreparer(spec.config, spec.task, predictor.vocab, spec.question, fields)  # type: ignore[arg-type]
    stream = ChipStream(stack, chip_size=spec.config.chip_size, stride=spec.config.stride, edge=spec.config.edge)
    producer = Producer(stream, groups, done, preparer, predictor, spec.batch_size)
    out = InferTaskResult(host=socket.gethostname())
    producer.start()
    try:
        for records, seconds in run_batches(producer, predictor, preparer.task, spec.max_new_tokens):
            out.batches.append(records)
            out.model_seconds += seconds
    finally:
        producer.close()
    out.io_seconds, out.starved_seconds = producer.io_seconds, producer.starved_seconds
    return out


def _union(members: Sequence[tuple[int, Window]]) -> Window:
    r0 = min(int(w.row_off) for _, w in members)
    c0 = min(int(w.col_off) for _, w in members)
    r1 = max(int(w.row_off + w.height) for _, w in members)
    c1 = max(int(w.col_off + w.width) for _, w in members)
    return Window(c0, r0, c1 - c0, r1 - r0)


def task_groups(groups: Sequence[ChipGroup], segments: dict[int, int], done: set[str] | frozenset[str]
                ) -> list[list[ChipGroup]]:
    """The groups of each task with chips still to do, in task order.

    A group whose chips fall in two tasks is split into two groups (each reading the union of its chips'
    windows); a task whose chips are all ``done`` is left out.
    """
    by_task: dict[int, list[ChipGroup]] = {}
    for g in groups:
        parts: dict[int, list[tuple[int, Window]]] = {}
        for index, window in g.members:
            parts.setdefault(segments[index], []).append((index, window))
        for seg, members in parts.items():
            sub = g if len(members) == len(g.members) else ChipGroup(_union(members), tuple(members))
            by_task.setdefault(seg, []).append(sub)
    return [
        gs for _, gs in sorted(by_task.items())
        if any(chip_id(w) not in done for g in gs for _, w in g.members)
    ]


class ClusterRun:
    """Runs stacks' chips on the cluster behind a connected ``distributed.Client``."""

    def __init__(self, client: Any, spec: WorkerSpec, on_task_done: Callable[[int, int], None] | None = None
                 ) -> None:
        self.client = client
        self.spec = spec if spec.fingerprint else replace(spec, fingerprint=checkpoint_identity(Path(spec.model_dir)))
        self.on_task_done = on_task_done

    def validate(self, files: Sequence[RasterPath]) -> int:
        """Read every block of ``files`` on the workers (a task per file)."""
        from agrivlm.geo.distributed import validate_distributed

        return validate_distributed(self.client, files)

    def run_stack(self, stream: ChipStream, key: str, groups: Sequence[ChipGroup], done: set[str],
                  segments: dict[int, int], fields: Any, journal: Journal, report: Any, outcome: Any,
                  bar: tqdm) -> None:
        """Answer every chip of ``stream`` not in ``done`` on the workers; journal each batch as it arrives."""
        from distributed import KilledWorker, as_completed

        from agrivlm.infer.runner import tally

        tasks = task_groups(groups, segments, done)
        if not tasks:
            return
        fields_ref = self.client.scatter(fields, broadcast=True, hash=False) if fields is not None else None
        run = uuid.uuid4().hex[:12]
        futures = []
        for k, gs in enumerate(tasks):
            ids = {chip_id(w) for g in gs for _, w in g.members}
            futures.append(self.client.submit(
                infer_task, self.spec, stream.stack, gs, frozenset(ids & done), fields_ref, pure=False,
                key=f"agrivlm-infer-{run}-{k}",
            ))
        journaled = set(done)
        try:
            for n, future in enumerate(as_completed(futures, loop=self.client.loop), start=1):
                result: InferTaskResult = future.result()
                future.release()
                for records in result.batches:
                    fresh = [r for r in records if r["chip_id"] not in journaled]
                    if len(fresh) < len(records):
                        log.warning("%d chip(s) came back twice; journaled once", len(records) - len(fresh))
                    if not fresh:
                        continue
                    journal.append({"type": "chips", "stack": key, "chips": fresh})
                    journaled.update(r["chip_id"] for r in fresh)
                    tally(fresh, report, outcome)
                    bar.update(len(fresh))
                report.model_seconds += result.model_seconds
                report.io_seconds += result.io_seconds
                report.starved_seconds += result.starved_seconds
                bar.set_postfix(tasks=f"{n}/{len(futures)}", unparsed=report.unparsed, refresh=False)
                if self.on_task_done is not None:
                    self.on_task_done(n, len(futures))
        except KilledWorker as exc:
            self.client.cancel(futures)
            raise InferError(
                f"a task of {outcome.name} took down worker after worker ({exc}); the chips journaled so far are "
                "kept: rerun the same command to go on, and check the workers' logs (memory?)"
            ) from exc
        except BaseException:
            self.client.cancel(futures)
            raise
