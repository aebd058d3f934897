"""What each seed technique buys: the shipped recipe against the same recipe with one technique switched.

Every variant trains the curriculum of ``agrivlm train default`` (stage 1 → 2 → stage-3 focus → stage 3, the same
stage configs, through the real ``agrivlm train`` command) on the same data — ``agrivlm synth`` scenes of the
training regions plus the embedded sample's train blocks — for the same optimizer steps, once per seed, and is
scored on the held-out sets of ``benchmarks/learning.py`` (scenes of seeds ≥ 9000, the left-out ``corn_belt``
region, the sample's test blocks) by the same infer and eval code. Variants share the phases they do not change
(a stage-3-only switch trains on the shipped stage 2 of its seed).

Per variant and seed: held-out field F1@0.5, stage accuracy, median key-date errors, the final validation
position-token loss (teacher-forced, on the recipes' validation scenes); per variant the mean and spread (sample
standard deviation) over seeds, and the median step time and peak memory (``peak_mem_mib`` of the training log)
of its last phase, measured after all training, one variant at a time with nothing else running. Writes
``ablations.json`` and ``ablations.png`` into ``--out``; a killed run
resumes (finished phases and scores are kept in ``--work``).

The budget is far below the shipped checkpoint's (``--quick``: 840 steps of 8 samples, 8 scenes per region,
against 6,750 steps on 60 scenes): what a technique buys *early* in training on this data, which is what this
toolkit's users can afford to measure on theirs; the spread over seeds says which differences are larger than the
noise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import learning  # noqa: E402  (the held-out sets and scoring of benchmarks/learning.py)

from agrivlm import resources  # noqa: E402
from agrivlm.train.default import PHASES, DefaultTraining, build_data, make_scenes, phase_overrides  # noqa: E402
from agrivlm.train.logs import read_metrics  # noqa: E402

S2_ON = ("stage2", "stage3_focus", "stage3")
S3 = ("stage3_focus", "stage3")


@dataclass(frozen=True)
class Variant:
    """One technique switched against the shipped recipe."""

    name: str
    #: What is switched, in one line (the README's table).
    what: str
    #: Extra ``--set`` keys per phase.
    changes: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Phases left out (their steps go to the first phase kept, which builds the model from the model YAML).
    skip: tuple[str, ...] = ()


VARIANTS: tuple[Variant, ...] = (
    Variant("shipped", "the shipped recipe (LAPE with NTP and smart init, curriculum 1→2→3, box focus)"),
    Variant("lape_off", "LAPE off: position tokens are ordinary rows of the LLM's vocabulary (lape.enabled: false)",
            {p: {"lape.enabled": False} for p in S2_ON}),
    Variant("ntp_off", "LAPE without the NTP reparameterisation (lape.ntp: false)", {"stage2": {"lape.ntp": False}}),
    Variant("random_init", "LAPE tables drawn at random instead of from the LLM's statistics (lape.init: random)",
            {"stage2": {"lape.init": "random"}}),
    Variant("smooth_init", "LAPE tables with the LLM's statistics, rows smooth along each axis (lape.init: smooth)",
            {"stage2": {"lape.init": "smooth"}}),
    Variant("stage3_alone", "no curriculum: stage 3 alone from the model YAML, all steps in stage 3",
            skip=("stage1", "stage2")),
    Variant("reconstruction", "next-frame reconstruction loss on (reconstruction.enabled, weight 0.1) in stages 2-3",
            {p: {"reconstruction.enabled": True} for p in S2_ON}),
    Variant("fast_slow", "fast/slow frames (4 slow over the series + 4 most recent) instead of 8 random",
            {p: {"data.frames.sampler": "fast_slow", "data.frames.num_fast": 4, "data.frames.num_slow": 4,
                 "data.frames.slow_stride": 2} for p in S2_ON}),
    Variant("anyres", "AnyRes: a 16-px thumbnail + 2 x 2 tiles of 16 px per chip (data.anyres) in stages 2-3",
            {p: {"data.anyres": {"tile_size": 16, "max_tiles": 4}} for p in S2_ON}),
    Variant("multi_scale", "multi-scale frames: the chip and a half-size copy (data.scales: [1.0, 0.5]) in stages 2-3",
            {p: {"data.scales": [1.0, 0.5]} for p in S2_ON}),
    Variant("multi_scale_packed", "multi-scale frames (data.scales: [1.0, 0.5]) with NaViT-style packing of the two "
            "sizes into shared encoder sequences (vision.packing)",
            {"stage1": {"model.overrides": {"vision.packing": True}},
             **{p: {"data.scales": [1.0, 0.5]} for p in S2_ON}}),
    Variant("max_pool", "2-D max pooling of the patch grid instead of average (pooling.mode: max)",
            {"stage1": {"model.overrides": {"pooling.mode": "max"}}}),
    Variant("faster_video", "the faster-video stream: every 4th frame at the pooling stride, the others pooled 2x more "
            "coarsely, a separator after each frame (pooling.faster_video_stride: 4)",
            {"stage1": {"model.overrides": {"pooling.faster_video_stride": 4}}}),
    Variant("input_positions", "positions a question gives as -INPUT placeholders with exact values "
            "(data.question_positions: input)", {p: {"data.question_positions": "input"} for p in S2_ON}),
    Variant("llava_st_positions", "LLaVA-ST's layout both ways: given positions as -INPUT and (in training) answered "
            "ones as -OUTPUT placeholders with exact values (data.question_positions: input, answer_positions: output)",
            {p: {"data.question_positions": "input", "data.answer_positions": "output"} for p in S2_ON}),
    Variant("point_marker", "a point question's point drawn into its frames (data.point_marker: square) in stage 3",
            {p: {"data.point_marker": "square"} for p in S3}),
    Variant("no_growth_focus", "growth questions see the whole chip, not their field's box (data.growth_focus: none)",
            {p: {"data.growth_focus": "none"} for p in S3}),
)
BY_NAME = {v.name: v for v in VARIANTS}

#: The budgets: ``quick`` (about an hour on 2 cores for every variant and 2 seeds), ``full`` and ``tiny`` (the test).
BUDGETS: dict[str, dict[str, Any]] = {
    "quick": {"scenes": 8, "steps": {"stage1": 40, "stage2": 150, "stage3_focus": 250, "stage3": 400},
              "eval_scenes": 1, "growth_fields": 12, "area": 1.0, "eval_regions": ("central_europe", "pannonian"),
              "timing_steps": 30},
    "full": {"scenes": 20, "steps": {"stage1": 100, "stage2": 400, "stage3_focus": 750, "stage3": 1500},
             "eval_scenes": 2, "growth_fields": 24, "area": 1.0, "eval_regions": ("central_europe", "pannonian"),
             "timing_steps": 50},
    "tiny": {"scenes": 1, "steps": {"stage1": 2, "stage2": 2, "stage3_focus": 0, "stage3": 2},
             "eval_scenes": 1, "growth_fields": 2, "area": 0.15, "model": "configs/model/tiny.yaml",
             "eval_regions": ("pannonian",), "real_block": False, "max_new_tokens": 8, "timing_steps": 5},
}
#: Figures of the table: (key, label, better when higher).
METRICS: tuple[tuple[str, str, bool], ...] = (
    ("f1_heldout", "field F1 held-out", True),
    ("f1_left_out", "field F1 left-out region", True),
    ("stage_heldout", "stage acc held-out", True),
    ("stage_left_out", "stage acc left-out region", True),
    ("stage_real", "stage acc real block", True),
    ("green_up_days", "green-up median days", False),
    ("peak_days", "peak median days", False),
    ("val_position_loss", "val position loss", False),
    ("val_loss", "val loss", False),
    ("step_time_s", "step s", False),
    ("peak_mem_mib", "peak MiB", False),
)


def training_climatology(scenes: Path) -> Any:
    """The day-of-year stage climatology of the training scenes (the baseline of the stage figures)."""
    folders = sorted(p for p in scenes.iterdir() if (p / "scene.json").is_file())
    return learning.climatology_of([learning.read_scene(f, f.name) for f in folders])


def phase_plan(variant: Variant, opts: DefaultTraining) -> list[tuple[str, int]]:
    """``[(phase, steps)]`` of a variant: the shipped phases, skipped ones' steps moved to the first kept."""
    kept = [p for p in PHASES if p not in variant.skip and opts.steps.get(p, 0) > 0]
    moved = sum(opts.steps[p] for p in variant.skip)
    return [(p, opts.steps[p] + (moved if i == 0 else 0)) for i, p in enumerate(kept)]


