"""Options shared by the subcommands, declared once (``--json``).

``--json``: the command prints its summary as one JSON object on standard output and nothing else there (no
table, no progress bar), so scripts can read it (``agrivlm infer … --json | jq .features``); errors still go to
standard error as their one line, with exit status 1.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

#: The ``--json`` flag of ingest, infer and eval.
JsonFlag = Annotated[bool, typer.Option(
    "--json", help="Print the summary as one JSON object on standard output (no table, no progress bar).")]

#: STAC inputs (agrivlm.geo.stac): the assets that are the bands, and those of STAC masks.
AssetsOpt = Annotated[str | None, typer.Option(
    "--assets", help="STAC inputs (Item / ItemCollection / catalogue JSON): the assets that are the bands, in "
    "order, comma-separated (e.g. B04,B08; default: the items' one raster asset).")]
MaskAssetsOpt = Annotated[str | None, typer.Option(
    "--mask-assets", help="STAC masks: the mask asset (e.g. SCL, with --mask-values).")]
MaskValuesOpt = Annotated[str | None, typer.Option(
    "--mask-values", help="Mask values that mean masked, comma-separated (e.g. 3,8,9,10 for Sentinel-2 SCL "
    "cloud shadow, cloud, cirrus); default: any non-zero value.")]


def split_list(text: str | None, what: str, cast: type = str) -> list | None:  # type: ignore[type-arg]
    """``"B04,B08"`` → ``["B04", "B08"]`` (None stays None).

    Raises:
        typer.BadParameter: an empty item, or one ``cast`` refuses (a usage error, exit 2).
    """
    if text is None:
        return None
    items = [t.strip() for t in text.split(",")]
    if not all(items):
        raise typer.BadParameter(f"{what}: an empty item in {text!r}; give a comma-separated list")
    try:
        return [cast(t) for t in items]
    except ValueError as exc:
        raise typer.BadParameter(f"{what}: {exc}") from exc


def print_json(summary: dict[str, Any]) -> None:
    """``summary`` as one line of strict JSON on standard output.

    Values go through ``agrivlm.eval.common.json_safe`` (NaN → null, numpy scalars → Python), the rest through
    ``str``.
    """
    from agrivlm.eval.common import json_safe

    sys.stdout.write(json.dumps(json_safe(summary), default=str, allow_nan=False) + "\n")
    sys.stdout.flush()
