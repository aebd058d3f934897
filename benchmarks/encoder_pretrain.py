"""What the encoder's dense pre-training buys the fields task: the same fields-only training from a random encoder
and from a pre-trained one, scored side by side on held-out scenes.

1. scenes: ``agrivlm synth`` scenes of Pannonian and central Europe, seeds ``0 … --scenes − 1`` (1 km²), and the
   held-out scenes of ``benchmarks/learning.py`` (seeds 9000, 9001 of each region: never trained on);
2. the encoder: :func:`agrivlm.train.encoder.pretrain_encoder` on the training scenes (FTW's three classes and
   each pixel's field extent from the pooled tokens; ``--encoder-steps``), its dense scores on the held-out scenes;
3. for each seed and each start (``--starts``: ``random``, ``pretrained``, the pre-trained encoder kept frozen, and
   either with the visual feature under a question's point added to its tokens, ``lape.point_features``; see
   :data:`STARTS`): stage 1 for one step (the curriculum's entry) then ``--steps`` steps of ``field_at_point``
   alone, the LLM and the encoder trained fully (``configs/stage2.yaml`` as ``tests/test_heldout_learning.py`` trains);
4. ``agrivlm infer --task fields`` on every held-out scene, scored chip by chip at F1@0.5
   (:func:`agrivlm.eval.heldout.evaluate_chipwise`), pooled over the scenes (true positives, false positives and
   misses summed), beside the whole chip as one field.

Run::

    python benchmarks/encoder_pretrain.py                 # tiny model, 20 scenes per region, 4,000 steps, 2 seeds
    python benchmarks/encoder_pretrain.py --starts random,pretrained,pretrained_frozen,random_points
    python benchmarks/encoder_pretrain.py --smoke         # a few steps: that it runs

Writes ``benchmarks/results/encoder_pretrain.json`` and ``encoder_pretrain.png`` (about 35 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import geopandas as gpd
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from learning import EvalScene, synthetic_scene  # noqa: E402

from agrivlm.eval.heldout import chip_grid, evaluate_chipwise, whole_chip_baseline  # noqa: E402
from agrivlm.geo.stack import open_stack  # noqa: E402
from agrivlm.infer.batch import run_inference  # noqa: E402
from agrivlm.recipes.build import build_recipe  # noqa: E402
from agrivlm.resources import configs_dir, stage_config  # noqa: E402
from agrivlm.train.encoder import EncoderPretrainConfig, pretrain_encoder  # noqa: E402
from agrivlm.train.trainer import run_stage  # noqa: E402

REGIONS = ("pannonian", "central_europe")
RECIPE = {
    "name": "encoder_bench_fields", "seed": 0,
    "chips": {"size": 32, "stride": 16, "min_clear": 0.6, "max_frames": 16, "min_frames": 4},
    "tasks": {"field_boundaries": {"field_classes": ["cultivated land", "grassland"], "tasks": ["field_at_point"],
                                   "point_prompts": 8},
              "general_rs": {"tasks": ["majority"]}},  # stage 1 (alignment) trains on text-only records
    "output": {"shard_size": 5000, "plot_parcels": 1},
}


def build_data(work: Path, scenes: list[Path]) -> Path:
    """The fields recipe over the training scenes (every scene in train) → ``work/data`` (kept once built)."""
    data = work / "data"
    if not (data / "manifest.json").is_file():
        recipe = {**RECIPE, "sources": [{"name": "synth", "synth": str(p.resolve()), "split": "train"}
                                        for p in scenes]}
        for i, src in enumerate(recipe["sources"]):
            src["name"] = f"synth{i}"
        path = work / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        build_recipe(path, data, overwrite=True, progress=False)
    return data


#: The starts a run can compare: (pre-trained encoder, frozen, model-YAML overrides of stage 1).
STARTS: dict[str, tuple[bool, bool, dict[str, Any]]] = {
    "random": (False, False, {}),
    "pretrained": (True, False, {}),
    "pretrained_frozen": (True, True, {}),
    # the feature under a question's point added to its tokens (lape.point_features: Ferret's region features)
    "random_points": (False, False, {"lape.point_features": True}),
    "pretrained_frozen_points": (True, True, {"lape.point_features": True}),
}


def train_fields(work: Path, data: Path, name: str, seed: int, steps: int, model_config: str,
                 encoder: Path | None, frozen: bool, threads: int, overrides: dict[str, Any] | None = None) -> Path:
    """Stage 1 (one step) → ``steps`` steps of the field task alone; the final folder (kept once trained)."""
    out = work / "runs" / f"{name}_seed{seed}"
    if (out / "s2" / "final" / "config.json").is_file():
        return out / "s2" / "final"
    common = {"data.roots": [str(data)], "train.batch_size": 8, "train.torch_threads": threads,
              "train.progress": False, "train.eval_every": 0, "optim.warmup_steps": 0, "train.seed": seed,
              "data.frames.num_frames": 8}
    model = {"model.config": model_config, "model.overrides": {
        **(overrides or {}), **({"vision.checkpoint": str(encoder.resolve())} if encoder else {})}}
    s1 = run_stage(stage_config("stage1"), {**common, **model, "output_dir": str(out / "s1"), "train.max_steps": 1,
                                            "train.save_every": 1}, stage="stage1", overwrite=True)
    return run_stage(stage_config("stage2"), {
        **common, "output_dir": str(out / "s2"), "train.max_steps": steps, "train.save_every": steps,
        "model.init_from": str(s1), "optim.lr": 2e-3, "optim.schedule": "constant", "lape.lape_warmup_steps": 0,
        "data.mixture": None, "data.families": ["field_boundaries"], "trainable.llm.mode": "full",
        "trainable.vision": not frozen}, stage="stage2", overwrite=True)


def score(model: Path, scenes: list[EvalScene], out: Path, threads: int) -> dict[str, Any]:
    """Pooled F1@0.5 over the scenes (and per scene) of the model's fields and of the whole chip."""
    out.mkdir(parents=True, exist_ok=True)
    per_scene: dict[str, Any] = {}
    sums = {"model": [0, 0, 0], "whole_chip": [0, 0, 0]}
    for sc in scenes:
        chips = chip_grid(open_stack(str(sc.stack), masks=str(sc.masks)), 32, 32)
        extent = sorted(sc.stack.glob("*.tif"))[0]
        pred_path = out / f"{sc.name}.gpkg"
        for stale in out.glob(f"{sc.name}.gpkg*"):
            stale.unlink()
        run_inference([str(sc.stack)], model, pred_path, task="fields", masks=[str(sc.masks)],
                      overrides={"stride": 32}, batch_size=36, progress=False, threads=threads)
        res = {"model": evaluate_chipwise(gpd.read_file(pred_path), sc.parcels, chips, extent=extent),
               "whole_chip": evaluate_chipwise(whole_chip_baseline(chips), sc.parcels, chips, extent=extent)}
        per_scene[sc.name] = {k: round(v.f1, 3) for k, v in res.items()} | {"n_truth": res["model"].n_truth}
        for k, v in res.items():
            sums[k] = [sums[k][0] + v.tp, sums[k][1] + v.fp, sums[k][2] + v.fn]
    pooled = {k: round(2 * tp / max(2 * tp + fp + fn, 1), 3) for k, (tp, fp, fn) in sums.items()}
    return {"pooled_f1": pooled, "scenes": per_scene}