def _set_args(over: dict[str, Any]) -> list[str]:
    out = []
    for k, v in over.items():
        out += ["--set", f"{k}={json.dumps(v)}"]  # JSON is YAML: the command parses the value back exactly
    return out


def train_variant(variant: Variant, seed: int, opts: DefaultTraining, roots: dict[str, Path], work: Path,
                  threads: int, echo: Any) -> tuple[Path, list[Path]]:
    """Train one (variant, seed) through ``agrivlm train``; returns the final folder and the phases' run folders."""
    prev: Path | None = None
    lineage: list[Any] = [seed, opts.model_config]
    runs = []
    for phase, steps in phase_plan(variant, opts):
        o = replace(opts, seed=seed, threads=threads, steps={**opts.steps, phase: steps})
        extra = dict(variant.changes.get(phase, {}))
        lineage.append([phase, steps, sorted(extra.items(), key=str)])
        key = hashlib.sha256(json.dumps(lineage, default=str).encode()).hexdigest()[:10]
        folder = work / "train" / f"seed{seed}" / f"{phase}-{key}"
        # prev None: the first phase kept builds its model from the model YAML (the curriculum ablation)
        over = phase_overrides(phase, o, roots[phase], folder, prev)
        over.update({"train.snapshot_every": 0, "train.save_every": 0, **extra})
        runs.append(folder)
        if not (folder / "final" / "config.json").is_file():
            t0 = time.perf_counter()
            _run_train(phase, over, folder.parent / f"{folder.name}.log", f"{variant.name} seed {seed}")
            echo(f"  {variant.name} seed {seed}: {phase} {steps} steps in {time.perf_counter() - t0:.0f} s")
        prev = folder / "final"
    assert prev is not None
    return prev, runs


