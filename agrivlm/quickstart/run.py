"""``agrivlm quickstart``: the whole system on one stack, from GeoTIFFs to a report with maps.

ingest the stack → build the curriculum's instruction data (recipes) → fine-tune the shipped default checkpoint
(stage 3; ``start="scratch"``: train stage 1 → 2 → 3 of the tiny model or of ``--base-model``) → ``infer`` fields
and growth stages on the stack → ``eval`` on the recipes' held-out test blocks only, beside the whole-chip,
segmentation and day-of-year-climatology baselines on the same chips → ``report.html`` with the PNGs beside it.

Every step writes into its own folder under ``--out`` and, last, a marker ``DIR/.quickstart/<step>.json``
with what it made. A second run skips the steps whose marker exists (same options), resumes a training
stage from its newest checkpoint and an inference run from its journal, and redoes only what is missing.
Options that change the results (stack, parcels, steps, base model, seed) are recorded in
``DIR/quickstart.json``; a run with other options into the same folder is refused (``--restart`` starts over).

The embedded default is honest about its scale: a small model (a real SigLIP + Qwen2 with small dimensions,
trained here from random weights on synthetic scenes, ``agrivlm train default``) fine-tuned for minutes on 1 km²
of one Sentinel-2 tile. The report shows the scores it really gets on the blocks it was not trained on.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from agrivlm.errors import ConfigError
from agrivlm.geo.grid import CHIP_SIZE
from agrivlm.geo.remote import is_remote
from agrivlm.io import write_json
from agrivlm.quickstart.options import STEPS, QuickstartOptions
from agrivlm.quickstart.report import write_quickstart_report
from agrivlm.resources import package_file, recipe, stage_config

log = logging.getLogger(__name__)

#: Chip size of the recipes, of ingest and of the held-out scoring grid: the package's chip grid.
CHIP = CHIP_SIZE
#: Land-use classes the field-boundary recipes outline (and the evaluation counts as fields).
FIELD_CLASSES = ("cultivated land", "grassland")


def _absolute(spec: str) -> str:
    """A local folder/file as an absolute path; a glob or a remote address as given."""
    if is_remote(spec) or any(c in spec for c in "*?["):
        return spec
    return str(Path(spec).resolve())


class Quickstart:
    """One quickstart run into ``out`` (see the module docstring)."""

    def __init__(self, out: str | os.PathLike[str], options: QuickstartOptions, progress: bool = True,
                 echo: Callable[[str], None] = print) -> None:
        self.out = Path(out).resolve()
        self.opts = options
        self.progress = progress
        self.echo = echo
        self.state = self.out / ".quickstart"
        self.timings: dict[str, float] = {}

    # -- sources ---------------------------------------------------------------------------------------
    @property
    def stack(self) -> str:
        """The stack's path (folder or glob)."""
        from agrivlm.sample import sample_ndvi_dir

        return self.opts.stack or str(sample_ndvi_dir())

    @property
    def stack_options(self) -> dict[str, Any]:
        """The STAC settings of the stack, as ``open_stack``/``ingest``/``run_inference`` keywords."""
        return {"assets": list(self.opts.assets) if self.opts.assets else None,
                "mask_assets": list(self.opts.mask_assets) if self.opts.mask_assets else None}

    @property
    def masks(self) -> str | None:
        """The stack's mask files, if any."""
        from agrivlm.sample import sample_cloud_mask_dir

        if self.opts.stack is None:
            return str(sample_cloud_mask_dir())
        return self.opts.masks

    @property
    def parcels(self) -> str:
        """The parcel layer."""
        from agrivlm.sample import sample_parcels

        return self.opts.parcels or str(sample_parcels())

    def path(self, *parts: str) -> Path:
        """A path under the output folder."""
        return self.out.joinpath(*parts)

    def final(self, stage: str) -> Path:
        """The final model folder of a training stage."""
        return self.path("train", stage, "final")

    # -- bookkeeping ---------------------------------------------------------------------------------------
    def _check_options(self, fresh: bool) -> None:
        if self.opts.start == "default":
            from agrivlm.default_checkpoint import default_model_path
            from agrivlm.infer.prepare import channels_of
            from agrivlm.pipeline.inputs import BandConfig, InputConfig, load_input_config

            wanted = channels_of(InputConfig(bands=BandConfig(preset=self.opts.preset)))
            have = channels_of(load_input_config(default_model_path())[0])
            if wanted != have:
                raise ConfigError(f"--preset {self.opts.preset} gives {wanted} channel(s) per frame but the default "
                                  f"checkpoint reads {have}: pass --start scratch to train a model for these bands")
        record = self.path("quickstart.json")
        mine = json.loads(json.dumps(asdict(self.opts)))  # as the record reads back (tuples as lists)
        if fresh and self.out.exists():
            for child in ("ingest", "data", "recipes", "train", "predictions", "eval", ".quickstart"):
                if self.path(child).exists():
                    shutil.rmtree(self.path(child))
        if record.is_file() and not fresh:
            # an option the record lacks (written before the option existed) had its default value
            theirs = {**json.loads(json.dumps(asdict(QuickstartOptions()))),
                      **json.loads(record.read_text()).get("options", {})}
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            if diff:
                raise ConfigError(
                    f"{self.out}: made by a quickstart with other options ({', '.join(diff)}); use another --out, "
                    "or --restart to start over there"
                )
        self.out.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"options": mine}, indent=2))

    def done(self, step: str) -> dict[str, Any] | None:
        """The marker of a finished step, or None."""
        marker = self.state / f"{step}.json"
        return json.loads(marker.read_text()) if marker.is_file() else None

    def _mark(self, step: str, info: dict[str, Any]) -> None:
        write_json(self.state / f"{step}.json", info, trailing_newline=False)

    # -- steps -------------------------------------------------------------------------------------------
    def step_ingest(self) -> dict[str, Any]:
        """Validate and chip the stack; the chip index and summary."""
        from agrivlm.geo.ingest import ingest

        summary = ingest(self.stack, self.path("ingest"), chip_size=32, stride=16, masks=self.masks,
                         overwrite=True, progress=self.progress, **self.stack_options)
        return {"summary": str(self.path("ingest", "summary.json")), "chips": summary["chips_kept"],
                "dates": summary["n_dates"]}

    def recipe_file(self, stage: str) -> Path:
        """The recipe of a stage's data: the shipped one, or one over it pointing at the user's data."""
        base = recipe(stage)
        if self.opts.stack is None and self.opts.parcels is None:
            return base
        source: dict[str, Any] = {
            "stack": _absolute(self.stack),
            "masks": _absolute(self.masks) if self.masks else None,
            **{k: v for k, v in self.stack_options.items() if v},
            "parcels": str(Path(self.parcels).resolve()),
            "id_column": self.opts.parcel_id, "class_column": self.opts.parcel_class,
            "class_names": {}, "class_raster": None,
        }
        path = self.path("recipes", f"{stage}.yaml")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump({"extends": str(base), "source": source}, sort_keys=False))
        return path

    def step_recipes(self) -> dict[str, Any]:
        """Instruction data of the three stages (shards, manifests, derived phenology tables)."""
        from agrivlm.recipes.build import build_recipe

        counts = {}
        for s in self.opts.stages:
            manifest = build_recipe(self.recipe_file(s), self.path("data", s), seed=self.opts.seed,
                                    overwrite=True, progress=False)
            counts[s] = manifest.get("counts", {})
        return {"data": str(self.path("data")), "counts": counts}

    def stage_overrides(self, stage: str) -> dict[str, Any]:
        """The dotted-key overrides of a training stage's config."""
        steps = self.opts.stage_steps()[stage]
        over: dict[str, Any] = {
            "output_dir": str(self.path("train", stage)),
            "data.roots": [str(self.path("data", stage))],
            "data.normalize.preset": self.opts.preset,
            "train.max_steps": steps,
            "train.save_every": max(steps // 4, 1),
            "train.eval_every": max(steps // 2, 1),
            "train.seed": self.opts.seed,
            "train.torch_threads": 1,
            "train.progress": self.progress,
        }
        if stage == "stage1":
            # the stage-1 config names its model YAML relative to a checkout's root: the packaged file instead
            shipped = yaml.safe_load(stage_config("stage1").read_text())["model"]["config"]
            over["model.config"] = str(package_file(shipped))
        if stage == "stage1" and self.opts.base_model:
            base = Path(self.opts.base_model)
            over["model.overrides"] = {"vision": {"checkpoint": str(base / "vision")},
                                       "llm": {"checkpoint": str(base / "llm")}}
        if stage == "stage3" and self.opts.start == "default":
            from agrivlm.default_checkpoint import default_model_path
            from agrivlm.pipeline.inputs import load_input_config

            base = default_model_path()
            inputs, _ = load_input_config(base)
            over["model.init_from"] = str(base)
            # the default's own inputs (frames per question) and what it trained: everything, from random weights
            over["data.frames.num_frames"] = inputs.min_frames
            over["trainable.llm.mode"] = "full"
            over["trainable.vision"] = True
            over["optim.lr"] = 1e-3
            return over
        if stage != "stage1":
            over["model.init_from"] = str(self.final("stage1" if stage == "stage2" else "stage2"))
        if stage == "stage3" and not self.opts.base_model:
            # A tiny LLM with random weights has nothing for LoRA to adapt: train it fully.
            over["trainable.llm.mode"] = "full"
            over["optim.lr"] = 3e-3
        return over

    def run_training(self, stage: str) -> dict[str, Any]:
        """Train one stage, resuming from its newest checkpoint when an earlier run was cut short."""
        from agrivlm.train.checkpoint import latest_checkpoint
        from agrivlm.train.logs import read_metrics
        from agrivlm.train.trainer import run_stage

        config = stage_config(stage)
        resume = latest_checkpoint(self.path("train", stage, "checkpoints")) is not None
        overwrite = not resume and self.path("train", stage).exists()
        final = run_stage(config, self.stage_overrides(stage), stage=stage, resume=resume, overwrite=overwrite)
        rows = read_metrics(final.parent)
        losses = [r["loss"] for r in rows if "loss" in r]
        evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
        return {"final": str(final), "steps": len(losses), "first_loss": losses[0] if losses else None,
                "last_loss": losses[-1] if losses else None, "eval_loss": evals, "resumed": resume}

    def step_infer(self) -> dict[str, Any]:
        """Fields and growth stages predicted on the stack by the stage-3 model."""
        from agrivlm.infer.batch import run_inference

        model = self.final("stage3")
        masks = [self.masks] if self.masks else None
        preset = {"bands.preset": self.opts.preset}
        # fields chip by chip without overlap: the held-out scores judge each chip's own answers
        fields = run_inference([self.stack], model, self.path("predictions", "fields.gpkg"), task="fields",
                               masks=masks, overrides={**preset, "stride": CHIP}, batch_size=36, overwrite=True,
                               progress=self.progress, **self.stack_options)
        growth = run_inference([self.stack], model, self.path("predictions", "growth.gpkg"), task="growth",
                               masks=masks, overrides=preset, fields=self.path("data", "stage3", "tables",
                                                                               "parcels.gpkg"),
                               field_id="field_id", field_class="class", batch_size=32, overwrite=True,
                               progress=self.progress, **self.stack_options)
        for report in (fields, growth):
            if report.failed:
                raise ConfigError(f"inference failed on {report.failed[0].name}: {report.failed[0].message}")
        return {"fields": fields.to_dict(), "growth": growth.to_dict()}

    def heldout_chips(self, stack: Any) -> Any:
        """The 32-px chips (non-overlapping grid) of the recipes' test blocks of ``stack``: never trained on."""
        from agrivlm.eval.heldout import chip_grid

        manifest = json.loads(self.path("data", "stage3", "manifest.json").read_text())
        test = set(manifest["chips"]["by_split"]["test"])
        chips = chip_grid(stack, CHIP, CHIP)
        return chips[chips.chip_id.isin(test)].reset_index(drop=True)

    def step_eval(self) -> dict[str, Any]:
        """Scores on the held-out test blocks only, beside baselines on the same chips and fields.

        Fields: each held-out chip's answers against the parcels of the outlined classes clipped to it
        (:func:`agrivlm.eval.heldout.evaluate_chipwise`), beside the whole chip as one field and a Felzenszwalb
        segmentation of the NDVI time series (needs scikit-image). Growth: the stages of the fields inside the
        held-out chips on the dates the model was asked about, against the stages derived from their NDVI curves,
        beside the day-of-year climatology of every other field of the stack on the same (field, date) pairs.
        """
        import geopandas as gpd

        from agrivlm.geo.stack import open_stack, resolve_inputs

        tables = self.path("data", "stage3", "tables")
        parcels = gpd.read_file(tables / "parcels.gpkg", layer="parcels")
        truth = parcels[parcels["class"].isin(FIELD_CLASSES)] if "class" in parcels else parcels
        truth_path = self.path("eval", "truth_fields.gpkg")
        truth_path.parent.mkdir(parents=True, exist_ok=True)
        truth.to_file(truth_path, layer="fields", driver="GPKG")
        extent = resolve_inputs(self.stack, assets=self.stack_options["assets"])[0]
        stack = open_stack(self.stack, masks=self.masks, **self.stack_options)
        chips = self.heldout_chips(stack)
        chips.to_file(self.path("eval", "heldout_chips.gpkg"), driver="GPKG")
        info: dict[str, Any] = {"truth_fields": str(truth_path), "extent": str(extent),
                                "heldout_chips": chips.chip_id.tolist(), "fields": None, "growth": None,
                                "baselines": {}}
        if chips.empty:
            return info
        info["fields"], info["baselines"]["fields"] = self._eval_fields(truth, chips, stack, extent)
        growth = self._eval_growth(truth, chips, tables)
        if growth is not None:
            info["growth"], info["baselines"]["growth"] = growth
        return info

    def _eval_fields(self, truth: Any, chips: Any, stack: Any, extent: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """The model's field scores on the held-out chips (report in ``eval/fields``), and the baselines'."""
        import geopandas as gpd

        from agrivlm.errors import EvalError
        from agrivlm.eval import write_field_report
        from agrivlm.eval.heldout import evaluate_chipwise, segmentation_baseline, whole_chip_baseline

        pred = gpd.read_file(self.path("predictions", "fields.gpkg"))
        pred = pred[pred.chip_id.isin(chips.chip_id)]
        fields = evaluate_chipwise(pred, truth, chips, truth_id="field_id", extent=extent)
        write_field_report(fields, self.path("eval", "fields"), overwrite=True)
        scores = fields.to_dict()
        baselines = {"whole chip": evaluate_chipwise(whole_chip_baseline(chips), truth, chips, truth_id="field_id",
                                                     extent=extent).to_dict()}
        try:
            seg = segmentation_baseline(stack, chips)
            baselines["segmentation"] = evaluate_chipwise(seg, truth, chips, truth_id="field_id",
                                                          extent=extent).to_dict()
        except EvalError as exc:
            log.info("segmentation baseline left out: %s", exc)
        return scores, baselines

    def _eval_growth(self, truth: Any, chips: Any, tables: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The model's growth scores on the held-out fields (report in ``eval/growth``), and the climatology's.

        ``None`` when no held-out field has both predicted and reference stages.
        """
        import pandas as pd

        from agrivlm.eval import evaluate_growth, key_dates_from_stages, write_growth_report
        from agrivlm.eval.heldout import predict_climatology, stage_climatology

        # growth: fields inside the held-out chips, against the climatology of all the other fields
        inside = truth[truth.intersects(chips.union_all())]
        held = set(inside["field_id"].astype(str))
        ref = pd.read_csv(tables / "growth_stages.csv", dtype=str, keep_default_na=False)
        pred_st = pd.read_csv(self.path("predictions", "growth_stages.csv"), dtype=str, keep_default_na=False)
        pred_st = pred_st[pred_st.field_id.isin(held)].drop_duplicates(["field_id", "date"])
        held_ref = ref[ref.field_id.isin(held)]
        if pred_st.empty or held_ref.empty:
            return None
        classes = dict(zip(truth["field_id"].astype(str), truth["class"].astype(str), strict=True)) \
            if "class" in truth else {}
        clim = stage_climatology([ref[~ref.field_id.isin(held)]], classes=classes)
        # the (field, date) pairs the model was asked about: the same pairs for the model and the baseline
        asked = held_ref.merge(pred_st[["field_id", "date"]], on=["field_id", "date"])
        pred_path, truth_st = self.path("eval", "heldout_stages.csv"), self.path("eval", "heldout_truth_stages.csv")
        pred_st[["field_id", "date", "stage"]].to_csv(pred_path, index=False)
        asked.to_csv(truth_st, index=False)
        pred_keys, truth_keys = self.path("eval", "pred_key_dates.csv"), self.path("eval", "truth_key_dates.csv")
        key_dates_from_stages(pred_path).to_csv(pred_keys, index=False)
        key_dates_from_stages(truth_st).to_csv(truth_keys, index=False)
        growth = evaluate_growth(pred_path, truth_st, pred_key_dates=pred_keys, truth_key_dates=truth_keys)
        write_growth_report(growth, self.path("eval", "growth"), overwrite=True)
        scores = growth.to_dict()
        calendar = predict_climatology(asked, clim, classes=classes)
        climatology = evaluate_growth(calendar, asked, pred_key_dates=key_dates_from_stages(calendar),
                                      truth_key_dates=key_dates_from_stages(asked)).to_dict()
        return scores, {"climatology": climatology}

    def step_report(self) -> dict[str, Any]:
        """``report.html`` and its PNGs."""
        path = write_quickstart_report(self)
        return {"report": str(path)}

    # -- driver ---------------------------------------------------------------------------------------------
    def run(self, fresh: bool = False) -> Path:
        """Run (or finish) every step; returns the report's path."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._check_options(fresh)
        actions: dict[str, Callable[[], dict[str, Any]]] = {
            "ingest": self.step_ingest, "recipes": self.step_recipes,
            "stage1": lambda: self.run_training("stage1"), "stage2": lambda: self.run_training("stage2"),
            "stage3": lambda: self.run_training("stage3"), "infer": self.step_infer, "eval": self.step_eval,
            "report": self.step_report,
        }
        labels = {
            "ingest": "ingest the stack", "recipes": "build the instruction data",
            **{s: f"train {s} ({n} steps)" for s, n in self.opts.stage_steps().items()},
            "infer": "predict fields and growth stages", "eval": "evaluate", "report": "write the report",
        }
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), disable=not self.progress, transient=False) as bar:
            overall = bar.add_task("quickstart", total=len(STEPS))
            say = bar.console.print if self.progress else self.echo
            for step in STEPS:
                if step.startswith("stage") and step not in self.opts.stages:
                    say(f"– train {step} (skipped: fine-tuning the default checkpoint, agrivlm train default)")
                    bar.advance(overall)
                    continue
                bar.update(overall, description=f"quickstart: {labels[step]}")
                if self.done(step) is not None and step != "report":
                    say(f"✓ {labels[step]} (done earlier, kept)")
                    bar.advance(overall)
                    continue
                start = time.perf_counter()
                info = actions[step]()
                info["seconds"] = round(time.perf_counter() - start, 2)
                self.timings[step] = info["seconds"]
                self._mark(step, info)
                say(f"✓ {labels[step]} ({info['seconds']:.0f} s)")
                bar.advance(overall)
        return self.path("report.html")
