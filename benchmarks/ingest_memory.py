"""Peak memory of ingesting a big stack end to end, and that it does not grow with the stack.

Writes (once, reused afterwards) a ``--size`` × ``--size`` px × ``--dates`` stack of ``--bands``-band
int16 GeoTIFFs, tiled 512 px, ZSTD (level 1, PREDICTOR=2; the fastest compressed layout to write:
GDAL compresses with every core while the generator writes strip by strip), one file per date, to
``--data-dir``. The default is the issue's 10,000 × 10,000 px × 24 dates × 1 band: 4.8 GB of int16
once decoded (about 1.9 GB on disk, about a minute to write on 2 cores). Then runs ``agrivlm ingest``
(validation, the chip stream, the chip index) in a fresh process per stack and reads its peak RSS
(``VmHWM``) and an RSS trace (psutil, every 0.1 s). Also measured, the same way: a stack of a
quarter of the area (``--small-size``, default ``--size`` / 2), to show the peak does not follow the
stack's size, and the bare imports (the floor any agrivlm process starts from).

Run::

    python benchmarks/ingest_memory.py                        # 10,000² x 24 dates x 1 band
    python benchmarks/ingest_memory.py --size 4000 --bands 4  # smaller/faster, more bands

Writes ``benchmarks/results/ingest_memory.json`` and ``ingest_memory.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGET_GIB = 2.0


def peak_rss_mib() -> float:
    """This process's peak resident set (``VmHWM``), in MiB.

    Not ``ru_maxrss``: Linux carries the parent's resident size over ``fork``/``exec`` into it, so a
    child of a big parent would report the parent's size.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: the best there is


def child(stack_dir: str, out_dir: str, chip: int, validate: bool, imports_only: bool) -> None:
    """In the measured process: ingest, then print a JSON line with the peak RSS."""
    t0 = time.perf_counter()
    from agrivlm.geo.ingest import ingest

    summary: dict[str, Any] = {}
    if not imports_only:
        summary = ingest(stack_dir, out_dir, chip_size=chip, validate=validate, overwrite=True, progress=False)
    print(json.dumps({
        "peak_rss_mib": peak_rss_mib(), "wall_s": time.perf_counter() - t0,
        "chips": summary.get("chips_total", 0), "kept": summary.get("chips_kept", 0),
        "cpu_s": sum(os.times()[:2]),
    }))