def training_figures(runs: list[Path]) -> dict[str, Any]:
    """Final validation losses of the last phase (teacher-forced, the recipes' validation scenes)."""
    evals = [r for r in read_metrics(runs[-1]) if "eval_loss" in r]
    last = evals[-1] if evals else {}
    pos = last.get("eval_position_loss")  # none with LAPE off: its position tokens are plain vocabulary
    return {"val_position_loss": None if pos is None else round(pos, 4),
            "val_loss": round(last["eval_loss"], 4) if "eval_loss" in last else None}


def time_variant(variant: Variant, opts: DefaultTraining, roots: dict[str, Path], work: Path, threads: int,
                 steps: int) -> dict[str, Any]:
    """Step time and peak memory of the variant's last phase, measured alone (nothing else training).

    ``steps`` steps of that phase from its seed-0 starting model, every thread of ``threads``; the median step time
    leaves out the first 3 steps (warm-up).
    """
    _, runs = train_variant(variant, 0, opts, roots, work, threads, print)
    phase = phase_plan(variant, opts)[-1][0]
    folder = work / "timing" / variant.name
    over = phase_overrides(phase, replace(opts, seed=0, threads=threads, steps={**opts.steps, phase: steps}),
                           roots[phase], folder, runs[-2] / "final" if len(runs) > 1 else None)
    over.update({"train.snapshot_every": 0, "train.save_every": 0, "train.eval_every": -1,
                 **variant.changes.get(phase, {})})
    _run_train(phase, over, folder.parent / f"{folder.name}.log", f"{variant.name} timing")
    rows = read_metrics(folder)
    times = [r["step_time_s"] for r in rows if "step_time_s" in r and r.get("step", 0) > 3]
    return {"step_time_s": round(float(np.median(times)), 4) if times else None,
            "peak_mem_mib": max(float(r.get("peak_mem_mib", 0.0)) for r in rows)}


def _run_train(phase: str, over: dict[str, Any], log: Path, what: str) -> None:
    cmd = [sys.executable, "-m", "agrivlm.cli", "train", PHASES[phase], "--config",
           str(resources.stage_config(PHASES[phase])), "--overwrite", *_set_args(over)]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=False).returncode
    if rc != 0:
        raise RuntimeError(f"{what} {phase}: agrivlm train failed (rc {rc}); see {log}")


