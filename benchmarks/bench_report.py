"""What every benchmark script does with its report: JSON and PNG into ``benchmarks/results/`` (or ``--out``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def save_report(report: dict[str, Any], out: Path, stem: str, plot: Callable[[dict[str, Any], Path], None]) -> None:
    """Write ``<out>/<stem>.json`` and ``<out>/<stem>.png`` (drawn by ``plot``) and say so."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out / f"{stem}.png")
    print(f"wrote {out / f'{stem}.json'} and {out / f'{stem}.png'} ({report['elapsed_s']:.0f} s)")
