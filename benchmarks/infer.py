"""`agrivlm infer` throughput: chips/s by batch size, with and without the KV cache, and where the time goes.

One checkpoint (the tiny model as built, saved once: its random weights answer with junk that runs to
``--max-new-tokens``, so every configuration generates the same number of tokens per chip) runs
``--task fields`` over the embedded Sentinel-2 sample: 32-px chips at ``--stride`` (8 by default: 100
overlapping chips, so batch 32 fills three batches), up to ``--max-frames`` clear frames each. Every
configuration (batch size × KV cache on/off) runs through the real ``run_inference`` — chip reading and
preparation in the prefetch thread, generation, journal, outputs — and the configurations alternate,
in reversed order every other round, over ``--reps`` rounds so that drift in machine load hits them all;
the table gives medians.

Per configuration it prints chips/s of the chip loop, the speed-up over the first batch size with the cache
on, and the shares of the loop's wall time spent

* generating (``model``),
* reading, masking, preparing and encoding chips in the prefetch thread (``I/O``; runs while the model
  generates, so ``model`` + ``I/O`` may pass 100 %),
* with the model waiting for chips (``waiting``: the reading that was not hidden behind generation).

    python benchmarks/infer.py                                  # batch 1/8/32 x cache on/off, 2 rounds
    python benchmarks/infer.py --batch-sizes 1,4,16 --reps 3 --threads 1

Writes ``benchmarks/results/infer.json`` and ``infer.png``.
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


def configurations(sizes: list[int], caches: list[bool], rep: int) -> list[tuple[int, bool]]:
    """The run order of one round: every (batch size, cache) pair, reversed every other round."""
    order = [(b, c) for c in caches for b in sizes]
    return order if rep % 2 == 0 else order[::-1]


def name(batch: int, cache: bool) -> str:
    """A configuration's key in the JSON."""
    return f"batch {batch}, cache {'on' if cache else 'off'}"


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from agrivlm.infer.batch import run_inference
    from agrivlm.infer.generate import Predictor
    from agrivlm.model import build_model
    from agrivlm.pipeline.inputs import BandConfig, InputConfig, default_frames, save_input_config
    from agrivlm.sample import sample_cloud_mask_dir, sample_ndvi_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    caches = [{"on": True, "off": False}[c.strip()] for c in args.cache.split(",")]
    t_start = time.perf_counter()
    runs: dict[str, list[dict[str, float]]] = {name(b, c): [] for c in caches for b in sizes}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        model, processor = build_model()
        model.save_pretrained(ckpt)
        processor.save_pretrained(ckpt)
        save_input_config(InputConfig(stride=args.stride, min_frames=1,
                                      frames=default_frames().model_copy(update={"max_frames": args.max_frames}),
                                      bands=BandConfig(preset="ndvi", low=[-0.2], high=[1.0])), ckpt)
        predictor = Predictor.load(ckpt, device=args.device, max_new_tokens=args.max_new_tokens)
        for rep in range(args.reps):
            for b, cache in configurations(sizes, caches, rep):
                predictor.use_cache = cache
                out = Path(tmp) / f"run_{b}_{int(cache)}_{rep}" / "pred.gpkg"
                report = run_inference([str(sample_ndvi_dir())], ckpt, out, masks=[str(sample_cloud_mask_dir())],
                                       batch_size=b, max_new_tokens=args.max_new_tokens, progress=False,
                                       predictor=predictor)
                row = {"chips": report.processed, "seconds": report.seconds, "chips_per_s": report.chips_per_second,
                       "model_share": report.model_seconds / report.seconds,
                       "io_share": report.io_seconds / report.seconds,
                       "waiting_share": report.starved_seconds / report.seconds}
                runs[name(b, cache)].append(row)
                print(f"  round {rep + 1}/{args.reps} {name(b, cache):22s} {row['chips_per_s']:7.2f} chips/s",
                      flush=True)
    base_key = name(sizes[0], caches[0])
    base = statistics.median(r["chips_per_s"] for r in runs[base_key])
    table = {}
    for key, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("chips_per_s", "model_share", "io_share",
                                                                  "waiting_share")}
        table[key] = {**med, "speedup": med["chips_per_s"] / base, "runs": rs}
    if True in caches and False in caches:  # what the cache buys at each batch size
        for b in sizes:
            table[name(b, True)]["x_cache_off"] = (table[name(b, True)]["chips_per_s"]
                                                   / table[name(b, False)]["chips_per_s"])
    return {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "device": str(predictor.device),
                    "note": "shared machine: medians of alternated runs"},
        "params": {k: v if not isinstance(v, Path) else str(v) for k, v in vars(args).items()},
        "chips": runs[base_key][0]["chips"],
        "baseline": base_key,
        "configurations": table,
        "elapsed_s": time.perf_counter() - t_start,
    }


