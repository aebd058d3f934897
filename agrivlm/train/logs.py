"""Training logs: every logged step to JSONL and CSV, and to accelerate's experiment trackers; loss curves to PNG.

The trackers (``train.report_to``: TensorBoard, Weights & Biases, MLflow, ...) are accelerate's
(``Accelerator(log_with=...)``, ``init_trackers``, ``log``): :func:`check_trackers` refuses one whose package is
not installed, :func:`tracker_config` is the run's config as their hyperparameters, and :class:`TrainLog` sends
every row it writes to them as well.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

from agrivlm.errors import ConfigError

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

#: For each tracker of ``train.report_to``: the modules that provide it (any one will do) and how to install it.
TRACKER_PACKAGES: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "tensorboardX"), "pip install 'agrivlm[track]' (or pip install tensorboard)"),
    "wandb": (("wandb",), "pip install wandb"),
    "mlflow": (("mlflow",), "pip install mlflow"),
    "comet_ml": (("comet_ml",), "pip install comet-ml"),
    "aim": (("aim",), "pip install aim"),
    "clearml": (("clearml",), "pip install clearml"),
    "dvclive": (("dvclive",), "pip install dvclive"),
    "swanlab": (("swanlab",), "pip install swanlab"),
    "trackio": (("trackio",), "pip install trackio"),
}
#: The project name the trackers get (``init_trackers``): TensorBoard writes under ``<output_dir>/logs/agrivlm``.
TRACKER_PROJECT = "agrivlm"

#: Sends one logged row to the trackers: ``(metrics, step)``.
RowSink = Callable[[dict[str, float], int], None]


def check_trackers(names: Sequence[str]) -> list[str]:
    """The trackers of ``train.report_to``, each once, in order; a :class:`ConfigError` for one not installed.

    accelerate itself would leave a tracker whose package is missing out without a word (a debug log line).

    Raises:
        ConfigError: naming the tracker, its package and the command that installs it.
    """
    from accelerate.tracking import get_available_trackers

    usable = {str(t) for t in get_available_trackers()}
    out = list(dict.fromkeys(names))
    for name in out:
        if name not in TRACKER_PACKAGES:
            raise ConfigError(f"train.report_to: unknown tracker {name!r}; use one of {', '.join(TRACKER_PACKAGES)}")
        modules, install = TRACKER_PACKAGES[name]
        if not any(_importable(m) for m in modules) or name not in usable:
            raise ConfigError(
                f"train.report_to: {name} needs the {modules[0]} package, which is not installed; {install}, "
                f"or remove {name} from train.report_to"
            )
    return out


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing; a module without a spec
        return False


def tracker_config(config: dict[str, Any]) -> dict[str, bool | int | float | str]:
    """A nested config (``StageConfig.model_dump(mode="json")``) as tracker hyperparameters.

    Dotted keys (``optim.lr``), values kept when ``bool``/``int``/``float``/``str``, anything else (lists, None,
    empty sections) as its JSON text: what every tracker accepts (TensorBoard's ``add_hparams`` takes no nested or
    list values).
    """
    out: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update({f"{key}.{k}": v for k, v in tracker_config(value).items()})
        elif isinstance(value, (bool, int, float, str)):
            out[key] = value
        else:
            out[key] = json.dumps(value, sort_keys=True)
    return out


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    """Every row of a training run's ``logs/metrics.jsonl`` (``run``: the stage's output folder).

    Raises:
        FileNotFoundError: the run has no metrics log.
    """
    return _rows(Path(run) / "logs" / "metrics.jsonl")


class TrainLog:
    """Append-only metrics log of one run (survives resume: rows past the resumed step are dropped).

    Every row also goes to ``sink`` when one is given (the trainer's: accelerate's trackers, ``Accelerator.log``).
    """

    def __init__(self, out_dir: str | Path, resume_step: int | None = None, sink: RowSink | None = None) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.dir / "metrics.jsonl"
        if resume_step is not None and self.jsonl.exists():
            kept = [r for r in self.read() if int(r["step"]) <= resume_step]
            self.jsonl.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        elif resume_step is None and self.jsonl.exists():
            self.jsonl.unlink()
        self.sink = sink

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record the metrics of one optimizer step."""
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with self.jsonl.open("a") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
        if self.sink is not None:
            self.sink({k: float(v) for k, v in metrics.items()}, step)

    def read(self) -> list[dict[str, Any]]:
        """All rows logged so far."""
        return _rows(self.jsonl) if self.jsonl.exists() else []

    def close(self) -> None:
        """Write ``metrics.csv``."""
        rows = self.read()
        keys = sorted({k for r in rows for k in r} - {"step"})
        with (self.dir / "metrics.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["step", *keys])
            writer.writeheader()
            writer.writerows(rows)


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
