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


# The options of `agrivlm infer`, declared here so that the command's signature is a list of names (in the order
# --help lists them); their defaults stay in the signature.
InputsArg = Annotated[list[str], typer.Argument(
    help="Stacks: each INPUT is one stack (a folder, a glob or a file of GeoTIFFs, one file per date; a remote "
    "file: https://, s3://, gs://, /vsicurl/…; a STAC JSON with --assets).")]
ModelOpt = Annotated[str, typer.Option(
    "--model", "-m", help="Checkpoint folder (save_pretrained of model and processor), or `default` for "
    "the checkpoint shipped in the package.")]
OutOpt = Annotated[Path, typer.Option(
    "--out", "-o", callback=_out_format,
    help="Predictions: .gpkg | .parquet (GeoParquet 1.1) | .fgb (FlatGeobuf) | .geojson (RFC 7946, reprojected "
         "to EPSG:4326); journal and report beside.")]
TaskOpt = Annotated[TaskChoice, typer.Option(
    help="fields (outlines of fields) | growth (stage per field and date) | ask.")]
MasksOpt = Annotated[list[str] | None, typer.Option(
    "--masks", help="Per-date cloud masks of each stack (cloud = non-zero), one --masks per INPUT.")]
QuestionOpt = Annotated[str | None, typer.Option(help="--task ask: the question asked about every chip.")]
FieldsOpt = Annotated[Path | None, typer.Option(
    help="--task growth: field polygons (GPKG/GeoJSON, any CRS) whose growth stages to predict.")]
FieldIdOpt = Annotated[str | None, typer.Option(
    help="Id column of --fields (default: field_id, id or index; else the row number).")]
FieldClassOpt = Annotated[str | None, typer.Option(
    help="Land-use class column of --fields, used in the questions (\"the grassland parcel at …\").")]
DeviceOpt = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N | mps.")]
DtypeOpt = Annotated[DtypeChoice, typer.Option(help="Model dtype: float32 | bfloat16 | float16.")]
BatchSizeOpt = Annotated[int, typer.Option(
    min=1,
    help="Questions per generation batch: chips are batched together until it is reached; one chip's questions "
         "are never split (36 point prompts are one batch).")]
MaxBatchOpt = Annotated[int | None, typer.Option(
    min=1,
    help="Questions per generation at most (a memory cap): a batch's whole chips are then generated in parts of "
         "this many. Default: no cap.")]
MaxNewTokensOpt = Annotated[int | None, typer.Option(
    min=1,
    help="Most tokens per answer (default: fields 512 — 12 outlines of 8 vertices —, growth 8, ask 64).")]
# input settings that win over the checkpoint's (agrivlm.pipeline.inputs.InputConfig)
ChipSizeOpt = Annotated[int | None, typer.Option(min=1, help="Chip size in px (default: the checkpoint's, else 32).")]
StrideOpt = Annotated[int | None, typer.Option(min=1, help="Chip stride in px (default: the checkpoint's, else 16).")]
PresetOpt = Annotated[str | None, typer.Option(
    help="Band preset (agrivlm.pipeline.bands.PRESETS: ndvi, sentinel2_l2a, …); default: the checkpoint's.")]
CompositeOpt = Annotated[str | None, typer.Option(help="False-colour composite for a 3-channel model.")]
MaxFramesOpt = Annotated[int | None, typer.Option(
    min=1, help="Most frames per chip (default: the checkpoint's, else 16).")]
MinFramesOpt = Annotated[int | None, typer.Option(min=1, help="Fewest usable frames a chip needs (default 4).")]
# the outputs, resuming, and where the model runs
NmsIouOpt = Annotated[float, typer.Option(
    min=0.0, max=1.0,
    help="NMS across overlapping chips: drop a detection whose IoU (map units) with a better one is above.")]
MinScoreOpt = Annotated[float, typer.Option(help="Drop detections scored below this.")]
ValidateOpt = Annotated[bool, typer.Option(help="Read every block of every file of a stack before its chips.")]
RestartOpt = Annotated[bool, typer.Option(help="Discard the journal of an earlier run and start over.")]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace an existing output that has no journal.")]
ThreadsOpt = Annotated[int | None, typer.Option(
    min=1,
    help="torch CPU threads of this process, or of each worker with --workers/--scheduler.")]
WorkersOpt = Annotated[int | None, typer.Option(
    min=1,
    help="Run on a local dask cluster of N single-threaded worker processes.")]
SchedulerOpt = Annotated[str | None, typer.Option(
    help="Run on a running dask.distributed scheduler, e.g. tcp://host:8786 (workers must see the stacks and "
         "the checkpoint at the same paths).")]
ChipsPerTaskOpt = Annotated[int, typer.Option(
    min=1,
    help="Chips per task (reading order); a batch never spans two tasks, so one process and a cluster give "
         "the same answers.")]
ProgressOpt = Annotated[bool, typer.Option(help="Show a progress bar (chips/s).")]
RasterOpt = Annotated[bool, typer.Option(
    "--raster", help="Also write COGs on each stack's grid: <stem>_extent.tif (fields: the best field score "
    "per pixel) or <stem>_stages.tif (growth: one band per date, stage codes 1-5).")]


def infer(
    inputs: InputsArg, model: ModelOpt, out: OutOpt, task: TaskOpt = "fields", masks: MasksOpt = None,
    question: QuestionOpt = None, fields: FieldsOpt = None, field_id: FieldIdOpt = None,
    field_class: FieldClassOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "float32",
    batch_size: BatchSizeOpt = 8, max_new_tokens: MaxNewTokensOpt = None, chip_size: ChipSizeOpt = None,
    stride: StrideOpt = None, preset: PresetOpt = None, composite: CompositeOpt = None,
    max_frames: MaxFramesOpt = None, min_frames: MinFramesOpt = None, nms_iou: NmsIouOpt = 0.5,
    min_score: MinScoreOpt = 0.0, validate: ValidateOpt = True, restart: RestartOpt = False,
    overwrite: OverwriteOpt = False, threads: ThreadsOpt = None, workers: WorkersOpt = None,
    scheduler: SchedulerOpt = None, chips_per_task: ChipsPerTaskOpt = 64, progress: ProgressOpt = True,
    as_json: JsonFlag = False, assets: AssetsOpt = None, mask_assets: MaskAssetsOpt = None,
    mask_values: MaskValuesOpt = None, raster: RasterOpt = False, max_batch: MaxBatchOpt = None,
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
        mask_values=split_list(mask_values, "--mask-values", int), max_batch=max_batch,
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
