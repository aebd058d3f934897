"""The quickstart's ``report.html``: what was trained, on what, what it predicts and how well, how to redo it."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd

from agrivlm.geo.stack import open_stack
from agrivlm.quickstart.options import QuickstartRun
from agrivlm.report import (
    Section,
    clear_fraction_per_date,
    plot_fields_map,
    plot_stack_overview,
    plot_stage_curves,
    write_report,
)
from agrivlm.resources import stage_config
from agrivlm.train.logs import plot_losses, read_metrics


def _num_parameters(final: Path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(final / "model.safetensors"), framework="pt") as fh:
        for key in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
            total += int(np.prod(fh.get_slice(key).get_shape()))
    return total


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "—"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _q(path: Path | str) -> str:
    return shlex.quote(str(path))


def _stack_args(qs: QuickstartRun) -> str:
    """`` --masks M --assets A --mask-assets B`` as the run used them."""
    masks = f" --masks {_q(qs.masks)}" if qs.masks else ""
    for flag, values in (("--assets", qs.opts.assets), ("--mask-assets", qs.opts.mask_assets)):
        if values:
            masks += f" {flag} {_q(','.join(values))}"
    return masks


def commands(qs: QuickstartRun) -> list[str]:
    """The commands that redo each step by hand (the same steps, the same settings)."""
    out = qs.out
    masks = _stack_args(qs)
    lines = [f"agrivlm ingest {_q(qs.stack)}{masks} --out {_q(out / 'ingest')} --chip-size 32 --stride 16"]
    for s in qs.opts.stages:
        lines.append(f"agrivlm recipe build --recipe {_q(qs.recipe_file(s))} --out {_q(out / 'data' / s)} "
                     f"--seed {qs.opts.seed}")
    for s in qs.opts.stages:
        sets = " ".join(f"--set {_q(f'{k}={json.dumps(v)}')}" for k, v in qs.stage_overrides(s).items())
        lines.append(f"agrivlm train {s} --config {_q(stage_config(s))} {sets}")
    model = out / "train" / "stage3" / "final"
    lines += [
        f"agrivlm infer {_q(qs.stack)}{masks} --model {_q(model)} --preset {qs.opts.preset} --task fields "
        f"--stride 32 --out {_q(out / 'predictions' / 'fields.gpkg')}",
        f"agrivlm infer {_q(qs.stack)}{masks} --model {_q(model)} --preset {qs.opts.preset} --task growth "
        f"--fields {_q(out / 'data' / 'stage3' / 'tables' / 'parcels.gpkg')} --field-id field_id --field-class class "
        f"--out {_q(out / 'predictions' / 'growth.gpkg')}",
        f"agrivlm eval fields --pred {_q(out / 'predictions' / 'fields.gpkg')} --truth "
        f"{_q(out / 'eval' / 'truth_fields.gpkg')} --extent {_q(qs.done('eval')['extent'])} "  # type: ignore[index]
        f"--out {_q(out / 'eval' / 'whole_stack')}  # every chip, training blocks included (the report: held out)",
        f"agrivlm eval growth --pred {_q(out / 'eval' / 'heldout_stages.csv')} --truth "
        f"{_q(out / 'eval' / 'heldout_truth_stages.csv')} --pred-key-dates "
        f"{_q(out / 'eval' / 'pred_key_dates.csv')} --truth-key-dates "
        f"{_q(out / 'eval' / 'truth_key_dates.csv')} --out {_q(out / 'eval' / 'growth')}",
    ]
    return lines


def explore_command(qs: QuickstartRun) -> str:
    """The command that opens the field explorer on this run's outputs."""
    out = qs.out
    masks = _stack_args(qs)
    return (f"agrivlm explore --stack {_q(qs.stack)}{masks} --truth {_q(out / 'eval' / 'truth_fields.gpkg')} "
            f"--truth {_q(out / 'data' / 'stage3' / 'tables' / 'growth_stages.csv')} "
            f"--predictions {_q(out / 'predictions' / 'fields.gpkg')} "
            f"--predictions {_q(out / 'predictions' / 'growth_stages.csv')} "
            f"--model {_q(out / 'train' / 'stage3' / 'final')}")


