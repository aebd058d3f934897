"""Ingestion beyond one machine: the chip grid as tasks on a dask.distributed cluster.

The chip grid is partitioned as in the single-process stream (:meth:`ChipStream.groups`: block-aligned
groups of chips), and consecutive groups are batched into tasks. A task carries the :class:`Stack`
itself (file paths, dates, grid, band names: it pickles without open handles, a few hundred bytes per
file), the chip parameters and its groups; the worker opens the files and reads its own windows, and
returns only the index rows of its chips and the ids of its all-nodata chips. No raster data goes
through the scheduler or the client.

Fault tolerance: when a worker dies, the scheduler reschedules the tasks it held (``distributed``'s
``allowed-failures``, 3 by default, bounds how often one task may take a worker down). The merge keys
rows by chip id, so a task that ran twice cannot duplicate a chip, and checks that every chip of the
grid came back exactly once (kept or skipped) before anything is written.

Every worker must see the files at the same paths (a shared or network file system, or object
storage paths GDAL can open) and have agrivlm installed.
"""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from agrivlm.errors import IngestError
from agrivlm.geo.chips import ChipGroup, ChipStream, Edge
from agrivlm.geo.rasters import RasterPath
from agrivlm.geo.stack import Stack
from agrivlm.geo.validate import validate_files

log = logging.getLogger(__name__)

#: Tasks per worker thread when splitting the grid: enough to balance load and to lose little when a
#: worker dies, few enough that scheduling overhead stays small against reading.
TASKS_PER_THREAD = 4


@dataclass
class TaskResult:
    """What one task sends back: index rows of its kept chips, and its all-nodata chips."""

    #: One :func:`agrivlm.geo.index.chip_row` per kept chip.
    rows: list[dict[str, object]] = field(default_factory=list)
    #: ``(chip_index, chip_id)`` of each chip skipped because it holds no data at all.
    skipped: list[tuple[int, str]] = field(default_factory=list)


def chip_task(
    stack: Stack, chip_size: int | tuple[int, int], stride: int | tuple[int, int] | None, edge: str,
    groups: Sequence[ChipGroup], skip_empty: bool = True,
) -> TaskResult:
    """Run on a worker: read ``groups`` of ``stack`` (opened here) and return their chips' index rows."""
    from agrivlm.geo.index import chip_row

    stream = ChipStream(stack, chip_size=chip_size, stride=stride, edge=edge, skip_empty=skip_empty, workers=0)
    out = TaskResult()
    with stack:
        for chip, empty in stream.iter_groups(groups):
            if skip_empty and empty:
                out.skipped.append((chip.index, chip.chip_id))
            else:
                out.rows.append(chip_row(chip))
    return out


def split_tasks(groups: Sequence[ChipGroup], n_tasks: int) -> list[list[ChipGroup]]:
    """Consecutive groups in ``n_tasks`` batches of nearly equal chip counts (fewer if there are fewer groups)."""
    n_tasks = max(1, min(n_tasks, len(groups)))
    total = sum(len(g.members) for g in groups)
    per_task = total / n_tasks
    tasks: list[list[ChipGroup]] = [[]]
    done = 0
    for g in groups:
        if tasks[-1] and done >= per_task * len(tasks) and len(tasks) < n_tasks:
            tasks.append([])
        tasks[-1].append(g)
        done += len(g.members)
    return tasks


@dataclass
class MergedChips:
    """Rows of every kept chip (sorted by ``chip_index``), the skipped chip ids, and what the merge saw."""

    rows: list[dict[str, object]]
    skipped_ids: list[str]
    #: Rows that arrived more than once (a task that ran twice) and were dropped.
    duplicates: int = 0


def merge_results(results: Sequence[TaskResult], n_chips: int) -> MergedChips:
    """Merge task results as the single-process path would: one row per chip id, sorted by chip index.

    Raises:
        IngestError: a chip of the grid is missing (neither kept nor skipped).

    """
    rows: dict[str, dict[str, object]] = {}
    skipped: dict[str, int] = {}
    seen: set[int] = set()
    duplicates = 0
    for res in results:
        for row in res.rows:
            cid = str(row["chip_id"])
            if cid in rows or cid in skipped:
                duplicates += 1
                continue
            rows[cid] = row
            seen.add(int(row["chip_index"]))  # type: ignore[call-overload]
        for index, cid in res.skipped:
            if cid in rows or cid in skipped:
                duplicates += 1
                continue
            skipped[cid] = index
            seen.add(index)
    missing = sorted(set(range(n_chips)) - seen)
    if missing or len(seen) != n_chips:
        raise IngestError(
            f"the distributed run returned {len(seen)} of {n_chips} chips (first missing chip index: "
            f"{missing[0] if missing else '?'}); rerun, and check the workers' logs"
        )
    ordered = sorted(rows.values(), key=lambda r: int(r["chip_index"]))  # type: ignore[call-overload]
    return MergedChips(ordered, [cid for cid, _ in sorted(skipped.items(), key=lambda kv: kv[1])], duplicates)


