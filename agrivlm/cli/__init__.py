"""The ``agrivlm`` command line: ingest, quickstart, explore, infer, synth, eval, recipe, train.

The top floor of the package (``DESIGN.md``): each subcommand lives in its own module here and calls the
floors below; the options they share are declared once in :mod:`agrivlm.cli.options`.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.table import Table

from agrivlm.cli.eval import app as eval_app
from agrivlm.cli.explore import explore as _explore
from agrivlm.cli.infer import infer as _infer
from agrivlm.cli.options import AssetsOpt, JsonFlag, MaskAssetsOpt, MaskValuesOpt, print_json, split_list
from agrivlm.cli.recipe import recipe_app
from agrivlm.cli.synth import synth as _synth
from agrivlm.cli.train import train_app
from agrivlm.errors import AgriVLMError
from agrivlm.geo.grid import CHIP_SIZE

app = typer.Typer(
    name="agrivlm",
    help="Satellite GeoTIFF stacks → fields and crop growth stages with a LAPE vision-language model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _parse_dates(items: list[str] | None) -> dict[str, str] | None:
    if not items:
        return None
    mapping = {}
    for item in items:
        if "=" not in item:
            raise typer.BadParameter(f"{item!r}: expected FILE=YYYY-MM-DD", param_hint="--date")
        name, value = item.split("=", 1)
        mapping[name.strip()] = value.strip()
    return mapping


def print_summary(summary: dict[str, object], title: str = "stack") -> None:
    """Print an ingest summary as a table."""
    dates = summary["dates"]
    assert isinstance(dates, list)
    table = Table(title=title, show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    bounds = summary["bounds"]
    assert isinstance(bounds, list)
    table.add_row("dates", f"{summary['n_dates']}: {dates[0][:10]} → {dates[-1][:10]}")
    table.add_row(
        "size", f"{summary['n_bands']} band(s) {summary['band_names']} × {summary['height']} × {summary['width']} px"
    )
    table.add_row("CRS", str(summary["crs"]))
    table.add_row("bounds", ", ".join(f"{b:.2f}" for b in bounds))
    table.add_row("masks", "yes" if summary["has_masks"] else "no")
    table.add_row("warped files", str(len(summary["warped_files"])))  # type: ignore[arg-type]
    if "chips_kept" in summary:
        table.add_row(
            "chips",
            f"{summary['chips_kept']} kept, {summary['chips_skipped_nodata']} skipped (all nodata) "
            f"of {summary['chips_total']} ({summary['chip_size']} px, stride {summary['stride']})",
        )
        table.add_row("index", str(summary["index"]))
    Console().print(table)


def _version(value: bool) -> None:
    if value:
        from agrivlm import __version__

        typer.echo(f"agrivlm {__version__}")
        raise typer.Exit()


def _silence(ctx: typer.Context) -> None:
    """``-q``: standard output and error discarded while the command runs (progress bars, tables, summaries).

    The log handler (made before, on the real standard error) still shows errors, and agrivlm's own errors
    are printed by :func:`main` once the command has ended, as their one line.
    """
    saved = sys.stdout, sys.stderr
    sink = open(os.devnull, "w")  # noqa: SIM115 (closed when the command ends)
    sys.stdout = sys.stderr = sink

    def restore() -> None:
        sys.stdout, sys.stderr = saved
        sink.close()

    ctx.call_on_close(restore)


@app.callback()
def _root(
    ctx: typer.Context,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output.")] = 0,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help="Only errors: no progress bars, tables or summaries.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    _logging(verbose, quiet)
    if quiet:
        _silence(ctx)


app.add_typer(eval_app, name="eval")


@app.command()
def ingest(
    inputs: Annotated[list[str], typer.Argument(
        help="GeoTIFFs: folder(s), glob(s) or files, one file per date; remote files (https://, s3://, gs://, "
        "/vsicurl/…); or a STAC JSON (Item, ItemCollection, catalogue) with --assets.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for the chip index and summary.json.")],
    chip_size: Annotated[int, typer.Option(min=1, help="Chip size in pixels.")] = CHIP_SIZE,
    stride: Annotated[int | None, typer.Option(
        min=1, help="Step between chips in pixels (default: chip size).")] = None,
    masks: Annotated[list[str] | None, typer.Option("--masks", help="Per-date mask files (cloud = non-zero).")] = None,
    date: Annotated[list[str] | None, typer.Option("--date", help="FILE=YYYY-MM-DD, wins over tags/names.")] = None,
    same_day: Annotated[Literal["keep", "first", "mosaic"], typer.Option(
        help="Same-day acquisitions: keep | first | mosaic.")] = "keep",
    edge: Annotated[Literal["snap", "drop"], typer.Option(help="Remainder at the raster edge: snap | drop.")] = "snap",
    index_format: Annotated[Literal["gpkg", "parquet"], typer.Option(
        "--format", help="Chip index format: gpkg | parquet.")] = "gpkg",
    validate: Annotated[bool, typer.Option(help="Read every block of every file before writing anything.")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace existing outputs.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    as_json: JsonFlag = False,
    assets: AssetsOpt = None,
    mask_assets: MaskAssetsOpt = None,
    mask_values: MaskValuesOpt = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Run on a dask LocalCluster of N worker processes on this machine.")
    ] = None,
    scheduler: Annotated[
        str | None, typer.Option(help="Run on a running dask.distributed scheduler, e.g. tcp://host:8786.")
    ] = None,
) -> None:
    """Ingest a multitemporal GeoTIFF stack: validate it, chip it, write a chip index and a summary."""
    from agrivlm.geo.ingest import ingest as run_ingest

    summary = run_ingest(
        inputs,
        out,
        chip_size=chip_size,
        stride=stride,
        masks=masks or None,
        dates=_parse_dates(date),
        same_day=same_day,  # type: ignore[arg-type]
        edge=edge,
        index_format=index_format,
        validate=validate,
        overwrite=overwrite,
        progress=progress and not as_json,
        workers=workers,
        scheduler=scheduler,
        assets=split_list(assets, "--assets"),
        mask_assets=split_list(mask_assets, "--mask-assets"),
        mask_values=split_list(mask_values, "--mask-values", int),
    )
    if as_json:
        print_json(summary)
    else:
        print_summary(summary)


@app.command()
def quickstart(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("runs/quickstart"),
    steps: Annotated[int, typer.Option(
        min=1,
        help="Optimizer steps: of stage 3 from the default, or over the 3 stages from scratch (15/15/70 %).")] = 1000,
    stack: Annotated[str | None, typer.Option(
        help="Your GeoTIFF stack (folder/glob, or a STAC JSON with --assets); default: the sample.")] = None,
    masks: Annotated[str | None, typer.Option(help="Per-date cloud masks of --stack.")] = None,
    assets: AssetsOpt = None,
    mask_assets: MaskAssetsOpt = None,
    parcels: Annotated[str | None, typer.Option(
        "--truth", "--parcels", help="Your true field/parcel layer (any CRS); default: the sample's.")] = None,
    parcel_id: Annotated[str | None, typer.Option(
        "--truth-id", "--parcel-id", help="Unique id column of --truth (as in eval and explore).")] = None,
    parcel_class: Annotated[str | None, typer.Option(
        "--truth-class", "--parcel-class", help="Land-use class column of --truth.")] = None,
    preset: Annotated[str, typer.Option(help="Band preset of the stack (agrivlm.pipeline.bands.PRESETS).")] = "ndvi",
    base_model: Annotated[str | None, typer.Option(
        help="Folder with vision/ (SigLIP/CLIP) and llm/ (Qwen2/Llama) checkpoints to train stage 1 → 2 → 3 "
             "from (implies --start scratch).")] = None,
    start: Annotated[Literal["default", "scratch"] | None, typer.Option(
        help="default: fine-tune the shipped default checkpoint (stage 3); scratch: stage 1 → 2 → 3 of the tiny "
             "random model or of --base-model. Default: default, or scratch with --base-model.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of data and training.")] = 0,
    fresh: Annotated[bool, typer.Option(
        "--restart", "--fresh", help="Start over instead of resuming what --out holds (as infer --restart).")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress.")] = True,
) -> None:
    """The main job: ingest → instruction data → fine-tune the default checkpoint → infer → eval → report.html.

    On the embedded sample by default (Sentinel-2 NDVI, Slovenia, 68 dates, 88 parcels); scored on its
    held-out test blocks beside simple baselines; a second run resumes from what is done.
    """
    from agrivlm.quickstart import Quickstart, QuickstartOptions

    if (stack is None) != (parcels is None):
        raise typer.BadParameter("--stack and --truth go together (your own data needs both)")
    if start not in (None, "default", "scratch"):
        raise typer.BadParameter(f"--start must be default or scratch, got {start!r}")
    if base_model is not None and not all((Path(base_model) / d).is_dir() for d in ("vision", "llm")):
        raise typer.BadParameter(f"{base_model}: needs the subfolders vision/ and llm/ (local HF checkpoints)")
    given = {k: tuple(v) for k, v in (("assets", split_list(assets, "--assets")),
                                        ("mask_assets", split_list(mask_assets, "--mask-assets"))) if v}
    options = QuickstartOptions(steps=steps, stack=stack, masks=masks, parcels=parcels, parcel_id=parcel_id, **given,
                                parcel_class=parcel_class, preset=preset, base_model=base_model,
                                start=start or ("scratch" if base_model else "default"), seed=seed)
    report = Quickstart(out, options, progress=progress, echo=typer.echo).run(fresh=fresh)
    typer.echo(f"report: {report}  (open it in a browser; its last section has the explorer command)")


app.add_typer(recipe_app, name="recipe")
app.add_typer(train_app, name="train")
app.command("explore")(_explore)
app.command("infer")(_infer)
app.command("synth")(_synth)


def main() -> None:
    """Console entry point: agrivlm's own errors print one line and exit 1, never a traceback."""
    try:
        app()
    except AgriVLMError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted: finished outputs are kept, nothing half-written was left behind", err=True)
        sys.exit(130)