def plot(result: dict[str, Any], path: Path) -> None:
    """Pooled held-out F1 of each start, one dot per seed, the whole chip as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(result["starts"])
    for i, name in enumerate(names):
        f1s = [r["pooled_f1"]["model"] for r in result["starts"][name]["runs"]]
        ax.scatter([i] * len(f1s), f1s, color="C0")
        ax.hlines(statistics.mean(f1s), i - 0.2, i + 0.2, color="C0")
    whole = next(iter(result["starts"].values()))["runs"][0]["pooled_f1"]["whole_chip"]
    ax.axhline(whole, color="grey", ls="--", label=f"whole chip {whole:.3f}")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("held-out field F1@0.5 (pooled)")
    ax.set_title(f"fields-only training, {result['steps']} steps, {result['model']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("runs/encoder_bench"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--model", default=str(configs_dir() / "model" / "tiny.yaml"), help="model YAML")
    ap.add_argument("--scenes", type=int, default=20, help="training scenes per region")
    ap.add_argument("--steps", type=int, default=4000, help="fields-only steps of each run")
    ap.add_argument("--encoder-steps", type=int, default=3000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--starts", default="random,pretrained",
                    help=f"comma-separated, of {', '.join(STARTS)}")
    ap.add_argument("--frozen", action="store_true", help="also the pre-trained encoder kept frozen")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="2 scenes per region, a few steps: that it runs")
    args = ap.parse_args(argv)
    if args.smoke:
        args.scenes, args.steps, args.encoder_steps, args.seeds = 2, 4, 4, [0]
    t0 = time.perf_counter()
    area = 0.3 if args.smoke else 1.0
    train = [synthetic_scene(args.work, r, s, area).stack.parent for r in REGIONS for s in range(args.scenes)]
    held = [synthetic_scene(args.work, r, 9000 + s, area) for r in REGIONS for s in range(1 if args.smoke else 2)]
    data = build_data(args.work, train)
    encoder = args.work / "encoder"
    if not (encoder / "pretrain.json").is_file():
        pretrain_encoder(EncoderPretrainConfig(
            scenes=train, val_scenes=[sc.stack.parent for sc in held], out=encoder, model_config=args.model,
            steps=args.encoder_steps, threads=args.threads, eval_every=max(args.encoder_steps // 6, 1)))
    names = [n for n in args.starts.split(",") if n] + (["pretrained_frozen"] if args.frozen else [])
    unknown = sorted(set(names) - set(STARTS))
    if unknown:
        ap.error(f"unknown start(s) {unknown}; choose from {', '.join(STARTS)}")
    result: dict[str, Any] = {"model": Path(args.model).name, "scenes_per_region": args.scenes, "steps": args.steps,
                              "encoder_steps": args.encoder_steps, "seeds": args.seeds,
                              "held_out": [sc.name for sc in held],
                              "encoder": json.loads((encoder / "pretrain.json").read_text())["history"][-1],
                              "starts": {}}
    for name in dict.fromkeys(names):
        pretrained, frozen, overrides = STARTS[name]
        runs = []
        for seed in args.seeds:
            t1 = time.perf_counter()
            final = train_fields(args.work, data, name, seed, args.steps, args.model, encoder if pretrained else None,
                                 frozen, args.threads, overrides)
            row = score(final, held, args.work / "pred" / f"{name}_seed{seed}", args.threads)
            runs.append({"seed": seed, **row, "seconds": round(time.perf_counter() - t1, 1)})
            print(f"{name} seed {seed}: pooled held-out F1@0.5 {row['pooled_f1']['model']:.3f} "
                  f"(whole chip {row['pooled_f1']['whole_chip']:.3f}) {row['scenes']}", flush=True)
        f1s = [r["pooled_f1"]["model"] for r in runs]
        result["starts"][name] = {"runs": runs, "mean_f1": round(statistics.mean(f1s), 3),
                                  "sd_f1": round(statistics.stdev(f1s), 3) if len(f1s) > 1 else 0.0}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    out = args.out if not args.smoke else args.work
    out.mkdir(parents=True, exist_ok=True)
    path = out / "encoder_pretrain.json"
    if path.is_file() and not args.smoke:  # keep the starts measured before (the same settings) beside these
        before = json.loads(path.read_text())
        if all(before.get(k) == result[k] for k in ("model", "scenes_per_region", "steps", "encoder_steps", "seeds")):
            result["starts"] = {**before["starts"], **result["starts"]}
    path.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / "encoder_pretrain.png")
    print(f"→ {out / 'encoder_pretrain.json'} ({result['seconds']} s)")
    return result


if __name__ == "__main__":
    main()
