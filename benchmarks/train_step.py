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

``--vs-bare``: the trainer against a bare accelerate loop on the same model, data and batch (the trainer's own
loader and module, then only forward, backward, clip, step), each in its own process, alternated over
``--rounds``; samples/s of each (wall clock over the measured steps) and the trainer's time broken down from its
log: the loader's wait (``data_time_s``), the steps (``step_time_s``), and the rest (logging, progress, the
seen-samples log), with a second trainer run that checkpoints every ``--save-every`` steps for the checkpoint
cost. Writes ``benchmarks/results/train_step_vs_bare.json`` + ``.png``.

    python benchmarks/train_step.py --vs-bare --sizes tiny --steps 40 --warmup 5
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


def child_env() -> dict[str, str]:
    """The environment of the subprocesses: this checkout first on ``PYTHONPATH``, any path already there kept."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def cli(*args: str, timeout: float = 3600) -> None:
    env = child_env()
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
            "mixed_precision": info.get("mixed_precision"),  # bf16 on a GPU that has it (train.mixed_precision auto)
        }
    return out


def bare_worker(config: Path, overrides_json: str, steps: int, warmup: int) -> None:
    """In its own process: the bare loop on the trainer's own loader and module; prints its timings as JSON."""
    from accelerate.utils import set_seed

    from agrivlm.train.config import load_stage_config
    from agrivlm.train.curriculum import build_stage_model
    from agrivlm.train.data import StackCache
    from agrivlm.train.trainer import _Run, _to_device

    cfg = load_stage_config(config, json.loads(overrides_json))
    run = _Run(cfg, resume=False, overwrite=True)
    acc = run._accelerator()  # the trainer's own accelerator, loader and module: only the loop differs
    set_seed(cfg.train.seed)
    sm = build_stage_model(cfg)
    stacks = StackCache()
    data = run._data(acc, sm, stacks)
    module, optimizer, _ = run._prepared_module(acc, sm)
    params = [q for q in module.parameters() if q.requires_grad]
    module.train()
    marks, samples = [], 0
    it = iter(data.loader)
    while len(marks) < warmup + steps:
        try:
            batch = next(it)
        except StopIteration:
            it = iter(data.loader)
            continue
        samples += len(batch.pop("sample_ids"))
        batch = _to_device(batch, acc.device)
        losses = module(batch)
        acc.backward(losses["loss"])
        if cfg.optim.max_grad_norm > 0:
            acc.clip_grad_norm_(params, cfg.optim.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        marks.append((time.perf_counter(), samples))
    stacks.close()
    (t0, s0), (t1, s1) = marks[warmup - 1], marks[-1]
    print(json.dumps({"samples_per_s": (s1 - s0) / (t1 - t0), "seconds": t1 - t0, "samples": s1 - s0}))


def trainer_run(config: str, common: dict[str, object], run: Path, args: argparse.Namespace,
                save_every: int) -> dict[str, float]:
    """``agrivlm train`` for warmup + steps; samples/s from the log's wall clock and its time broken down."""
    cli("train", "stage2", "--config", config, "--overwrite",
        *sets({**common, "output_dir": str(run), "train.max_steps": args.warmup + args.steps,
               "train.save_every": save_every}))
    rows = [r for r in read_metrics(run) if "loss" in r]
    first, measured = rows[args.warmup - 1], rows[args.warmup:]
    wall = measured[-1]["wall_s"] - first["wall_s"]
    data = sum(r["data_time_s"] for r in measured)
    step = sum(r["step_time_s"] for r in measured)
    return {"samples_per_s": (measured[-1]["samples"] - first["samples"]) / wall, "seconds": wall,
            "data_s": data, "step_s": step, "other_s": wall - data - step}


def vs_bare(data: Path, work: Path, args: argparse.Namespace) -> dict[str, object]:
    """The trainer (with and without checkpoints) and the bare loop, alternated over ``args.rounds``."""
    common: dict[str, object] = {"data.roots": [str(data)], "train.batch_size": args.batch, "train.progress": False,
                                 "train.eval_every": -1, "data.frames.num_frames": args.frames}
    if args.threads:
        common["train.torch_threads"] = args.threads
    size = args.sizes.split(",")[0].strip()
    s1 = work / f"{size}_stage1"
    model = {f"model.overrides.{k}": v for k, v in SIZES[size].items()}
    cli("train", "stage1", "--config", "configs/stage1.yaml", "--overwrite",
        *sets({**common, **model, "output_dir": str(s1), "train.max_steps": 1}))
    common["model.init_from"] = str(s1 / "final")
    config = "configs/stage2.yaml"
    bare_over = {**common, "output_dir": str(work / "bare"), "train.max_steps": args.warmup + args.steps,
                 "train.save_every": 0}
    env = child_env()
    rounds: dict[str, list[dict[str, float]]] = {"trainer": [], "trainer_ckpt": [], "bare": []}
    for r in range(args.rounds):
        rounds["trainer"].append(trainer_run(config, common, work / f"t{r}", args, save_every=0))
        rounds["trainer_ckpt"].append(trainer_run(config, common, work / f"c{r}", args, save_every=args.save_every))
        res = subprocess.run([sys.executable, __file__, "--bare-worker", config, json.dumps(bare_over),
                              str(args.steps), str(args.warmup)], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=3600)
        if res.returncode != 0:
            raise SystemExit(f"bare loop failed:\n{res.stderr[-4000:]}")
        rounds["bare"].append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"round {r + 1}/{args.rounds}: trainer {rounds['trainer'][-1]['samples_per_s']:.1f}, bare "
              f"{rounds['bare'][-1]['samples_per_s']:.1f} samples/s", file=sys.stderr)
    med = {k: {key: statistics.median(x[key] for x in v) for key in v[0]} for k, v in rounds.items()}
    saves = args.steps // args.save_every if args.save_every else 0
    ckpt_s = (med["trainer_ckpt"]["other_s"] - med["trainer"]["other_s"]) / max(saves, 1)
    return {"size": size, "rounds": rounds, "median": med, "checkpoint_s_each": ckpt_s, "saves": saves,
            "ratio_trainer_to_bare": med["trainer"]["samples_per_s"] / med["bare"]["samples_per_s"]}


