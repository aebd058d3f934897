"""Does the model learn? Held-out scores of a checkpoint beside simple baselines, through the real infer and eval code.

Sets (none of them seen in training):

* ``synthetic_heldout`` — `agrivlm synth` scenes of the trained regions with seeds ≥ 9000 (training uses seeds
  below 1000);
* ``synthetic_left_out_region`` — scenes of a region the default training leaves out (``corn_belt``);
* ``real_test_block`` — the embedded real sample's spatial test blocks (the recipes' split of
  ``data_recipes/sample_base.yaml``; training uses its train blocks only), with the recipes' NDVI-derived stages
  as the stage reference.

Fields: ``agrivlm infer --task fields`` on non-overlapping chips, scored chip by chip against the parcels clipped
to each chip (:mod:`agrivlm.eval.heldout`): object precision/recall/F1 at IoU 0.5, map_50_95, pixel IoU; beside
the whole-chip baseline and an unsupervised Felzenszwalb segmentation of the per-pixel NDVI time series.
Growth: ``agrivlm infer --task growth`` on a fixed sample of fields, scored on the (field, date) pairs it
answered: stage accuracy and macro-F1, and the median / 90th-percentile |error| in days of green-up, peak and
senescence read off the stage tables (the first date of each stage, the same rule for prediction, truth and
baseline); beside the day-of-year stage climatology of the training scenes.

``--quick`` (≤ 15 minutes on 2 cores) evaluates a checkpoint (default: the shipped one); the learning curve
comes from the checkpoint's ``learning_curve.json`` when its training wrote one. ``--snapshots DIR`` also
evaluates every snapshot of a training run on a small held-out subset (the learning curve). Writes
``learning.json`` and ``learning.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd

from agrivlm.eval.boundaries import FieldEvaluation
from agrivlm.eval.growth import evaluate_growth, key_dates_from_stages
from agrivlm.eval.heldout import (
    chip_grid,
    constant_stack,
    evaluate_chipwise,
    predict_climatology,
    segmentation_baseline,
    stage_climatology,
    whole_chip_baseline,
)
from agrivlm.geo.stack import open_stack
from agrivlm.infer.batch import run_inference
from agrivlm.pipeline.inputs import load_input_config
from agrivlm.synth import SceneSpec, write_scene

FIELD_CLASSES = ("cultivated land", "grassland")
KEYS = ("green_up", "peak", "senescence")


@dataclass
class EvalScene:
    """One stack to evaluate on, with its truth."""

    name: str
    stack: Path
    masks: Path | None
    parcels: gpd.GeoDataFrame  # field_id, class, geometry (field classes only)
    stages: pd.DataFrame  # field_id, date, stage
    season_start: str = "01-01"
    chip_filter: set[str] | None = None  # only these chip ids (the real sample's test blocks)


def synthetic_scene(work: Path, region: str, seed: int, area_km2: float = 1.0) -> EvalScene:
    """A held-out synthetic scene (written once into ``work``)."""
    folder = work / "scenes" / (f"{region}_{seed}" if area_km2 == 1.0 else f"{region}_{seed}_{area_km2:g}km2")
    start, end = ("2021-08-01", "2022-07-31") if region == "mato_grosso" else ("2021-01-01", "2021-12-31")
    if not (folder / "scene.json").is_file():
        write_scene(folder, SceneSpec(region=region, area_km2=area_km2, seed=seed, start=start, end=end),
                    overwrite=True)
    return read_scene(folder, f"{region}_{seed}")


def read_scene(folder: Path, name: str) -> EvalScene:
    """An ``agrivlm synth`` scene folder with its truth: the field-class parcels and the stage table."""
    parcels = gpd.read_file(folder / "parcels.gpkg")
    parcels = parcels[parcels["class"].isin(FIELD_CLASSES)][["field_id", "class", "geometry"]]
    stages = pd.read_csv(folder / "truth" / "stages.csv", dtype=str, keep_default_na=False)
    meta = json.loads((folder / "scene.json").read_text())
    return EvalScene(name, folder / "stack", folder / "cloud_mask", parcels, stages, meta["season_start"])


def real_test_scene(work: Path) -> EvalScene:
    """The embedded sample's test blocks, with the recipes' derived stages."""
    from agrivlm.recipes.build import build_recipe
    from agrivlm.resources import recipe
    from agrivlm.sample import SAMPLE_ROOT

    out = work / "real_growth"
    if not (out / "manifest.json").is_file():
        build_recipe(recipe("growth_stages"), out, overwrite=True, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    test_chips = set(manifest["chips"]["by_split"]["test"])
    parcels = gpd.read_file(out / "tables" / "parcels.gpkg", layer="parcels")
    parcels = parcels[parcels["class"].isin(FIELD_CLASSES)][["field_id", "class", "geometry"]]
    stages = pd.read_csv(out / "tables" / "growth_stages.csv", dtype=str, keep_default_na=False)
    return EvalScene("real_test_block", SAMPLE_ROOT / "ndvi", SAMPLE_ROOT / "cloud_mask", parcels, stages,
                     chip_filter=test_chips)


def _field_row(e: FieldEvaluation) -> dict[str, Any]:
    return {"precision": round(e.precision, 3), "recall": round(e.recall, 3), "f1": round(e.f1, 3),
            "map_50_95": round(e.map_50_95, 3), "pixel_iou": None if e.pixel is None else round(e.pixel.iou, 3),
            "n_truth": e.n_truth, "n_pred": e.n_pred}


def _growth_row(pred: pd.DataFrame, truth: pd.DataFrame, season_start: str) -> dict[str, Any]:
    ev = evaluate_growth(pred, truth, pred_key_dates=key_dates_from_stages(pred, season_start),
                         truth_key_dates=key_dates_from_stages(truth, season_start))
    row: dict[str, Any] = {"stage_accuracy": round(ev.stages.accuracy, 3),  # type: ignore[union-attr]
                           "stage_macro_f1": round(ev.stages.macro_f1, 3), "pairs": ev.stages.n_pairs}  # type: ignore[union-attr]
    table = ev.key_dates.table  # type: ignore[union-attr]
    for k in KEYS:
        err = pd.to_numeric(table[f"{k}_abs_days"], errors="coerce").dropna()
        row[f"{k}_median_days"] = round(float(err.median()), 1) if len(err) else None
        row[f"{k}_p90_days"] = round(float(err.quantile(0.9)), 1) if len(err) else None
        row[f"{k}_n"] = int(len(err))
    return row


def evaluate_scene(model: Path, scene: EvalScene, out: Path, climatology: pd.DataFrame, growth_fields: int,
                   threads: int, seed: int = 0, tasks: tuple[str, ...] = ("fields", "growth"),
                   controls: bool = True, max_new_tokens: int | None = None) -> dict[str, Any]:
    """Fields and growth of one scene (``tasks``): the model and the baselines (``controls``), as rows of figures."""
    stack = open_stack(str(scene.stack), masks=str(scene.masks) if scene.masks else None)
    size = load_input_config(model)[0].chip_size
    chips = chip_grid(stack, size, size)
    if scene.chip_filter is not None:
        chips = chips[chips.chip_id.isin(scene.chip_filter)]
    extent = sorted(Path(scene.stack).glob("*.tif"))[0]
    out.mkdir(parents=True, exist_ok=True)
    masks = [str(scene.masks)] if scene.masks else None

    def fields_of(stack_dir: Path, path: Path) -> gpd.GeoDataFrame:
        run_inference([str(stack_dir)], model, path, task="fields", masks=masks, overrides={"stride": size},
                      batch_size=16, overwrite=True, restart=True, progress=False, threads=threads,
                      max_new_tokens=max_new_tokens)
        found = gpd.read_file(path)
        return found[found.chip_id.isin(chips.chip_id)]

    res: dict[str, Any] = {"chips": len(chips)}
    if "fields" in tasks:
        res["fields"] = _fields_rows(scene, chips, extent, stack, out, fields_of, controls)
    if "growth" in tasks:
        res["growth"] = _growth_rows(model, scene, chips, out, climatology, growth_fields, threads, masks, size, seed,
                                     max_new_tokens)
    return res


def _fields_rows(scene: EvalScene, chips: gpd.GeoDataFrame, extent: Path, stack: Any, out: Path,
                 fields_of: Any, controls: bool = True) -> dict[str, Any]:
    pred = fields_of(scene.stack, out / f"{scene.name}_fields.gpkg")
    if not controls:
        return {"model": _field_row(evaluate_chipwise(pred, scene.parcels, chips, extent=extent))}
    # the control: the same model on the stack with every pixel one value (what it says without looking)
    blind = fields_of(constant_stack(scene.stack, out / f"{scene.name}_constant_stack"),
                      out / f"{scene.name}_fields_constant.gpkg")
    return {
        "model": _field_row(evaluate_chipwise(pred, scene.parcels, chips, extent=extent)),
        "model_constant_frames": _field_row(evaluate_chipwise(blind, scene.parcels, chips, extent=extent)),
        "whole_chip": _field_row(evaluate_chipwise(whole_chip_baseline(chips), scene.parcels, chips, extent=extent)),
        "segmentation": _field_row(evaluate_chipwise(segmentation_baseline(stack, chips), scene.parcels, chips,
                                                     extent=extent)),
    }


def _growth_rows(model: Path, scene: EvalScene, chips: gpd.GeoDataFrame, out: Path, climatology: pd.DataFrame,
                 growth_fields: int, threads: int, masks: list[str] | None, size: int, seed: int,
                 max_new_tokens: int | None = None) -> dict[str, Any]:
    # growth: a fixed sample of fields that lie in the evaluated chips
    inside = scene.parcels[scene.parcels.intersects(chips.union_all())]
    rng = np.random.default_rng(seed)
    pick = inside.iloc[np.sort(rng.permutation(len(inside))[:growth_fields])]
    fields_path = out / f"{scene.name}_growth_fields.gpkg"
    pick.to_file(fields_path, driver="GPKG")
    growth_out = out / f"{scene.name}_growth.gpkg"
    run_inference([str(scene.stack)], model, growth_out, task="growth",
                  masks=masks, fields=fields_path, field_id="field_id", field_class="class",
                  overrides={"stride": size, "season_start": scene.season_start},
                  batch_size=32, overwrite=True, restart=True, progress=False, threads=threads,
                  max_new_tokens=max_new_tokens)
    pred_st = pd.read_csv(growth_out.with_name(f"{growth_out.stem}_stages.csv"), dtype=str, keep_default_na=False)
    pred_st = pred_st.drop_duplicates(["field_id", "date"])
    truth = scene.stages.merge(pred_st[["field_id", "date"]], on=["field_id", "date"])
    classes = dict(zip(pick.field_id, pick["class"], strict=True))
    clim = predict_climatology(truth, climatology, classes=classes)
    return {
        "model": _growth_row(pred_st[["field_id", "date", "stage"]], truth, scene.season_start),
        "climatology": _growth_row(clim, truth, scene.season_start),
    }


def training_climatology(work: Path, regions: list[str], seeds: list[int], area_km2: float = 1.0) -> pd.DataFrame:
    """The stage climatology of training-like scenes (the same generator, training seeds)."""
    return climatology_of([synthetic_scene(work, region, seed, area_km2) for region in regions for seed in seeds])


def climatology_of(scenes: list[EvalScene]) -> pd.DataFrame:
    """The day-of-year stage climatology (per field class) of the scenes' truth stage tables."""
    return stage_climatology([sc.stages.merge(sc.parcels[["field_id", "class"]], on="field_id") for sc in scenes])


