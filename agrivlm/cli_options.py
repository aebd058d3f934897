"""Options shared by the subcommands, declared once (``--json``).

``--json``: the command prints its summary as one JSON object on standard output and nothing else there (no
table, no progress bar), so scripts can read it (``agrivlm infer … --json | jq .features``); errors still go to
standard error as their one line, with exit status 1.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Annotated, Any

import typer

#: The ``--json`` flag of ingest, infer and eval.
JsonFlag = Annotated[bool, typer.Option(
    "--json", help="Print the summary as one JSON object on standard output (no table, no progress bar).")]


def _clean(value: Any) -> Any:
    """NaN/inf → null (JSON has neither), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def print_json(summary: dict[str, Any]) -> None:
    """``summary`` as one line of strict JSON on standard output (NaN → null, other values through ``str``)."""
    sys.stdout.write(json.dumps(_clean(summary), default=str, allow_nan=False) + "\n")
    sys.stdout.flush()