def _field_frame(stack: Any) -> int:
    """The clearest date of a growing season (May–August), else the clearest date."""
    clear = clear_fraction_per_date(stack)
    months = stack.times.astype("datetime64[M]").astype(int) % 12 + 1
    summer = np.flatnonzero((months >= 5) & (months <= 8))
    pool = summer if summer.size else np.arange(len(clear))
    return int(pool[np.argmax(clear[pool])])


def write_quickstart_report(qs: QuickstartRun) -> Path:
    """Draw the figures beside ``report.html`` and write it; returns its path."""
    out = qs.out
    stack = open_stack(qs.stack, masks=qs.masks, **qs.stack_options)
    ingest = json.loads((out / "ingest" / "summary.json").read_text())
    evals = qs.done("eval") or {}
    finals = {s: qs.final(s) for s in qs.opts.stages}
    n_params = _num_parameters(finals["stage3"])
    train_seconds = sum(float((qs.done(s) or {}).get("seconds", 0.0)) for s in finals)
    total_seconds = sum(float((qs.done(s) or {}).get("seconds", 0.0)) for s in
                        ("ingest", "recipes", *finals, "infer", "eval"))
    minx, miny, maxx, maxy = stack.grid.bounds
    area_km2 = (maxx - minx) * (maxy - miny) / 1e6

    truth = _draw_figures(qs, stack, finals)
    sections = [*_data_sections(qs, stack, ingest, finals), *_result_sections(qs, evals, truth)]
    intro = _intro(qs, ingest, n_params, len(evals.get("heldout_chips") or []), train_seconds, total_seconds,
                   area_km2)
    facts = {"options": json.loads((out / "quickstart.json").read_text())["options"],
             "timings_s": {s: (qs.done(s) or {}).get("seconds") for s in ("ingest", "recipes", *finals, "infer",
                                                                           "eval")},
             "fields_summary": str(out / "eval" / "fields" / "summary.json"),
             "growth_summary": str(out / "eval" / "growth" / "summary.json")}
    return write_report(out / "report.html", "agrivlm quickstart", intro, sections, facts)


def _draw_figures(qs: QuickstartRun, stack: Any, finals: dict[str, Path]) -> gpd.GeoDataFrame:
    """The report's PNGs beside it (drawn, or copied from the evaluation and the recipes); returns the truth."""
    out = qs.out
    plot_stack_overview(stack, out / "stack_dates.png")
    plot_losses({s: read_metrics(f.parent) for s, f in finals.items()}, out / "loss_curves.png")
    truth = gpd.read_file(out / "eval" / "truth_fields.gpkg")
    pred = gpd.read_file(out / "predictions" / "fields.gpkg")
    frame = _field_frame(stack)
    plot_fields_map(stack, frame, truth, pred, out / "fields_map.png",
                    title=f"predicted (magenta) vs true (cyan) fields over {stack.band_names[0]} on "
                          f"{str(stack.times[frame])[:10]}")
    tables = out / "data" / "stage3" / "tables"
    reference = pd.read_csv(tables / "growth_stages.csv", dtype={"field_id": str})
    predicted = pd.read_csv(out / "predictions" / "growth_stages.csv", dtype={"field_id": str})
    parcels = gpd.read_file(tables / "parcels.gpkg", layer="parcels")
    plot_stage_curves(stack, parcels, "field_id", reference, predicted, out / "stage_curves.png")
    for src, name in ((out / "eval" / "growth" / "confusion_matrix.png", "confusion_matrix.png"),
                      (out / "eval" / "fields" / "fields.png", "fields_thresholds.png"),
                      (out / "data" / "stage3" / "plots" / "phenology.png", "phenology.png")):
        if src.is_file():
            shutil.copyfile(src, out / name)
    return truth


def _stack_table(ingest: dict[str, Any]) -> pd.DataFrame:
    """The stack as ingest described it: dates, size, CRS, bounds, chips and masks."""
    return pd.DataFrame({
        "": ["dates", "size", "CRS", "bounds", "chips (32 px, stride 16)", "masks"],
        "value": [f"{ingest['n_dates']}: {ingest['dates'][0][:10]} → {ingest['dates'][-1][:10]}",
                  f"{ingest['n_bands']} band(s) {ingest['band_names']} × {ingest['height']} × {ingest['width']} px",
                  ingest["crs"], ", ".join(f"{b:.1f}" for b in ingest["bounds"]),
                  f"{ingest['chips_kept']} kept, {ingest['chips_skipped_nodata']} skipped",
                  "cloud masks" if ingest["has_masks"] else "none"],
    })