def score(model: Path, sets: dict[str, list[learning.EvalScene]], work: Path, clim: Any, growth_fields: int,
          threads: int, max_new_tokens: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(figures, merged rows per set)`` of one model on the held-out sets."""
    merged = evaluate_sets(model, sets, work, clim, growth_fields, threads, max_new_tokens, controls=False)
    g = merged["synthetic_heldout"]["growth"]["model"]

    def finite(x: Any) -> Any:  # a set without any answered pair scores NaN: no figure
        return x if isinstance(x, (int, float)) and np.isfinite(x) else None

    figures = {
        "f1_heldout": finite(merged["synthetic_heldout"]["fields"]["model"]["f1"]),
        "f1_left_out": finite(merged["synthetic_left_out_region"]["fields"]["model"]["f1"]),
        "stage_heldout": finite(g["stage_accuracy"]),
        "stage_left_out": finite(merged["synthetic_left_out_region"]["growth"]["model"]["stage_accuracy"]),
        "stage_real": finite(merged["real_test_block"]["growth"]["model"]["stage_accuracy"])
        if "real_test_block" in merged else None,
        "green_up_days": finite(g["green_up_median_days"]),
        "peak_days": finite(g["peak_median_days"]),
        "senescence_days": finite(g["senescence_median_days"]),
    }
    return figures, merged


def baselines(sets: dict[str, list[learning.EvalScene]], work: Path, clim: Any, model: Path,
              growth_fields: int, threads: int, max_new_tokens: int | None = None) -> dict[str, Any]:
    """The whole-chip and segmentation F1 and the climatology's stage accuracy on the same sets."""
    merged = evaluate_sets(model, sets, work, clim, growth_fields, threads, max_new_tokens, controls=True)
    return {name: {"whole_chip_f1": m["fields"]["whole_chip"]["f1"],
                   "segmentation_f1": m["fields"]["segmentation"]["f1"],
                   "climatology_stage_accuracy": m["growth"]["climatology"]["stage_accuracy"],
                   "climatology_green_up_days": m["growth"]["climatology"]["green_up_median_days"]}
            for name, m in merged.items()}


def evaluate_sets(model: Path, sets: dict[str, list[learning.EvalScene]], work: Path, clim: Any, growth_fields: int,
                  threads: int, max_new_tokens: int | None, controls: bool) -> dict[str, Any]:
    """``learning.evaluate_scene`` on every scene of every set, merged per set (``learning.merge_rows``)."""
    return {name: learning.merge_rows([learning.evaluate_scene(model, sc, work / name, clim, growth_fields, threads,
                                                               controls=controls, max_new_tokens=max_new_tokens)
                                       for sc in scenes])
            for name, scenes in sets.items()}


def summarise(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample standard deviation of every figure over the seeds (None where a seed has none)."""
    out: dict[str, Any] = {}
    for key in per_seed[0]:
        vals = [r[key] for r in per_seed if isinstance(r.get(key), (int, float)) and np.isfinite(r[key])]
        if not vals:
            continue
        out[key] = {"mean": round(float(np.mean(vals)), 4),
                    "sd": round(float(np.std(vals, ddof=1)), 4) if len(vals) > 1 else None, "n": len(vals)}
    return out


def table(result: dict[str, Any]) -> str:
    """The README's markdown table: mean ± sd per variant."""
    head = "| variant | " + " | ".join(label for _, label, _ in METRICS) + " |"
    lines = [head, "|" + "---|" * (len(METRICS) + 1)]
    for name, v in result["variants"].items():
        cells = []
        for key, _, _ in METRICS:
            s = v["summary"].get(key)
            if s is None:
                cells.append("–")
            elif key == "peak_mem_mib":  # measured once per variant (alone): no spread
                cells.append(f"{s['mean']:.0f}")
            elif key == "step_time_s":
                cells.append(f"{s['mean']:.3f}")
            else:
                sd = f" ± {s['sd']:.3g}" if s.get("sd") is not None else ""
                cells.append(f"{s['mean']:.3g}{sd}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Bars (mean, sd as error bar) of the held-out figures per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["variants"])
    panels = [("stage_heldout", "stage acc held-out"), ("stage_left_out", "stage acc left-out region"),
              ("f1_heldout", "field F1@0.5 held-out"), ("val_position_loss", "val position loss"),
              ("green_up_days", "green-up median |error| days"), ("step_time_s", "step time s")]
    fig, axes = plt.subplots(2, 3, figsize=(15, 7))
    for ax, (key, label) in zip(axes.flat, panels, strict=True):
        means = [result["variants"][n]["summary"].get(key, {}).get("mean", np.nan) for n in names]
        sds = [result["variants"][n]["summary"].get(key, {}).get("sd") or 0.0 for n in names]
        colors = ["tab:green" if n == "shipped" else "tab:blue" for n in names]
        ax.bar(range(len(names)), means, yerr=sds, color=colors, capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(label, fontsize=9)
        base = result.get("baselines", {}).get("synthetic_heldout", {})
        if key == "stage_heldout" and base.get("climatology_stage_accuracy") is not None:
            ax.axhline(base["climatology_stage_accuracy"], color="gray", ls="--", label="climatology")
            ax.legend(fontsize=7)
    fig.suptitle(f"ablations ({result['budget']} budget, {len(result['seeds'])} seeds; mean ± sd)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the quick budget (about an hour on 2 cores)")
    ap.add_argument("--tiny", action="store_true", help="a few steps of the tiny model (the test)")
    ap.add_argument("--seeds", type=int, default=2, help="seeds per variant (at least 2 for a spread)")
    ap.add_argument("--variants", default=",".join(BY_NAME), help="comma-separated, from: " + ", ".join(BY_NAME))
    ap.add_argument("--jobs", type=int, default=2, help="seeds trained at once (each with threads/jobs threads)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("runs/ablations"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    budget_name = "tiny" if args.tiny else "quick" if args.quick else "full"
    b = BUDGETS[budget_name]
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        ap.error(f"unknown variants {unknown}; use {', '.join(BY_NAME)}")
    if "shipped" not in names:
        names.insert(0, "shipped")
    t0 = time.perf_counter()
    work = args.work / budget_name
    opts = DefaultTraining(scenes_per_region=b["scenes"], steps=dict(b["steps"]), area_km2=b["area"],
                           model_config=b.get("model", DefaultTraining.model_config), snapshot_every=0)
    make_scenes(work / "scenes", opts, print)
    roots = build_data(work, work / "scenes", opts, print)
    n = b["eval_scenes"]
    sets = {
        "synthetic_heldout": [learning.synthetic_scene(args.work, r, 9000 + s, b["area"])
                              for r in b["eval_regions"] for s in range(n)],
        "synthetic_left_out_region": [learning.synthetic_scene(args.work, "corn_belt", 9000 + s, b["area"])
                                      for s in range(n)],
    }
    if b.get("real_block", True):
        sets["real_test_block"] = [learning.real_test_scene(args.work)]
    clim = training_climatology(work / "scenes")
    threads = max(1, args.threads // args.jobs)
    seeds = list(range(args.seeds))
    eval_lock = threading.Lock()

    def chain(seed: int) -> dict[str, dict[str, Any]]:
        out = {}
        for name in names:
            final, runs = train_variant(BY_NAME[name], seed, opts, roots, work, threads, print)  # kept if trained
            cache = work / "scores" / f"{name}_seed{seed}.json"
            if cache.is_file():
                scores = json.loads(cache.read_text())
            else:
                with eval_lock:  # one evaluation at a time (the other seed's training goes on)
                    figures, merged = score(final, sets, work / "pred" / f"{name}_seed{seed}", clim,
                                            b["growth_fields"], threads, b.get("max_new_tokens"))
                scores = {**figures, "sets": merged}
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.write_text(json.dumps(scores, indent=1) + "\n")
            row = {**scores, **training_figures(runs)}
            print(f"{name} seed {seed}: " + ", ".join(f"{k} {row.get(k)}" for k, _, _ in METRICS[:-2]), flush=True)
            out[name] = row
        return out

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        per_seed = list(pool.map(chain, seeds))
    # step time and memory alone, one variant after another: the training runs above shared the cores
    timing = {name: time_variant(BY_NAME[name], opts, roots, work, args.threads, b["timing_steps"])
              for name in names}
    for name in names:
        t = timing[name]
        print(f"{name}: {t['step_time_s']} s/step, peak {t['peak_mem_mib']:.0f} MiB", flush=True)
        for s in per_seed:
            s[name].update(timing[name])
    shipped_final = train_variant(BY_NAME["shipped"], 0, opts, roots, work, threads, print)[0]
    result: dict[str, Any] = {
        "budget": budget_name, "budget_settings": {**b, "batch_size": opts.batch_size}, "seeds": seeds,
        "baselines": baselines(sets, work / "pred" / "baselines", clim, shipped_final, b["growth_fields"],
                               args.threads, b.get("max_new_tokens")),
        "variants": {name: {"what": BY_NAME[name].what,
                            "summary": summarise([{k: v for k, v in s[name].items() if k != "sets"}
                                                  for s in per_seed]),
                            "per_seed": [{k: v for k, v in s[name].items() if k != "sets"} for s in per_seed]}
                     for name in names},
    }
    result["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ablations.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out / "ablations.png")
    print(table(result))
    print(f"→ {args.out / 'ablations.json'}, ablations.png ({result['seconds']} s)")
    return result


if __name__ == "__main__":
    main()