@contextmanager
def dask_client(workers: int | None = None, scheduler: str | None = None) -> Iterator[Any]:
    """A connected ``distributed.Client``, closed (with its cluster, if it made one) on exit.

    On ``scheduler`` (an address such as ``tcp://host:8786``), or on a ``LocalCluster`` of ``workers``
    single-threaded worker processes on this machine.
    """
    from distributed import Client, LocalCluster

    with _quiet_distributed(), _client(workers, scheduler, Client, LocalCluster) as client:
        yield client


@contextmanager
def _quiet_distributed() -> Iterator[None]:
    """Show distributed's INFO lines (every worker start, every task cancel) only at DEBUG (-vv)."""
    logger = logging.getLogger("distributed")
    old = logger.level
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(old)


@contextmanager
def _client(workers: int | None, scheduler: str | None, Client: Any, LocalCluster: Any) -> Iterator[Any]:  # noqa: N803
    if scheduler is not None and workers is not None:
        raise IngestError("pass either --scheduler (a running cluster) or --workers (a local one), not both")
    if scheduler is not None:
        _check_reachable(scheduler)
        try:
            client = Client(scheduler, timeout="30s")
        except OSError as exc:
            raise IngestError(f"cannot reach the dask scheduler at {scheduler} ({exc}); is it running?") from exc
        try:
            yield client
        finally:
            client.close()
        return
    n = workers if workers is not None else 1
    if n < 1:
        raise IngestError(f"--workers must be at least 1, not {n}")
    with LocalCluster(
        n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=logging.ERROR
    ) as cluster, Client(cluster) as client:
        yield client


def _check_reachable(address: str) -> None:
    """Fail at once when nothing listens at a ``tcp://host:port`` address (the client would retry for 30 s)."""
    if not address.startswith("tcp://"):
        return
    host, _, port = address[len("tcp://") :].rstrip("/").rpartition(":")
    if not port.isdigit():
        raise IngestError(f"{address}: not a scheduler address; expected tcp://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as exc:
        raise IngestError(f"cannot reach the dask scheduler at {address} ({exc}); is it running?") from exc


def _validate_one(path: RasterPath) -> int:
    return validate_files([path], progress=False)


def validate_distributed(client: Any, paths: Sequence[RasterPath]) -> int:
    """Validate every file on the workers (a task per file); the first damaged file raises its IngestError."""
    # the paths themselves (a remote address or a STAC item's VRT travels whole; its str() only names it)
    futures = client.map(_validate_one, list(paths), pure=False)
    try:
        return int(sum(client.gather(futures)))
    except BaseException:
        client.cancel(futures)
        raise


def distributed_chips(
    stream: ChipStream, client: Any, on_task_done: Callable[[int, int], None] | None = None,
    tasks_per_thread: int = TASKS_PER_THREAD,
) -> MergedChips:
    """Read every chip of ``stream`` on the cluster behind ``client``; return the merged index rows.

    Args:
        stream: the chip grid (its stack, chip size, stride, edge, skip rule).
        client: a connected ``distributed.Client``.
        on_task_done: called as ``on_task_done(done, total)`` in this process after each task's
            result arrives (progress bars; tests use it to kill a worker mid-run).
        tasks_per_thread: tasks per worker thread (see :data:`TASKS_PER_THREAD`).

    """
    from distributed import as_completed

    threads = sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values()) or 1
    groups = stream.groups()
    batches = split_tasks(groups, threads * tasks_per_thread)
    edge = Edge(stream.edge).value
    run = uuid.uuid4().hex[:12]
    futures = [
        client.submit(chip_task, stream.stack, stream.chip_size, stream.stride, edge, batch, stream.skip_empty,
                      pure=False, key=f"agrivlm-chips-{run}-{k}")
        for k, batch in enumerate(batches)
    ]
    results: list[TaskResult] = []
    try:
        for done, future in enumerate(as_completed(futures, loop=client.loop), start=1):
            results.append(future.result())
            future.release()
            if on_task_done is not None:
                on_task_done(done, len(futures))
    except BaseException:
        client.cancel(futures)
        raise
    merged = merge_results(results, len(stream))
    if merged.duplicates:
        log.warning("%d chip row(s) came back twice (a task ran again after a worker was lost); kept one each",
                    merged.duplicates)
    stream.kept, stream.skipped, stream.skipped_ids = len(merged.rows), len(merged.skipped_ids), merged.skipped_ids
    return merged