def _train_table(qs: QuickstartRun, finals: dict[str, Path]) -> pd.DataFrame:
    """One row per trained stage: steps, first and last loss, held-out loss, seconds."""
    train_rows = []
    for s in finals:
        info = qs.done(s) or {}
        evals_s = info.get("eval_loss") or []
        train_rows.append({"stage": s, "steps": info.get("steps"), "first loss": _fmt(info.get("first_loss")),
                           "last loss": _fmt(info.get("last_loss")),
                           "held-out loss (first → last)": f"{_fmt(evals_s[0])} → {_fmt(evals_s[-1])}"
                           if evals_s else "—", "seconds": _fmt(info.get("seconds"))})
    return pd.DataFrame(train_rows)


def _field_table(fields_scores: dict[str, Any], baselines: dict[str, Any]) -> pd.DataFrame:
    """The model's and the baselines' object and pixel scores of the field boundaries, one row each."""
    field_rows = [("model", fields_scores), *((name, b) for name, b in (baselines.get("fields") or {}).items())]
    return pd.DataFrame([{"": name, **{k: _fmt(sc.get(k)) for k in
                          ("precision", "recall", "f1", "map_50_95", "mean_iou", "pixel_iou", "tp", "fp", "fn",
                           "n_pred", "n_truth")}} for name, sc in field_rows])


def _growth_row(name: str, sc: dict[str, Any]) -> dict[str, Any]:
    """One row of the growth-stage table: a model's or a baseline's scores per (field, date)."""
    answered = (sc.get("n_pairs") or 0) - (sc.get("n_missing") or 0)
    return {"": name, "accuracy": _fmt(sc.get("accuracy")),
            "accuracy where answered": _fmt(sc.get("n_correct", 0) / answered) if answered else "—",
            "macro-F1": _fmt(sc.get("macro_f1")), "temporal IoU": _fmt(sc.get("temporal_iou")),
            "(field, date) pairs": sc.get("n_pairs"), "missing": sc.get("n_missing")}


def _key_table(growth_scores: dict[str, Any], baselines: dict[str, Any]) -> pd.DataFrame:
    """The key dates' errors in days, the model's beside the climatology's."""
    key = growth_scores.get("key_dates") or {}
    clim_key = ((baselines.get("growth") or {}).get("climatology") or {}).get("key_dates") or {}
    return pd.DataFrame([{"key date": k, "compared": v.get("n_compared"), "missing": v.get("n_missing"),
                          "mean |error| (days)": _fmt(v.get("mean_abs_days")),
                          "median |error| (days)": _fmt(v.get("median_abs_days")),
                          "climatology median |error| (days)": _fmt((clim_key.get(k) or {}).get(
                              "median_abs_days"))} for k, v in key.items()])


def _intro(qs: QuickstartRun, ingest: dict[str, Any], n_params: int, n_held: int, train_seconds: float,
           total_seconds: float, area_km2: float) -> list[str]:
    """The report's opening paragraphs: what was trained, on what, and what the scores are measured on."""
    if qs.opts.start == "default":
        what = ("the shipped default checkpoint (agrivlm train default: a SigLIP-style encoder and a Qwen2-style LM "
                "with small dimensions, trained from random weights on synthetic scenes and the sample's train blocks)"
                f", fine-tuned ({n_params:,} parameters) for {sum(qs.opts.stage_steps().values())} stage-3 steps")
    else:
        base = (f"local checkpoints in {qs.opts.base_model}" if qs.opts.base_model else
                "a real SigLIP vision transformer and a real Qwen2 language model with tiny dimensions, random weights")
        what = (f"{base} ({n_params:,} parameters in all), {sum(qs.opts.stage_steps().values())} optimizer steps over "
                "three stages")
    held = (f"Every score below is measured on the {n_held} chips of 32 px of the recipes' held-out test blocks, "
            "which training never saw, beside simple baselines on the same chips: the whole chip as one field, an "
            "unsupervised segmentation of the NDVI time series, and the day-of-year stage climatology of all other "
            "fields." if n_held else
            "The recipes' test split holds no 32-px chip of this stack, so nothing held out could be scored: give a "
            "larger stack (the split cuts 500 m blocks) for held-out scores.")
    return [
        f"What was trained: {what} in {train_seconds / 60:.1f} minutes on the CPU, on {area_km2:.1f} km² of one "
        f"stack ({ingest['n_dates']} dates). Everything took {total_seconds / 60:.1f} minutes.",
        held,
        "These are the scores this model really gets: they show where a small CPU-trained model stands, not what "
        "agrivlm reaches with pretrained weights and real training.",
    ]