def merge_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Figures of several scenes of one set: object counts summed (recomputed P/R/F1), others averaged."""
    out: dict[str, Any] = {"scenes": len(rows), "chips": sum(r["chips"] for r in rows), "fields": {}, "growth": {}}
    for who in rows[0].get("fields", {}):
        fr = [r["fields"][who] for r in rows]
        out["fields"][who] = {k: round(float(np.nanmean([f[k] for f in fr if f[k] is not None])), 3)
                              for k in ("precision", "recall", "f1", "map_50_95", "pixel_iou")}
        out["fields"][who]["n_truth"] = sum(f["n_truth"] for f in fr)
    for who in rows[0].get("growth", {}):
        gr = [r["growth"][who] for r in rows]
        keys = [k for k in gr[0] if not k.endswith("_n") and k != "pairs"]
        out["growth"][who] = {k: (round(float(np.nanmean([g[k] for g in gr if g[k] is not None])), 3)
                                  if any(g[k] is not None for g in gr) else None) for k in keys}
        out["growth"][who]["pairs"] = sum(g["pairs"] for g in gr)
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    """Bars of F1 and stage accuracy per set and method, and the learning curve when there is one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(result["sets"])
    curve = result.get("learning_curve") or []
    fig, axes = plt.subplots(1, 3 if curve else 2, figsize=(16 if curve else 11, 4))
    methods = [m for m in ("model", "model_constant_frames", "whole_chip", "segmentation")
               if all(m in result["sets"][s]["fields"] for s in sets)]
    width = 0.8 / len(methods)
    for k, who in enumerate(methods):
        vals = [result["sets"][s]["fields"][who]["f1"] for s in sets]
        axes[0].bar(np.arange(len(sets)) + (k - (len(methods) - 1) / 2) * width, vals, width, label=who)
    axes[0].set_xticks(range(len(sets)), sets, fontsize=8)
    axes[0].set_ylabel("object F1 @ IoU 0.5 (held out)")
    axes[0].legend()
    for k, who in enumerate(("model", "climatology")):
        vals = [result["sets"][s]["growth"][who]["stage_accuracy"] for s in sets]
        axes[1].bar(np.arange(len(sets)) + (k - 0.5) * width, vals, width, label=who)
    axes[1].set_xticks(range(len(sets)), sets, fontsize=8)
    axes[1].set_ylabel("stage accuracy (held out)")
    axes[1].legend()
    if curve:
        steps = [c["step"] for c in curve]
        axes[2].plot(steps, [c["f1"] for c in curve], "o-", label="field F1@0.5")
        axes[2].plot(steps, [c["stage_accuracy"] for c in curve], "s-", label="stage accuracy")
        axes[2].set_xlabel("training step")
        axes[2].legend()
        days = [c.get("green_up_median_days") for c in curve]
        if any(d is not None for d in days):  # a model that never says green-up has no green-up date
            ax2 = axes[2].twinx()
            ax2.plot(steps, [np.nan if d is None else d for d in days], "^--", color="gray", label="green-up days")
            ax2.set_ylabel("median |green-up error| (days)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the shipped one)")
    ap.add_argument("--quick", action="store_true", help="fewer scenes (≤ 15 minutes on 2 cores)")
    ap.add_argument("--snapshots", type=Path, default=None, help="a training run's snapshots/ (learning curve)")
    ap.add_argument("--work", type=Path, default=Path("runs/learning"), help="cache of scenes and predictions")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--task", choices=("all", "fields", "growth"), default="all",
                    help="evaluate one task only (a probe; the README's table needs all)")
    ap.add_argument("--scenes", type=int, default=None, help="held-out scenes per region (default 2 quick, 4 full)")
    args = ap.parse_args()
    tasks = ("fields", "growth") if args.task == "all" else (args.task,)
    from agrivlm.default_checkpoint import default_model_path

    model = args.model or default_model_path()
    t0 = time.perf_counter()
    n = args.scenes or (2 if args.quick else 4)
    growth_fields = 12 if args.quick else 24
    sets: dict[str, list[EvalScene]] = {
        "synthetic_heldout": [synthetic_scene(args.work, r, 9000 + s)
                              for r in ("central_europe", "pannonian") for s in range(n)],
        "synthetic_left_out_region": [synthetic_scene(args.work, "corn_belt", 9000 + s) for s in range(n)],
        "real_test_block": [real_test_scene(args.work)],
    }
    clim = training_climatology(args.work, ["central_europe", "pannonian", "mato_grosso"], [0, 1])
    result: dict[str, Any] = {"model": str(model), "quick": args.quick, "sets": {}}
    for name, scenes in sets.items():
        rows = []
        for sc in scenes:
            print(f"{name}: {sc.name} …", flush=True)
            rows.append(evaluate_scene(model, sc, args.work / "pred" / name, clim, growth_fields, args.threads,
                                       tasks=tasks))
        result["sets"][name] = merge_rows(rows)
        f, g = result["sets"][name]["fields"], result["sets"][name]["growth"]
        if f:
            print(f"  F1@0.5 model {f['model']['f1']:.3f} | on constant frames "
                  f"{f['model_constant_frames']['f1']:.3f} | whole chip {f['whole_chip']['f1']:.3f} | segmentation "
                  f"{f['segmentation']['f1']:.3f}")
        if g:
            print(f"  stage acc model {g['model']['stage_accuracy']:.3f} | climatology "
                  f"{g['climatology']['stage_accuracy']:.3f};  green-up median days model "
                  f"{g['model']['green_up_median_days']} | climatology {g['climatology']['green_up_median_days']}; "
                  f"peak model {g['model']['peak_median_days']} | climatology {g['climatology']['peak_median_days']}")
    curve_file = model / "learning_curve.json"
    if curve_file.is_file():
        result["learning_curve"] = json.loads(curve_file.read_text())
    if args.snapshots is not None:
        result["learning_curve"] = snapshot_curve(args.snapshots, sets["synthetic_heldout"][:1], args.work, clim,
                                                  args.threads)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "learning.json").write_text(json.dumps(result, indent=1) + "\n")
    if args.task == "all":
        plot(result, args.out / "learning.png")
    print(f"→ {args.out / 'learning.json'}, learning.png ({result['seconds']} s)")


def snapshot_curve(folder: Path, scenes: list[EvalScene], work: Path, clim: pd.DataFrame,
                   threads: int) -> list[dict[str, Any]]:
    """Held-out F1 and stage scores of every snapshot of a training run (the learning curve)."""
    curve = []
    for snap in sorted(p for p in folder.iterdir() if (p / "config.json").is_file()):
        step = int(snap.name.split("-")[-1])
        rows = [evaluate_scene(snap, sc, work / "curve" / snap.name, clim, 6, threads) for sc in scenes]
        m = merge_rows(rows)
        curve.append({"step": step, "f1": m["fields"]["model"]["f1"],
                      "stage_accuracy": m["growth"]["model"]["stage_accuracy"],
                      "green_up_median_days": m["growth"]["model"]["green_up_median_days"]})
        print(f"  snapshot {step}: {curve[-1]}", flush=True)
    return curve


if __name__ == "__main__":
    main()