def print_table(report: dict[str, Any]) -> None:
    p, m = report["params"], report["machine"]
    print(f"\n{report['chips']} chips of 32 px (stride {p['stride']}), up to {p['max_frames']} frames, "
          f"{p['max_new_tokens']} new tokens each; {m['device']}, {m['torch_threads']} torch thread(s), "
          f"{m['cores']} cores")
    print(f"{'configuration':24s} {'chips/s':>8s} {'x base':>7s} {'x no cache':>10s} {'model':>6s} {'I/O':>6s} "
          f"{'waiting':>8s}")
    for key, row in report["configurations"].items():
        nc = f"{row['x_cache_off']:.2f}" if "x_cache_off" in row else ""
        print(f"{key:24s} {row['chips_per_s']:8.2f} {row['speedup']:7.2f} {nc:>10s} {row['model_share']:6.1%} "
              f"{row['io_share']:6.1%} {row['waiting_share']:8.1%}")
    print(f"(x base: vs {report['baseline']}; model/I/O/waiting: shares of the loop's wall time, "
          "I/O overlaps the model)")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["configurations"]
    keys = list(rows)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.8))
    colors = ["tab:green" if key.endswith("on") else "tab:gray" for key in keys]
    ax1.bar(range(len(keys)), [rows[k]["chips_per_s"] for k in keys], color=colors)
    for i, k in enumerate(keys):
        for r in rows[k]["runs"]:
            ax1.plot(i, r["chips_per_s"], "k.", ms=4)
    ax1.set_xticks(range(len(keys)), [k.replace(", ", "\n") for k in keys], fontsize=8)
    ax1.set_ylabel("chips / s (bars: median, dots: runs)")
    ax1.set_title("throughput")
    model = [rows[k]["model_share"] for k in keys]
    waiting = [rows[k]["waiting_share"] for k in keys]
    other = [max(0.0, 1 - a - b) for a, b in zip(model, waiting, strict=True)]
    ax2.bar(range(len(keys)), model, label="generating", color="tab:blue")
    ax2.bar(range(len(keys)), waiting, bottom=model, label="waiting for chips", color="tab:red")
    ax2.bar(range(len(keys)), other, bottom=[a + b for a, b in zip(model, waiting, strict=True)],
            label="journal, outputs, rest", color="tab:olive")
    ax2.plot(range(len(keys)), [rows[k]["io_share"] for k in keys], "kD", ms=5,
             label="reading + preparing (overlapped)")
    ax2.set_xticks(range(len(keys)), [k.replace(", ", "\n") for k in keys], fontsize=8)
    ax2.set_ylabel("share of the chip loop's wall time")
    ax2.set_title("where the time goes")
    ax2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    p, m = report["params"], report["machine"]
    fig.suptitle(f"agrivlm infer, tiny model: {report['chips']} chips, {p['max_new_tokens']} new tokens, "
                 f"{m['torch_threads']} torch threads on {m['cores']} cores ({m['device']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--cache", default="on,off", help="KV cache settings to compare: on,off | on | off")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-frames", type=int, default=8)
    parser.add_argument("--stride", type=int, default=8, help="chip grid stride in px (8: 100 chips, 16: 36)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    report = measure(args)
    print_table(report)
    save_report(report, args.out, "infer", plot)
    return report


if __name__ == "__main__":
    main()