def _data_sections(qs: QuickstartRun, stack: Any, ingest: dict[str, Any], finals: dict[str, Path]) -> list[Section]:
    """The sections on what went in: the stack, the instruction data and the training."""
    out = qs.out
    return [
        Section("The stack", [f"{stack.band_names[0]} stack from {qs.stack}."], [
            ("stack_dates.png", "clear-sky fraction of every date (cloud masks)")], [("stack", _stack_table(ingest))]),
        Section("Instruction data and phenology", [
            "Recipes turn the stack and the parcels into question–answer records; growth stages come from each "
            "parcel's cloud-masked, gap-filled, Savitzky–Golay-smoothed NDVI curve (amplitude thresholds)."],
            [("phenology.png", "NDVI curves of a few parcels with their derived stage dates")]
            if (out / "phenology.png").is_file() else []),
        Section("Training: " + " → ".join(finals), [
            "Stage 1 aligns vision and language (projector and band adapter; LAPE off), stage 2 switches LAPE on "
            "with smart init and its own warm-up, stage 3 fine-tunes on the agricultural tasks"
            + (" (here from the default checkpoint, which went through all three)." if qs.opts.start == "default"
               else ".")],
            [("loss_curves.png", "loss curves of the trained stages (main, position and total losses)")],
            [("stages", _train_table(qs, finals))]),
    ]


def _result_sections(qs: QuickstartRun, evals: dict[str, Any], truth: gpd.GeoDataFrame) -> list[Section]:
    """The sections on what came out: field boundaries, growth stages, and the commands to redo and explore."""
    fields_scores, growth_scores = evals.get("fields") or {}, evals.get("growth") or {}
    baselines = evals.get("baselines") or {}
    field_table = _field_table(fields_scores, baselines)
    growth_table = pd.DataFrame([_growth_row("model", growth_scores)] + [
        _growth_row(name, b or {}) for name, b in (baselines.get("growth") or {}).items()])
    key_table = _key_table(growth_scores, baselines)
    infer = qs.done("infer") or {}
    fi, gi = infer.get("fields", {}), infer.get("growth", {})
    return [
        Section("Field boundaries", [
            f"{fi.get('features', 0)} fields predicted ({fi.get('features_before_nms', 0)} outlines before merging "
            f"duplicates), {fi.get('unparsed', 0)} of {fi.get('questions', 0)} answers unparsed; truth: "
            f"{len(truth)} parcels of the classes the recipes outline ({', '.join(sorted(set(truth['class'])))})."
            if "class" in truth else ""],
            [("fields_map.png", "predicted vs true field boundaries"),
             ("fields_thresholds.png", "precision / recall / F1 over IoU thresholds")],
            [("held-out object and pixel scores, chip by chip (FTW definitions; map_50_95 = mean over IoU 0.50:0.95 "
              "of TP/(TP+FP+FN))", field_table)]),
        Section("Growth stages", [
            f"{gi.get('stage_rows', 0)} (field, date) stages predicted from {gi.get('questions', 0)} questions "
            f"({gi.get('unparsed', 0)} answers named no stage); reference: the stages derived from the NDVI curves. "
            "The model sees as many frames per question as in training, and is asked about those dates only: "
            "reference dates it was not asked about count as missing (wrong) in the accuracy."],
            [("stage_curves.png", "field NDVI with reference (●) and predicted (▲) stages per date"),
             ("confusion_matrix.png", "confusion matrix of the stages")],
            [("held-out stages per (field, date)", growth_table),
             ("held-out key dates (first date of each stage per season)", key_table)]),
        Section("Redo each step by hand", ["The same steps with the same settings:"], commands=commands(qs)),
        Section("Look at it on a map", ["Open the field explorer on these outputs:"], commands=[explore_command(qs)]),
    ]
