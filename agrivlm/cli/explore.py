"""The ``agrivlm explore`` command (registered in :mod:`agrivlm.cli`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from agrivlm.cli.options import AssetsOpt, MaskAssetsOpt, split_list
from agrivlm.default_checkpoint import resolve_model
from agrivlm.explore.launch import launch, streamlit_command
from agrivlm.explore.settings import ExploreSettings
from agrivlm.geo.grid import CHIP_SIZE

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def explore(
    stack: Annotated[list[str] | None, typer.Option(
        "--stack", help="Stack GeoTIFFs: folder, glob or files (repeatable); remote files (https://, s3://, "
        "/vsicurl/…) or a STAC JSON with --assets.")] = None,
    masks: Annotated[list[str] | None, typer.Option(
        "--masks", help="Per-date cloud masks (cloud = non-zero), matched to the stack by date.")] = None,
    predictions: Annotated[list[Path] | None, typer.Option(
        "--predictions",
        help="Predicted fields (GPKG/GeoJSON with chip_id, task, score, tokens) and/or growth-stage CSVs.")] = None,
    truth: Annotated[list[Path] | None, typer.Option(
        "--truth",
        help="True fields (e.g. a parcel register) and/or growth-stage CSVs (field_id, date, stage).")] = None,
    truth_id: Annotated[str | None, typer.Option(
        help="Id column of the true fields (default: the first unique of field_id, RABA_ID, index).")] = None,
    model: Annotated[str | None, typer.Option(
        "--model", help="Trained checkpoint for the question box (`default`: the one shipped in the package).")] = None,
    tiles: Annotated[str | None, typer.Option(
        help="Basemap: an XYZ tile URL template or a style JSON URL (default: none, works offline).")] = None,
    band: Annotated[list[str] | None, typer.Option(
        "--band", help="Band role ROLE=BAND (name or 1-based number), e.g. red=B04, nir=8.")] = None,
    chip_size: Annotated[int, typer.Option(min=1, help="Chip size in pixels (as for ingest).")] = CHIP_SIZE,
    stride: Annotated[int | None, typer.Option(min=1, help="Chip stride in pixels (default: chip size).")] = None,
    sample: Annotated[bool, typer.Option(
        "--sample", help="Explore the embedded sample (its stack, cloud masks and parcels).")] = False,
    host: Annotated[str, typer.Option(
        help="Address to listen on; anything but 127.0.0.1 exposes the app to other machines.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8501,
    assets: AssetsOpt = None,
    mask_assets: MaskAssetsOpt = None,
    print_command: Annotated[bool, typer.Option(
        "--print-command", help="Print the streamlit command line and exit.")] = False,
) -> None:
    """Start the field explorer (a local web map): stack overlay by date, predicted and true fields, NDVI curves."""
    stacks, mask_paths, truths = list(stack or []), list(masks or []), [str(p) for p in truth or []]
    if sample:
        from agrivlm.sample import sample_cloud_mask_dir, sample_ndvi_dir, sample_parcels

        if not stacks:
            stacks = [str(sample_ndvi_dir())]
            mask_paths = mask_paths or [str(sample_cloud_mask_dir())]
        truths = [str(sample_parcels()), *truths]  # extra --truth files (e.g. stage tables) come on top
    if not stacks:
        raise typer.BadParameter("give the stack to explore (--stack PATH), or --sample", param_hint="--stack")
    settings = ExploreSettings(
        stack=tuple(stacks), masks=tuple(mask_paths), predictions=tuple(str(p) for p in predictions or []),
        truth=tuple(truths), truth_id=truth_id, model=str(resolve_model(model)) if model is not None else None,
        tiles=tiles,
        chip_size=chip_size, stride=stride, bands=tuple(band or []),
        assets=tuple(split_list(assets, "--assets") or ()),
        mask_assets=tuple(split_list(mask_assets, "--mask-assets") or ()),
    )
    if print_command:
        typer.echo(" ".join(streamlit_command(settings, host=host, port=port)))
        return
    if host not in _LOOPBACK:
        typer.echo(f"warning: --host {host} exposes the explorer to other machines", err=True)
    shown = "localhost" if host in _LOOPBACK[:2] else host
    typer.echo(f"field explorer on http://{shown}:{port} (Ctrl-C stops it)", err=True)
    raise typer.Exit(launch(settings, host=host, port=port))