def measure(stack_dir: Path | None, out_dir: Path, chip: int, validate: bool) -> dict[str, Any]:
    """Run :func:`child` in a fresh interpreter, sampling its RSS while it runs."""
    import psutil

    cmd = [sys.executable, __file__, "--child", str(stack_dir or ""), str(out_dir), str(chip),
           "1" if validate else "0", "1" if stack_dir is None else "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    ps = psutil.Process(proc.pid)
    trace: list[tuple[float, float]] = []
    t0 = time.perf_counter()
    while proc.poll() is None:
        try:
            trace.append((time.perf_counter() - t0, ps.memory_info().rss / 2**20))
        except psutil.Error:
            break
        time.sleep(0.1)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"ingest failed (exit {proc.returncode}):\n{err[-3000:]}")
    res = json.loads(out.strip().splitlines()[-1])
    res["trace"] = trace
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=10_000, help="raster height = width in px (default 10000)")
    ap.add_argument("--small-size", type=int, default=0, help="the comparison stack's size (default: --size / 2)")
    ap.add_argument("--dates", type=int, default=24, help="dates (files) per stack (default 24)")
    ap.add_argument("--bands", type=int, default=1, help="bands per file (default 1)")
    ap.add_argument("--chip-size", type=int, default=256, help="chip size in px (default 256)")
    ap.add_argument("--no-validate", action="store_true", help="skip ingest's read-every-block validation")
    ap.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "agrivlm_bench_memory",
                    help="generated stacks are kept here and reused")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        stack_dir, out_dir, chip, validate, imports_only = args.child
        child(stack_dir, out_dir, int(chip), validate == "1", imports_only == "1")
        return {}

    import synth

    small = args.small_size or args.size // 2
    decoded_gb = args.size**2 * args.dates * args.bands * 2 / 1e9
    args.data_dir.mkdir(parents=True, exist_ok=True)
    free_gb = shutil.disk_usage(args.data_dir).free / 1e9
    print(f"stack: {args.size}x{args.size} px x {args.dates} dates x {args.bands} band(s) int16 = "
          f"{decoded_gb:.2f} GB decoded; {free_gb:.0f} GB free in {args.data_dir}", flush=True)
    if free_gb < decoded_gb * 0.6 + 1:
        raise SystemExit(f"not enough disk in {args.data_dir}: pass --data-dir or a smaller --size")
    t0 = time.perf_counter()
    stacks = {size: synth.ensure_stacks(args.data_dir, ["tiled_zstd"], size, args.dates, args.bands,
                                        dtype="int16")["tiled_zstd"] for size in (small, args.size)}
    gen_s = time.perf_counter() - t0

    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs["imports only"] = measure(None, Path(tmp) / "none", args.chip_size, False)
        for size, paths in stacks.items():
            label = f"{size}x{size}"
            runs[label] = measure(paths[0].parent, Path(tmp) / label, args.chip_size, not args.no_validate)
            r = runs[label]
            print(f"  ingest {label:>12s}: peak RSS {r['peak_rss_mib']:7.0f} MiB, {r['chips']} chips, "
                  f"{r['wall_s']:.0f} s, {size**2 * args.dates * args.bands * 2 / 1e9 / r['wall_s'] * 1e3:.0f} "
                  f"MB/s decoded", flush=True)

    big, little = runs[f"{args.size}x{args.size}"], runs[f"{small}x{small}"]
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "ram_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
                    "python": platform.python_version(), "note": "shared machine, other jobs running"},
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"},
        "decoded_gb": decoded_gb,
        "generate_s": gen_s,
        "runs": runs,
        "peak_rss_gib": big["peak_rss_mib"] / 1024,
        "target_gib": TARGET_GIB,
        "peak_ratio_big_over_small": big["peak_rss_mib"] / little["peak_rss_mib"],
        "stack_ratio_big_over_small": (args.size / small) ** 2,
    }
    print(f"\npeak RSS ingesting {args.size}x{args.size} x {args.dates} x {args.bands} int16 "
          f"({decoded_gb:.2f} GB decoded): {report['peak_rss_gib']:.2f} GiB (target < {TARGET_GIB} GiB: "
          f"{'met' if report['peak_rss_gib'] < TARGET_GIB else 'NOT met'}); a stack "
          f"{report['stack_ratio_big_over_small']:.0f}x smaller peaks at {little['peak_rss_mib']:.0f} MiB "
          f"(ratio {report['peak_ratio_big_over_small']:.2f}); bare imports {runs['imports only']['peak_rss_mib']:.0f} "
          f"MiB; generating the stacks took {gen_s:.0f} s (0 when reused)")
    write_outputs(report, args.out)
    return report


def write_outputs(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    slim = {**report, "runs": {k: {kk: vv for kk, vv in v.items() if kk != "trace"} for k, v in report["runs"].items()}}
    (out / "ingest_memory.json").write_text(json.dumps(slim, indent=2))
    fig, ax = plt.subplots(figsize=(8, 4))
    for label, run in report["runs"].items():
        if run["trace"]:
            t, rss = zip(*run["trace"], strict=True)
            ax.plot(t, rss, label=f"{label} (peak {run['peak_rss_mib']:.0f} MiB)")
    ax.axhline(report["target_gib"] * 1024, color="r", ls="--", lw=0.8, label="target 2 GiB")
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS (MiB)")
    p = report["params"]
    ax.set_title(f"agrivlm ingest: {p['dates']} dates x {p['bands']} band int16, chip {p['chip_size']} px", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "ingest_memory.png", dpi=110)
    print(f"wrote {out / 'ingest_memory.json'} and {out / 'ingest_memory.png'}")


if __name__ == "__main__":
    main()
