"""`agrivlm infer` with the shipped checkpoint: what frame sharing and whole-chip generations buy.

The default checkpoint (``--model``, default the one in the package) asks the fields task at the 36 points of a
6 × 6 grid per chip, so one chip is 36 questions about the same frames; its answers end at EOS (a trained model,
unlike ``benchmarks/infer.py``'s random one), so a generation lasts as long as its longest answer. Three
configurations run through the real ``run_inference`` over the embedded Sentinel-2 sample (32-px chips,
``--stride`` 16: 36 chips), alternated over ``--reps`` rounds (reversed every other round), medians:

* ``as before``: every copy of a frame encoded (``model.share_repeated_frames = False``) and each batch
  generated in parts of at most ``--batch-size`` questions (``predictor.split_at``): 36 point questions at
  batch 32 were two generations, 32 + 4, the second as long as the first;
* ``frames shared``: a frame repeated in the batch goes through the vision encoder once;
* ``frames shared + whole chips``: and a chip's questions are one generation (today's ``agrivlm infer``).

The growth task (one timeline question per field and season, each seeing only its field's box: no repeated
frames) runs ``as before`` and as today at ``--growth-batch``, to show it did not get slower.

Per configuration: chips/s of the run (from opening the stack to the last batch journaled), the ratio to
``as before`` at the same batch size, and the share of the run's wall time spent generating (``model``; ``in loop``:
of the chip loop's, without opening, validating every block of and fingerprinting the stack) and waiting for chips
(``waiting``).

    python benchmarks/infer_default.py                  # batch 8 and 32, 2 rounds (about 3 minutes on 2 cores)

Writes ``benchmarks/results/infer_default.json`` and ``infer_default.png``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench_report import save_report  # noqa: E402  (beside this script)

#: name → (frames shared, whole chips)
CONFIGS: dict[str, tuple[bool, bool]] = {
    "as before": (False, False),
    "frames shared": (True, False),
    "frames shared + whole chips": (True, True),
}


def _row(report: Any) -> dict[str, float]:
    return {"chips": report.processed, "questions": report.questions, "seconds": report.seconds,
            "chips_per_s": report.chips_per_second, "model_share": report.model_seconds / report.seconds,
            "loop_model_share": report.model_seconds / report.loop_seconds,
            "waiting_share": report.starved_seconds / report.seconds}


def _runs(batches: list[int], growth_batch: int) -> list[tuple[str, int, str]]:
    """(task, batch, configuration) of one round."""
    order = [("fields", b, c) for b in batches for c in CONFIGS]
    return order + [("growth", growth_batch, c) for c in ("as before", "frames shared + whole chips")]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from agrivlm.default_checkpoint import default_model_path
    from agrivlm.infer.batch import run_inference
    from agrivlm.infer.generate import Predictor
    from agrivlm.sample import sample_cloud_mask_dir, sample_ndvi_dir, sample_parcels

    if args.threads:
        torch.set_num_threads(args.threads)
    model = Path(args.model) if args.model else default_model_path()
    predictor = Predictor.load(model)
    plan = _runs([int(b) for b in args.batch_sizes.split(",")], args.growth_batch)
    runs: dict[str, list[dict[str, float]]] = {f"{t}, batch {b}, {c}": [] for t, b, c in plan}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for task, batch, config in (plan if rep % 2 == 0 else plan[::-1]):
                shared, whole = CONFIGS[config]
                predictor.model.share_repeated_frames = shared
                predictor.split_at = None if whole else batch
                extra: dict[str, Any] = {"fields": str(sample_parcels())} if task == "growth" else {}
                report = run_inference([str(sample_ndvi_dir())], model, Path(tmp) / f"{task}_{rep}.gpkg", task=task,
                                       masks=[str(sample_cloud_mask_dir())], batch_size=batch, overwrite=True,
                                       restart=True, progress=False, predictor=predictor,
                                       overrides={"stride": args.stride}, **extra)
                key = f"{task}, batch {batch}, {config}"
                runs[key].append(_row(report))
                rate = runs[key][-1]["chips_per_s"]
                print(f"  round {rep + 1}/{args.reps} {key:45s} {rate:6.2f} chips/s", flush=True)
    table: dict[str, dict[str, Any]] = {}
    for key, rs in runs.items():
        table[key] = {k: statistics.median(r[k] for r in rs) for k in ("chips_per_s", "model_share", "loop_model_share",
                                                                       "waiting_share")}
        table[key].update(questions=rs[0]["questions"], chips=rs[0]["chips"], runs=rs)
        before = key.rsplit(", ", 1)[0] + ", as before"
        table[key]["x_before"] = table[key]["chips_per_s"] / table[before]["chips_per_s"] if before in table else None
    return {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
                    "note": "shared machine: medians of alternated runs"},
        "params": {k: str(v) for k, v in vars(args).items()},
        "model": str(model),
        "configurations": table,
        "elapsed_s": time.perf_counter() - t_start,
    }


def print_table(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(f"\n{report['model']} on the embedded sample; {m['torch_threads']} torch thread(s), {m['cores']} cores")
    print(f"{'configuration':45s} {'questions':>9s} {'chips/s':>8s} {'x before':>8s} {'model':>6s} {'in loop':>7s} "
          f"{'waiting':>8s}")
    for key, row in report["configurations"].items():
        print(f"{key:45s} {row['questions']:9d} {row['chips_per_s']:8.2f} {row['x_before']:8.2f} "
              f"{row['model_share']:6.1%} {row['loop_model_share']:7.1%} {row['waiting_share']:8.1%}")
    print("(model: share of the run's wall time generating; in loop: of the chip loop's, without opening, validating "
          "and fingerprinting the stack)")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["configurations"]
    keys = list(rows)
    fig, ax = plt.subplots(figsize=(10, 4.6))
    colors = {"as before": "tab:gray", "frames shared": "tab:olive", "frames shared + whole chips": "tab:green"}
    ax.bar(range(len(keys)), [rows[k]["chips_per_s"] for k in keys],
           color=[colors[k.rsplit(", ", 1)[1]] for k in keys])
    for i, k in enumerate(keys):
        for r in rows[k]["runs"]:
            ax.plot(i, r["chips_per_s"], "k.", ms=4)
        ax.text(i, rows[k]["chips_per_s"], f"×{rows[k]['x_before']:.2f}\nmodel {rows[k]['model_share']:.0%}"
                f" ({rows[k]['loop_model_share']:.0%} of the loop)",
                ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(keys)), [k.replace(", ", "\n") for k in keys], fontsize=7)
    ax.set_ylabel("chips / s (bars: median, dots: runs)")
    m = report["machine"]
    ax.set_title(f"agrivlm infer, shipped checkpoint, embedded sample: {m['torch_threads']} torch threads on "
                 f"{m['cores']} cores ({m['date']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the shipped one)")
    parser.add_argument("--batch-sizes", default="8,32", help="fields task batch sizes")
    parser.add_argument("--growth-batch", type=int, default=32)
    parser.add_argument("--stride", type=int, default=16, help="chip grid stride in px (16: 36 chips of 32 px)")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    report = measure(args)
    print_table(report)
    save_report(report, args.out, "infer_default", plot)
    return report


if __name__ == "__main__":
    main()
