"""Stage-2 training step: tokens/s and peak memory, tiny vs small (~100M) model, with and without reconstruction.

Every number comes from the real trainer: for each size a one-step stage 1 makes the starting folder, then
``agrivlm train stage2`` runs in its own process (so each run's peak memory is its own) twice — without and
with the auxiliary next-frame reconstruction loss (``configs/stage2.yaml`` settings: 128-wide, 3-layer
predictor, frozen teacher) — on real records of the embedded sample (``tests/recipes/curriculum_tiny.yaml``,
built once unless ``--data`` points at a recipe output). The trainer logs each step's compute time,
non-padding tokens/s and peak memory (CUDA: ``max_memory_allocated``; CPU: the process's peak RSS); the
first ``--warmup`` steps are dropped and the median of the rest is reported, with the ratios
with/without reconstruction and small/tiny printed side by side.

    python benchmarks/train_step.py                       # tiny and small, 8 + 2 steps each
    python benchmarks/train_step.py --sizes tiny --steps 4 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from agrivlm.train.logs import read_metrics

ROOT = Path(__file__).resolve().parents[1]
#: Model-YAML overrides of each size (the tiny one is configs/model/tiny.yaml as shipped).
SIZES: dict[str, dict[str, object]] = {
    "tiny": {},
    # ~100M parameters: SigLIP 384 wide x 6 layers, Qwen2 768 wide x 14 layers (GQA 12/4 heads)
    "small": {
        "vision.hidden_size": 384, "vision.intermediate_size": 1536, "vision.num_layers": 6, "vision.num_heads": 6,
        "llm.hidden_size": 768, "llm.intermediate_size": 2048, "llm.num_layers": 14, "llm.num_heads": 12,
        "llm.num_kv_heads": 4,
    },
}


def cli(*args: str, timeout: float = 3600) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "agrivlm.cli", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=timeout)
    if res.returncode != 0:
        raise SystemExit(f"agrivlm {' '.join(args[:3])} failed:\n{res.stderr[-4000:]}")


def sets(pairs: dict[str, object]) -> list[str]:
    out: list[str] = []
    for key, value in pairs.items():
        out += ["--set", f"{key}={json.dumps(value)}"]
    return out


def measure(size: str, data: Path, work: Path, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    common = {"data.roots": [str(data)], "train.batch_size": args.batch, "train.progress": False,
              "train.eval_every": -1, "train.save_every": 0, "data.frames.num_frames": args.frames}
    if args.threads:
        common["train.torch_threads"] = args.threads
    s1 = work / f"{size}_stage1"
    model = {f"model.overrides.{k}": v for k, v in SIZES[size].items()}
    cli("train", "stage1", "--config", "configs/stage1.yaml", "--overwrite",
        *sets({**common, **model, "output_dir": str(s1), "train.max_steps": 1}))
    out: dict[str, dict[str, float]] = {}
    for recon in (False, True):
        run = work / f"{size}_stage2_{'recon' if recon else 'plain'}"
        cli("train", "stage2", "--config", "configs/stage2.yaml", "--overwrite",
            *sets({**common, "output_dir": str(run), "model.init_from": str(s1 / "final"),
                   "train.max_steps": args.warmup + args.steps, "reconstruction.enabled": recon}))
        rows = read_metrics(run)
        rows = [r for r in rows if "loss" in r][args.warmup:]
        info = json.loads((run / "final" / "stage_info.json").read_text())
        out["recon" if recon else "plain"] = {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
            "step_time_s": statistics.median(r["step_time_s"] for r in rows),
            "peak_mem_mib": max(r["peak_mem_mib"] for r in rows),
            "parameters_m": sum(p.numel() for p in _params(run / "final")) / 1e6,
            "trainable_m": sum(info["trainable_parameters"].values()) / 1e6 + info["predictor_parameters"] / 1e6,
            "loss": rows[-1]["loss"],
        }
    return out


def _params(folder: Path) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    return list(load_file(folder / "model.safetensors").values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,small", help="comma-separated: tiny, small")
    ap.add_argument("--steps", type=int, default=8, help="measured optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="steps dropped before measuring")
    ap.add_argument("--batch", type=int, default=4, help="samples per step")
    ap.add_argument("--frames", type=int, default=4, help="frames per sample")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--data", type=Path, default=None, help="a recipe output (default: build curriculum_tiny)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train_step.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="agrivlm_train_step_") as tmp:
        work = Path(tmp)
        data = args.data
        if data is None:
            data = work / "data"
            recipe = "tests/recipes/curriculum_tiny.yaml"
            cli("recipe", "build", "--recipe", recipe, "--out", str(data), "--no-progress")
        results = {}
        for size in args.sizes.split(","):
            t0 = time.perf_counter()
            results[size] = measure(size.strip(), data, work, args)
            print(f"{size}: measured in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    device = f"CUDA {torch.cuda.get_device_name()}" if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    mem = "peak CUDA allocated" if torch.cuda.is_available() else "peak process RSS"
    print(f"\nstage-2 step, batch {args.batch} x {args.frames} frames, median of {args.steps} steps "
          f"after {args.warmup}; {device}, threads {args.threads or torch.get_num_threads()}; memory = {mem}")
    print(f"{'size':<6} {'params':>8} {'variant':<8} {'tokens/s':>10} {'step s':>8} {'memory MiB':>11}")
    for size, res in results.items():
        for variant, r in res.items():
            print(f"{size:<6} {r['parameters_m']:7.1f}M {variant:<8} {r['tokens_per_s']:10.0f} "
                  f"{r['step_time_s']:8.3f} {r['peak_mem_mib']:11.0f}")
    print("\nratios (with reconstruction / without):")
    for size, res in results.items():
        print(f"  {size:<6} tokens/s x{res['recon']['tokens_per_s'] / res['plain']['tokens_per_s']:.3f}   "
              f"memory x{res['recon']['peak_mem_mib'] / res['plain']['peak_mem_mib']:.3f}")
    if "tiny" in results and "small" in results:
        print("ratios (small / tiny):")
        for variant in ("plain", "recon"):
            s, t = results["small"][variant], results["tiny"][variant]
            print(f"  {variant:<6} tokens/s x{s['tokens_per_s'] / t['tokens_per_s']:.3f}   "
                  f"memory x{s['peak_mem_mib'] / t['peak_mem_mib']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"results": results, "batch": args.batch, "frames": args.frames, "steps": args.steps,
              "warmup": args.warmup, "threads": args.threads, "device": device, "memory": mem,
              "machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "platform": platform.platform()}}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