def report_vs_bare(res: dict[str, object], args: argparse.Namespace, png: Path) -> None:
    med: dict[str, dict[str, float]] = res["median"]  # type: ignore[assignment]
    b = med["bare"]
    print(f"\ntrainer vs bare accelerate loop: {res['size']} model, stage 2, batch {args.batch} x {args.frames} "
          f"frames, {args.steps} steps after {args.warmup}, median of {args.rounds} alternated rounds")
    print(f"{'run':<22} {'samples/s':>10} {'x bare':>7} {'data s':>8} {'step s':>8} {'other s':>8}")
    print(f"{'bare loop':<22} {b['samples_per_s']:10.2f} {1.0:7.3f}")
    for name, label in (("trainer", "trainer"), ("trainer_ckpt", f"trainer, ckpt/{args.save_every} steps")):
        r = med[name]
        print(f"{label:<22} {r['samples_per_s']:10.2f} {r['samples_per_s'] / b['samples_per_s']:7.3f} "
              f"{r['data_s']:8.2f} {r['step_s']:8.2f} {r['other_s']:8.2f}")
    print(f"one checkpoint: {res['checkpoint_s_each']:.3f} s; trainer / bare: {res['ratio_trainer_to_bare']:.3f} "
          f"(target >= 0.90)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    names = ["trainer", "trainer_ckpt"]
    parts = [("data_s", "data (loader wait)"), ("step_s", "steps"), ("other_s", "logging and the rest")]
    left = [0.0] * len(names)
    for key, label in parts:
        vals = [med[n][key] for n in names]
        ax.barh(names, vals, left=left, label=label)
        left = [a + v for a, v in zip(left, vals, strict=True)]
    ax.axvline(b["seconds"], color="k", ls="--", label="bare loop, same steps")
    ax.set_xlabel("seconds over the measured steps")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    print(f"wrote {png}")


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
    ap.add_argument("--out", type=Path, default=None, help="JSON (default: results/train_step[_vs_bare].json)")
    ap.add_argument("--vs-bare", action="store_true", help="the trainer against a bare accelerate loop")
    ap.add_argument("--rounds", type=int, default=2, help="--vs-bare: alternated rounds (median)")
    ap.add_argument("--save-every", type=int, default=10, help="--vs-bare: checkpoint interval of the second run")
    if len(sys.argv) > 1 and sys.argv[1] == "--bare-worker":
        bare_worker(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return
    args = ap.parse_args()
    results_dir = ROOT / "benchmarks" / "results"
    if args.vs_bare:
        with tempfile.TemporaryDirectory(prefix="agrivlm_vs_bare_") as tmp:
            work = Path(tmp)
            data = args.data or work / "data"
            if args.data is None:
                cli("recipe", "build", "--recipe", "tests/recipes/curriculum_tiny.yaml", "--out", str(data),
                    "--no-progress")
            res = vs_bare(data, work, args)
        out = args.out or results_dir / "train_step_vs_bare.json"
        report_vs_bare(res, args, out.with_suffix(".png"))
        out.write_text(json.dumps({**res, "batch": args.batch, "frames": args.frames, "steps": args.steps,
                                   "warmup": args.warmup, "threads": args.threads,
                                   "machine": {"python": platform.python_version(), "torch": torch.__version__,
                                               "platform": platform.platform(), "cpus": os.cpu_count()}},
                                  indent=2))
        print(f"wrote {out}")
        return
    args.out = args.out or results_dir / "train_step.json"
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
