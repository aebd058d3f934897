"""Training logs: every logged step to JSONL and CSV (and TensorBoard when installed); loss curves to PNG."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


class TrainLog:
    """Append-only metrics log of one run (survives resume: rows past the resumed step are dropped)."""

    def __init__(self, out_dir: str | Path, resume_step: int | None = None) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.dir / "metrics.jsonl"
        if resume_step is not None and self.jsonl.exists():
            kept = [r for r in self.read() if int(r["step"]) <= resume_step]
            self.jsonl.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        elif resume_step is None and self.jsonl.exists():
            self.jsonl.unlink()
        self._tb: Any = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tensorboard"))
        except ImportError:
            self._tb = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record the metrics of one optimizer step."""
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with self.jsonl.open("a") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, value, step)

    def read(self) -> list[dict[str, Any]]:
        """All rows logged so far."""
        if not self.jsonl.exists():
            return []
        return [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        """Write ``metrics.csv`` and flush TensorBoard."""
        rows = self.read()
        keys = sorted({k for r in rows for k in r} - {"step"})
        with (self.dir / "metrics.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["step", *keys])
            writer.writeheader()
            writer.writerows(rows)
        if self._tb is not None:
            self._tb.close()


def plot_losses(runs: dict[str, list[dict[str, Any]]], path: str | Path, keys: tuple[str, ...] = ()) -> Path:
    """Plot the loss curves of one or more runs (e.g. the three stages) side by side into a PNG.

    Args:
        runs: ``{label: rows}`` with rows as logged by :class:`TrainLog`.
        path: output PNG.
        keys: metric names to draw (default: every key containing "loss").
    """
    path = Path(path)
    fig, axes = plt.subplots(1, max(len(runs), 1), figsize=(5 * max(len(runs), 1), 3.6), squeeze=False)
    for ax, (label, rows) in zip(axes[0], runs.items(), strict=False):
        names = keys or tuple(sorted({k for r in rows for k in r if "loss" in k}))
        for name in names:
            pts = [(r["step"], r[name]) for r in rows if name in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=name, marker="." if len(pts) < 40 else None)
        ax.set_title(label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
