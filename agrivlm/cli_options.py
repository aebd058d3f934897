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


def print_json(summary: dict[str, Any]) -> None:
    """``summary`` as one line of strict JSON on standard output.

    Values go through ``agrivlm.eval.common.json_safe`` (NaN → null, numpy scalars → Python), the rest through
    ``str``.
    """
    from agrivlm.eval.common import json_safe

    sys.stdout.write(json.dumps(json_safe(summary), default=str, allow_nan=False) + "\n")
    sys.stdout.flush()
