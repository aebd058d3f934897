"""``agrivlm ingest`` as a function: stack → validation → chip stream → chip index + summary."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import geopandas as gpd
from tqdm.auto import tqdm

from agrivlm.errors import IngestError
from agrivlm.geo.chips import ChipStream, Edge
from agrivlm.geo.grid import CHIP_SIZE
from agrivlm.geo.index import build_chip_index, check_index_format, rows_frame, write_frame_to
from agrivlm.geo.rasters import RasterPath
from agrivlm.geo.stack import Inputs, SameDay, open_stack
from agrivlm.geo.validate import validate_files
from agrivlm.io import atomic_unit, ensure_writable_dir, recover_folder

log = logging.getLogger(__name__)


def ingest(
    inputs: Inputs,
    out_dir: str | os.PathLike[str],
    *,
    chip_size: int = CHIP_SIZE,
    stride: int | None = None,
    masks: Inputs | None = None,
    dates: Mapping[str, object] | None = None,
    same_day: SameDay = "keep",
    edge: Edge | str = Edge.SNAP,
    index_format: str = "gpkg",
    validate: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    workers: int | None = None,
    scheduler: str | None = None,
    assets: Sequence[str] | None = None,
    mask_assets: Sequence[str] | None = None,
    mask_values: Iterable[int] | None = None,
) -> dict[str, Any]:
    """Ingest a stack and write ``OUT/chips.<format>`` and ``OUT/summary.json``; return the summary.

    Nothing is written until the stack has opened, every file has been validated (``validate``)
    and every chip has been read; both outputs are then written into a hidden folder in ``OUT`` and replaced
    together as one unit (:func:`~agrivlm.io.atomic_unit`). A run first finishes or removes what a
    killed run left in ``OUT`` (:func:`~agrivlm.io.recover_folder`), and refuses only a complete
    earlier result (a summary with its index) without ``overwrite``.

    With ``scheduler`` (a running dask.distributed scheduler's address) or ``workers`` (a
    ``LocalCluster`` of that many processes here), validation and chip reading run as tasks on the
    cluster (:mod:`agrivlm.geo.distributed`); the outputs are the same as in one process.

    ``inputs`` may be remote files or a STAC JSON (``assets``, ``mask_assets``: :func:`~agrivlm.geo.open_stack`).

    Raises:
        IngestError: bad inputs (naming the file), or outputs that exist without ``overwrite``.

    """
    started = time.time()
    out = Path(out_dir)
    index_path = out / f"chips.{index_format.lstrip('.')}"
    summary_path = out / "summary.json"
    check_index_format(index_path)
    _check_out(out, index_path, summary_path, overwrite, started)
    ensure_writable_dir(out, IngestError)
    stack = open_stack(inputs, masks=masks, dates=dates, same_day=same_day, assets=assets, mask_assets=mask_assets,
                       mask_values=mask_values)
    stream = ChipStream(stack, chip_size=chip_size, stride=stride, edge=edge)
    frame = _chip_index(stream, validate, progress, workers, scheduler)
    summary = _summary(stream, chip_size, stride, edge, index_path)
    with atomic_unit(out) as unit:
        write_frame_to(frame, unit / index_path.name, index_path.stem)
        write_summary(unit / summary_path.name, summary)
    return summary


def _chip_index(
    stream: ChipStream, validate: bool, progress: bool, workers: int | None, scheduler: str | None
) -> gpd.GeoDataFrame:
    """Validate the stack's data and mask files (``validate``) and read every chip: here or on a cluster."""
    stack = stream.stack
    mask_files = [m.path for step in stack.steps for m in step.masks if m is not None]
    if workers is not None or scheduler is not None:
        return _distributed_index(stream, stack.files + mask_files, validate, progress, workers, scheduler)
    if validate:
        validate_files(stack.files + mask_files, progress=progress)
    return build_chip_index(stream, progress=progress)


def _summary(stream: ChipStream, chip_size: int, stride: int | None, edge: Edge | str,
             index_path: Path) -> dict[str, Any]:
    """``summary.json``: the stack's description, the chipping settings and what the chip stream kept."""
    return {
        **stream.stack.summary(),
        "chip_size": chip_size,
        "stride": stride if stride is not None else chip_size,
        "edge": Edge(edge).value,
        "chips_total": len(stream),
        "chips_kept": stream.kept,
        "chips_skipped_nodata": stream.skipped,
        "skipped_chip_ids": sorted(stream.skipped_ids),  # ids sort in row-major order
        "index": str(index_path),
    }


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    """Write ``summary.json`` (inside the unit's temporary folder)."""
    path.write_text(json.dumps(summary, indent=2))


def _check_out(out: Path, index_path: Path, summary_path: Path, overwrite: bool, started: float) -> None:
    """Clean up after killed runs in ``out``, then refuse a complete earlier result unless ``overwrite``.

    Raises:
        IngestError: ``out`` is not a folder, or it holds a summary and its index and ``overwrite`` is off.

    """
    if out.exists() and not out.is_dir():
        raise IngestError(f"{out}: not a folder; pass --out with a folder for the chip index and summary.json")
    try:
        found = recover_folder(out, before=started)
    except OSError as exc:
        raise IngestError(f"{out}: cannot clean up after an earlier run ({exc.strerror or exc})") from exc
    if found:
        log.warning("%s: finished or removed what an interrupted run left: %s", out, ", ".join(found))
    if overwrite:
        return
    if summary_path.is_file() and (index_path.exists() or _summary_index(summary_path).exists()):
        raise IngestError(f"{summary_path}: already exists; pass --overwrite to replace it")
    for p in (index_path, summary_path):
        if p.exists():
            log.warning("%s: left by an interrupted run (no complete index and summary beside it); replacing it", p)


def _summary_index(summary_path: Path) -> Path:
    """The index a ``summary.json`` names, in its folder (a path that does not exist when unreadable)."""
    try:
        name = Path(str(json.loads(summary_path.read_text()).get("index") or "")).name
    except (OSError, ValueError, AttributeError):
        name = ""
    return summary_path.parent / name if name else summary_path.with_suffix(".none")


def _distributed_index(
    stream: ChipStream, files: list[RasterPath], validate: bool, progress: bool, workers: int | None,
    scheduler: str | None,
) -> gpd.GeoDataFrame:
    """Validation and the chip index on a dask cluster (see :mod:`agrivlm.geo.distributed`)."""
    from agrivlm.geo.distributed import dask_client, distributed_chips, validate_distributed

    with dask_client(workers, scheduler) as client:
        if validate:
            validate_distributed(client, files)
        bar = tqdm(total=len(stream), desc="chips", unit="chip", disable=not progress)
        done_chips = 0

        def advance(done: int, total: int) -> None:
            nonlocal done_chips
            target = len(stream) * done // total
            bar.update(target - done_chips)
            done_chips = target

        try:
            merged = distributed_chips(stream, client, on_task_done=advance)
        finally:
            bar.close()
    return rows_frame(merged.rows, stream.stack.crs)
