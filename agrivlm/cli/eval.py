"""``agrivlm eval fields|growth``: the evaluators on files, with a summary table and a report folder.

Heavy imports (geopandas, rasterio, matplotlib) happen inside the commands, so ``agrivlm --help`` stays fast.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from agrivlm.cli.options import JsonFlag, print_json

app = typer.Typer(
    name="eval",
    help="Score predictions against truth: field boundaries (IoU matching) and growth stages.",
    no_args_is_help=True,
)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


@app.command("fields")
def fields(
    pred: Annotated[Path, typer.Option("--pred", "-p", help="Predicted fields: GPKG/GeoJSON/GeoParquet, any CRS.")],
    truth: Annotated[Path, typer.Option("--truth", "-t", help="True fields: GPKG/GeoJSON/GeoParquet, any CRS.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder: summary.json, fields.csv, fields.png.")],
    extent: Annotated[
        Path | None, typer.Option("--extent", help="GeoTIFF whose grid defines the pixels of the pixel scores.")
    ] = None,
    boxes: Annotated[bool, typer.Option("--boxes", help="Compare bounding boxes of both layers.")] = False,
    iou_threshold: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="A match needs IoU strictly above this (FTW: 0.5).")] = 0.5,
    pred_id: Annotated[str | None, typer.Option(help="Id column of predictions (default: field_id/id/row).")] = None,
    truth_id: Annotated[str | None, typer.Option(help="Id column of the truth (default: field_id/id/row).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing report.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Field boundaries: Hungarian IoU matching, precision/recall/F1 at IoU > 0.5, map_50_95, mean IoU, pixel IoU."""
    from agrivlm.eval.common import FIELD_REPORT_FILES, check_outputs

    check_outputs(out, FIELD_REPORT_FILES, overwrite)  # before loading the geo stack: refuse fast
    from agrivlm.eval.boundaries import evaluate_fields, write_field_report

    result = evaluate_fields(
        pred, truth, iou_threshold=iou_threshold, boxes=boxes, extent=extent, pred_id=pred_id, truth_id=truth_id
    )
    write_field_report(result, out, overwrite=overwrite)
    if as_json:
        print_json({**result.to_dict(), "report": str(out)})
        return
    table = Table(title=f"fields: {result.n_pred} predicted vs {result.n_truth} true ({result.metric_crs})")
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    thr = f"{result.iou_threshold:g}"
    for name, value in (
        (f"precision @ IoU>{thr}", result.precision), (f"recall @ IoU>{thr}", result.recall),
        (f"F1 @ IoU>{thr}", result.f1), ("map_50_95 (mean TP/(TP+FP+FN))", result.map_50_95),
        ("F1 averaged 0.50:0.95", result.f1_50_95), ("mean IoU of matches", result.mean_iou),
        ("TP / FP / FN", f"{result.tp} / {result.fp} / {result.fn}"),
    ):
        table.add_row(name, _fmt(value))
    if result.pixel is not None:
        table.add_row("pixel IoU / precision / recall", " / ".join(
            _fmt(v, 3) for v in (result.pixel.iou, result.pixel.precision, result.pixel.recall)))
    Console().print(table)
    for note in result.notes:
        Console().print(f"[yellow]note:[/yellow] {note}")
    Console().print(f"report: {out}")


@app.command("growth")
def growth(
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder: summary.json, stages.csv, PNG, CSV.")],
    pred: Annotated[Path | None, typer.Option("--pred", "-p", help="Predicted stages (field_id, date, stage).")] = None,
    truth: Annotated[Path | None, typer.Option("--truth", "-t", help="True stages (field_id, date, stage).")] = None,
    pred_key_dates: Annotated[
        Path | None, typer.Option(help="Predicted key dates (field_id, season, green_up, peak, senescence).")
    ] = None,
    truth_key_dates: Annotated[
        Path | None, typer.Option(help="True key dates (field_id, season, green_up, peak, senescence).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing report.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Growth stages: accuracy, macro-F1, confusion matrix, temporal IoU of stage segments, key-date errors."""
    from agrivlm.eval.common import GROWTH_REPORT_FILES, check_outputs

    check_outputs(out, GROWTH_REPORT_FILES, overwrite)
    from agrivlm.eval.growth import evaluate_growth, write_growth_report

    result = evaluate_growth(pred, truth, pred_key_dates=pred_key_dates, truth_key_dates=truth_key_dates)
    write_growth_report(result, out, overwrite=overwrite)
    if as_json:
        print_json({**result.to_dict(), "report": str(out)})
        return
    console = Console()
    if result.stages is not None:
        s = result.stages
        table = Table(title=f"growth stages: {s.n_pairs} (field, date) pairs")
        table.add_column("metric", style="bold")
        table.add_column("value", justify="right")
        table.add_row("accuracy", _fmt(s.accuracy))
        table.add_row("macro-F1", _fmt(s.macro_f1))
        table.add_row("temporal IoU", _fmt(s.temporal_iou))
        table.add_row("missing / extra predictions", f"{s.n_missing} / {s.n_extra}")
        console.print(table)
    if result.key_dates is not None:
        table = Table(title="key dates: absolute error (days)")
        for col in ("key date", "mean", "median", "max", "compared", "missing", "extra"):
            table.add_column(col, justify="left" if col == "key date" else "right")
        for key, row in result.key_dates.per_key.items():
            table.add_row(key, _fmt(row["mean_abs_days"], 1), _fmt(row["median_abs_days"], 1),
                          _fmt(row["max_abs_days"], 1), str(row["n_compared"]), str(row["n_missing"]),
                          str(row["n_extra"]))
        console.print(table)
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    console.print(f"report: {out}")
