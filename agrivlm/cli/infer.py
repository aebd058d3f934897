"""The ``agrivlm infer`` command (registered in :mod:`agrivlm.cli`); heavy imports happen inside it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from agrivlm.cli.options import AssetsOpt, JsonFlag, MaskAssetsOpt, MaskValuesOpt, print_json, split_list
from agrivlm.default_checkpoint import resolve_model
from agrivlm.schema import prediction_format_problem

#: The choices of --task and --dtype (usage errors, exit 2); the same as agrivlm.infer.prompts.TASKS and
#: agrivlm.infer.generate.DTYPES (a test keeps them equal; spelled out here so the CLI starts without torch).
TaskChoice = Literal["fields", "growth", "ask"]
DtypeChoice = Literal["float32", "bfloat16", "float16"]


def _out_format(value: Path) -> Path:
    """``--out``: a usage error (exit 2) unless its suffix is one of :data:`agrivlm.schema.PREDICTION_FORMATS`."""
    problem = prediction_format_problem(value)
    if problem is not None:
        raise typer.BadParameter(problem)
    return value


def infer(
    inputs: Annotated[list[str], typer.Argument(
        help="Stacks: each INPUT is one stack (a folder, a glob or a file of GeoTIFFs, one file per date; a remote "
        "file: https://, s3://, gs://, /vsicurl/…; a STAC JSON with --assets).")],
    model: Annotated[str, typer.Option(
        "--model", "-m", help="Checkpoint folder (save_pretrained of model and processor), or `default` for "
        "the checkpoint shipped in the package.")],
    out: Annotated[Path, typer.Option(
        "--out", "-o", callback=_out_format,
        help="Predictions: .gpkg | .parquet (GeoParquet 1.1) | .fgb (FlatGeobuf) | .geojson (RFC 7946, reprojected "
             "to EPSG:4326); journal and report beside.")],
    task: Annotated[TaskChoice, typer.Option(
        help="fields (outlines of fields) | growth (stage per field and date) | ask.")] = "fields",
    masks: Annotated[list[str] | None, typer.Option(
        "--masks", help="Per-date cloud masks of each stack (cloud = non-zero), one --masks per INPUT.")] = None,
    question: Annotated[str | None, typer.Option(help="--task ask: the question asked about every chip.")] = None,
    fields: Annotated[Path | None, typer.Option(
        help="--task growth: field polygons (GPKG/GeoJSON, any CRS) whose growth stages to predict.")] = None,
    field_id: Annotated[str | None, typer.Option(
        help="Id column of --fields (default: field_id, id or index; else the row number).")] = None,
    field_class: Annotated[str | None, typer.Option(
        help="Land-use class column of --fields, used in the questions (\"the grassland parcel at …\").")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N | mps.")] = "auto",
    dtype: Annotated[DtypeChoice, typer.Option(help="Model dtype: float32 | bfloat16 | float16.")] = "float32",
    batch_size: Annotated[int, typer.Option(help="Questions per generation batch (chips are batched together).")] = 8,
    max_new_tokens: Annotated[int | None, typer.Option(
        help="Most tokens per answer (default: fields 512 — 12 outlines of 8 vertices —, growth 8, ask 64).")] = None,
    chip_size: Annotated[int | None, typer.Option(help="Chip size in px (default: the checkpoint's, else 32).")] = None,
    stride: Annotated[int | None, typer.Option(help="Chip stride in px (default: the checkpoint's, else 16).")] = None,
    preset: Annotated[str | None, typer.Option(
        help="Band preset (agrivlm.pipeline.bands.PRESETS: ndvi, sentinel2_l2a, …); default: the checkpoint's.")] = (
        None),
    composite: Annotated[str | None, typer.Option(help="False-colour composite for a 3-channel model.")] = None,
    max_frames: Annotated[int | None, typer.Option(
        help="Most frames per chip (default: the checkpoint's, else 16).")] = None,
    min_frames: Annotated[int | None, typer.Option(help="Fewest usable frames a chip needs (default 4).")] = None,
    nms_iou: Annotated[float, typer.Option(
        help="NMS across overlapping chips: drop a detection whose IoU (map units) with a better one is above.")] = (
        0.5),
    min_score: Annotated[float, typer.Option(help="Drop detections scored below this.")] = 0.0,
    validate: Annotated[bool, typer.Option(help="Read every block of every file of a stack before its chips.")] = True,
    restart: Annotated[bool, typer.Option(help="Discard the journal of an earlier run and start over.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output that has no journal.")] = False,
    threads: Annotated[int | None, typer.Option(
        help="torch CPU threads of this process, or of each worker with --workers/--scheduler.")] = None,
    workers: Annotated[int | None, typer.Option(
        help="Run on a local dask cluster of N single-threaded worker processes.")] = None,
    scheduler: Annotated[str | None, typer.Option(
        help="Run on a running dask.distributed scheduler, e.g. tcp://host:8786 (workers must see the stacks and "
             "the checkpoint at the same paths).")] = None,
    chips_per_task: Annotated[int, typer.Option(
        help="Chips per task (reading order); a batch never spans two tasks, so one process and a cluster give "
             "the same answers.")] = 64,
    progress: Annotated[bool, typer.Option(help="Show a progress bar (chips/s).")] = True,
    as_json: JsonFlag = False,
    assets: AssetsOpt = None,
    mask_assets: MaskAssetsOpt = None,
    mask_values: MaskValuesOpt = None,
    raster: Annotated[bool, typer.Option(
        "--raster", help="Also write COGs on each stack's grid: <stem>_extent.tif (fields: the best field score "
        "per pixel) or <stem>_stages.tif (growth: one band per date, stage codes 1-5).")] = False,
) -> None:
    """Run a checkpoint over stacks: chips → batched generation → fields / growth stages in map coordinates.

    Resumable: finished chips go to a journal beside --out; killed and restarted with the same options, the run
    redoes no finished chip. A stack with a bad file is reported by name and skipped; the exit status is then 1.
    """
    from agrivlm.infer.batch import run_inference

    on_cluster = workers is not None or scheduler is not None
    if threads is not None and not on_cluster:  # on a cluster the threads are the workers'
        import torch

        torch.set_num_threads(threads)
    overrides: dict[str, Any] = {
        "chip_size": chip_size, "stride": stride, "bands.preset": preset, "bands.composite": composite,
        "frames.max_frames": max_frames, "min_frames": min_frames,
    }
    report = run_inference(
        inputs, resolve_model(model), out, task=task, masks=masks, question=question, fields=fields,  # type: ignore[arg-type]
        field_id=field_id, field_class=field_class, batch_size=batch_size, max_new_tokens=max_new_tokens,
        device=device, dtype=dtype, overrides=overrides, validate=validate, nms_iou=nms_iou, min_score=min_score,
        restart=restart, overwrite=overwrite, progress=progress and not as_json, chips_per_task=chips_per_task,
        workers=workers, scheduler=scheduler, threads=threads if on_cluster else None, raster=raster,
        assets=split_list(assets, "--assets"), mask_assets=split_list(mask_assets, "--mask-assets"),
        mask_values=split_list(mask_values, "--mask-values", int),
    )
    if as_json:
        print_json(report.to_dict())
    else:
        print_report(report)
    if report.failed:
        for s in report.failed:
            typer.echo(f"error: stack {s.name} failed: {s.message}", err=True)
        raise typer.Exit(1)


def print_report(report: Any) -> None:
    """A summary table of a :class:`~agrivlm.infer.runner.RunReport`."""
    from rich.console import Console
    from rich.table import Table

    d = report.to_dict()
    table = Table(title=f"agrivlm infer {report.task}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    ok = [s for s in report.stacks if s.ok]
    table.add_row("stacks", f"{len(ok)} ok, {len(report.failed)} failed")
    table.add_row("chips", f"{d['chips_processed']} processed, {d['chips_resumed']} resumed from the journal, "
                           f"{d['chips_skipped']} skipped")
    for reason, n in sorted(d["skip_reasons"].items(), key=lambda kv: -kv[1])[:5]:
        table.add_row("  skipped", f"{n} × {reason}")
    table.add_row("answers", f"{d['questions']} ({d['unparsed_answers']} unparsed)")
    if report.task == "growth":
        table.add_row("stages", f"{d['stage_rows']} (field, day) rows, {d['features']} fields")
    else:
        table.add_row("features", f"{d['features']} (of {d['features_before_nms']} before NMS)")
    rate = d["chips_per_second"]
    where = f" on {d['workers']} workers" if d["workers"] else ""
    table.add_row("speed", f"{rate:.2f} chips/s{where} ({d['seconds']:.1f} s; generating {d['model_seconds']:.1f} s, "
                           f"reading/preparing chips {d['io_seconds']:.1f} s of which {d['starved_seconds']:.1f} s "
                           "not hidden behind the model)"
                  if rate is not None else "no chip processed")
    for what, path in d["outputs"].items():
        table.add_row(what, path)
    Console().print(table)
