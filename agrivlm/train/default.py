"""``agrivlm train default``: the shipped default checkpoint, made from the project's own data in one command.

1. **scenes** — `agrivlm synth` scenes of the training regions (``central_europe``, ``pannonian``,
   ``mato_grosso``; ``corn_belt`` is left out, so ``benchmarks/learning.py`` can test a region never seen),
   seeds ``0 … scenes_per_region − 1`` (held-out evaluation scenes use seeds ≥ 9000);
2. **recipes** — the three curriculum stages over every scene (whole scenes per split; stages and key dates
   from ``truth/``) plus the embedded real sample's **train blocks** (its test blocks stay unseen:
   ``benchmarks/learning.py``'s ``real_test_block``);
3. **training** — stage 1 (alignment) → 2 (LAPE warm-up) → 3 (agricultural fine-tune) of
   ``configs/model/small.yaml``, with HF snapshots of stage 3 every ``snapshot_every`` steps for the learning
   curve. Stage 3 opens with a short *focus* phase (``stage3_focus``: the stage-3 config on the growth-stage
   questions alone, ``data_recipes/synthetic_stage3_focus.yaml``) before its mixture (see :data:`PHASES`); a
   closing *fields* phase (``stage3_fields``, off by default: ``--fields-steps``) can follow;
4. **card** — the final folder gets ``README.md`` (data, steps, time) and ``default_training.json``.

``--install`` copies the final folder into ``agrivlm/default_model`` (weights in float16 safetensors),
what ``--model default`` loads. Every step is seeded; a rerun with the same options trains the same model
(bit-identical on the same machine and thread count).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from agrivlm import resources
from agrivlm.default_checkpoint import DEFAULT_MODEL_DIR
from agrivlm.errors import ConfigError

if TYPE_CHECKING:
    from agrivlm.recipes.config import SplitName

#: Regions the default checkpoint trains on (``corn_belt`` is the held-out region).
TRAIN_REGIONS: tuple[str, ...] = ("central_europe", "pannonian", "mato_grosso")
#: Seeds of evaluation scenes start here; training seeds stay below.
HELDOUT_SEED_START = 9000
#: The training phases in order, each with its stage config (``configs/<stage>.yaml``). ``stage3_focus`` is the
#: start of stage 3 on the growth-stage questions alone (today the stage timeline, ``stage_timeline``, with
#: ``data.growth_focus: box``; the figures below are of the date-by-date questions it replaced): a stage 3
#: that mixed them with the field outlines from
#: the start scored held-out stage accuracy 0.31 (climatology 0.56), and 1,000 more steps of mostly stage
#: questions from there did not help (that model answered "dormant" to every stage question, on training and
#: held-out scenes; teacher-forced first-token accuracy 0.30 on the fine-tune's validation records), while
#: 1,500 steps of stage questions alone from stage 2 reached 0.56-0.57 on held-out scenes (0.55 teacher-forced
#: on the same validation records). A phase with 0 steps is skipped.
#: How the recipes (and the encoder phase) deal the training scenes to splits.
SYNTH_SPLIT: dict[SplitName, float] = {"train": 0.9, "val": 0.1, "test": 0.0}
PHASES: dict[str, str] = {"stage1": "stage1", "stage2": "stage2", "stage3_focus": "stage3", "stage3": "stage3",
                          "stage3_fields": "stage3"}


@dataclass(frozen=True)
class DefaultTraining:
    """The recipe of the default checkpoint (recorded in ``default_training.json``)."""

    # 60, not 20: more scenes for the same steps overfit less. Measured with the tiny model on field_at_point
    # alone (Pannonian, F1@0.5 on two held-out scenes): 10 scenes, 1,500 steps 0.29 / 0.17; 10 scenes, 3,000
    # steps 0.20 / 0.09 (overfitted, training position loss 0.93); 40 scenes, 6,000 steps 0.33 / 0.17, and 0.00
    # on constant frames (0.11 / 0.07 for the 10-scene model: less answered from the point alone)
    scenes_per_region: int = 60
    area_km2: float = 1.0
    start: str = "2021-01-01"
    end: str = "2021-12-31"
    model_config: str = "configs/model/small.yaml"
    # stage 3 of 4,500 steps (after the 1,500-step focus phase) then a closing fields phase of 4,000 steps
    # (stage3_fields: the field at a point with the growth timeline replayed, data_recipes/
    # synthetic_stage3_fields.yaml), both with six point questions per conversation (points_per_record below), made
    # the shipped checkpoint: about 55 minutes of optimizer steps on 2 CPU cores alone. Measured by
    # benchmarks/learning.py --quick against the checkpoint it replaced (stage 3 alone, one point per record):
    # held-out field F1@0.5 0.112 against 0.040 (whole chip 0.034), left-out region 0.275 against 0.239; stage
    # accuracy 0.586 / 0.618 / 0.851 against 0.572 / 0.603 / 0.759 (held-out / left-out / real block); green-up
    # and peak median errors 2-5 days worse on the synthetic sets (24 / 31 against 22 / 26 on held-out scenes).
    # Before: 5,000 fields steps after a one-point stage 3 gave F1 0.055-0.077 but lost real-block stage accuracy
    # (0.759 → 0.636-0.667, benchmarks/results/learning_fields_candidate*.json); six points in stage 3 alone gave
    # F1 0.034 (learning_points6_candidate.json). Retrained with these options once times ran on the season
    # windows (pipeline.frames.frame_time_positions), about 35 minutes of steps: held-out stage accuracy 0.689,
    # green-up / peak 7.5 / 15 days, F1 0.123; left-out region stage accuracy 0.532 (0.618 before), real block
    # 0.803 (0.851); retrained again with timeline_dates: season (below), the shipped checkpoint since
    steps: dict[str, int] = field(default_factory=lambda: {"stage1": 150, "stage2": 600, "stage3_focus": 1500,
                                                           "stage3": 4500, "stage3_fields": 4000})
    batch_size: int = 8
    #: Frames per sample in stages 2 and 3 (8 dates resolve a season's stages; 4 in stage 1, captions).
    num_frames: int = 8
    # stage 3 at 1e-3: with 2e-3 the same data gave held-out F1@0.5 0.023 (every point answered with the
    # whole chip), with 1e-3 0.094 (constant frames 0.019; benchmarks/results/learning_candidate.json)
    lr: dict[str, float] = field(default_factory=lambda: {"stage1": 1e-3, "stage2": 1e-3, "stage3_focus": 1e-3,
                                                          "stage3": 1e-3})
    snapshot_every: int = 1500
    #: ``data.growth_focus`` of the stage-3 phases (growth questions see only their field's box).
    growth_focus: str = "box"
    #: ``data.point_marker`` of the stage-3 phases (``square``: a point question's point drawn into its frames).
    point_marker: str = "none"
    #: ``field_at_point`` questions per conversation in the stage-3 recipes (every answer supervised; 1: one
    #: record per point). Six: a fields probe left the position-loss plateau sooner (2.67 against 2.87 nats at
    #: steps 400-440) and reached pooled held-out F1 0.148 in 3,000 steps (one point: 0.126 in 5,000).
    points_per_record: int = 6
    #: ``growth_stages.timeline_dates`` of the stage-3 recipes (``season``: a timeline's spans over every
    #: acquisition of the season; ``frames``: over the record's frames, spans start up to a frame gap late).
    #: ``season`` made the shipped checkpoint (the same options otherwise, 35 minutes of steps); by
    #: ``benchmarks/learning.py --quick`` against the ``frames`` checkpoint it replaced, held-out / left-out region /
    #: real block: stage accuracy 0.702 / 0.627 / 0.803 (0.689 / 0.532 / 0.803), green-up · peak · senescence
    #: median 8.1 · 11 · 13 / 23 · 16 · 7.5 / 0 · 20 · 0 days (7.5 · 15 · 18 / 28 · 28 · 19 / 5 · 5 · 50), field
    #: F1@0.5 0.127 / 0.369 / 0 (0.123 / 0.291 / 0)
    timeline_dates: Literal["frames", "season"] = "season"
    #: Steps of the encoder's dense pre-training before stage 1 (:mod:`agrivlm.train.encoder`: FTW's three
    #: classes and each pixel's field extent from the pooled visual tokens, on the training scenes; 0: stage 1
    #: starts a random encoder). Off: on the fields task alone (tiny model, 4,000 steps, 2 seeds; benchmarks/
    #: encoder_pretrain.py) pooled held-out F1@0.5 0.075 ± 0.006 from it against 0.077 ± 0.049 from a random
    #: encoder (0.106 ± 0.011 with it frozen), the same training position loss (2.97-3.08) in every run
    encoder_steps: int = 0
    #: Stage 3 trains the vision encoder (False: it stays as stage 1 started it; with ``encoder_steps`` the
    #: pre-trained one, which on the fields task alone gave 0.106 ± 0.011 frozen against 0.075 ± 0.006 trained on).
    train_vision: bool = True
    #: ``lape.point_features`` of the model (the feature under each question point added to its height token;
    #: with a pre-trained frozen encoder 0.130 ± 0.011 on the fields task alone, from a random one 0.058 ± 0.011).
    point_features: bool = False
    threads: int = 2
    seed: int = 0


def phases(opts: DefaultTraining) -> list[str]:
    """The phases of :data:`PHASES` that ``opts`` gives steps (stages 1-3 always; ``stage3_focus`` when > 0)."""
    for stage in ("stage1", "stage2", "stage3"):
        if opts.steps.get(stage, 0) <= 0:
            raise ConfigError(f"default training: {stage} needs steps > 0, got {opts.steps.get(stage)}")
    return [p for p in PHASES if opts.steps.get(p, 0) > 0]


def make_scenes(out: Path, opts: DefaultTraining, echo: Callable[[str], None]) -> list[Path]:
    """The training scenes (kept when already written with the same spec)."""
    from agrivlm.synth import SceneSpec, write_scene

    scenes = []
    for region in TRAIN_REGIONS:
        start, end = (opts.start, opts.end)
        if region == "mato_grosso":  # a southern season window: August to July
            start, end = f"{opts.start[:4]}-08-01", f"{int(opts.start[:4]) + 1}-07-31"
        for seed in range(opts.scenes_per_region):
            folder = out / f"{region}_{seed:03d}"
            spec = SceneSpec(region=region, area_km2=opts.area_km2, seed=seed, start=start, end=end)
            if (folder / "scene.json").is_file():
                if json.loads((folder / "scene.json").read_text())["spec"] == json.loads(json.dumps(asdict(spec))):
                    scenes.append(folder)
                    continue
            write_scene(folder, spec, overwrite=True)
            scenes.append(folder)
        echo(f"scenes: {region} × {opts.scenes_per_region}")
    return scenes


def recipe_text(stage: str, scenes_glob: str, opts: DefaultTraining) -> str:
    """The recipe of one stage over the scenes and the sample's train blocks (YAML text)."""
    base = yaml.safe_load(resources.recipe(f"synthetic_{stage}").read_text())
    sample = yaml.safe_load(resources.recipe("sample_base").read_text())
    src = dict(sample["source"])  # sample: specs resolve inside the package wherever the recipe lies
    # the sample keeps its geographic blocks (the recipe's split: below): its test blocks are never trained on
    src.update(name="sample", weight=0.2)
    recipe = {
        "name": f"default_{stage}",
        "description": f"the default checkpoint's {stage}: synthetic scenes + the sample's train blocks",
        "seed": opts.seed,
        "sources": [
            {"name": "synth", "synth": scenes_glob, "weight": 0.8,
             "split": {"fractions": SYNTH_SPLIT, "seed": opts.seed}},
            src,
        ],
        "chips": {**sample["chips"], "stride": 16},
        "split": sample["split"],
        "phenology": {"min_pixels": 6},
        "tasks": _stage_tasks(base["tasks"], stage, opts),
        # as many training samples as the stage's steps draw (the shipped recipes draw 2,000, sized for the
        # 1 km² sample: 60 scenes hold tens of thousands of records, and 2,000 were memorised within a few
        # epochs; max_unique stops at what the smallest pool allows, about 4,000): small pools repeat
        "mixture": {**base["mixture"], "samples": {"train": opts.steps[stage] * opts.batch_size,
                                                   "val": "max_unique", "test": "max_unique"}}
        if base.get("mixture") else None,
        "output": {"shard_size": 5000, "plot_parcels": 1},
    }
    return yaml.safe_dump(recipe, sort_keys=False)


def _stage_tasks(tasks: dict[str, Any], stage: str, opts: DefaultTraining) -> dict[str, Any]:
    """A recipe's tasks with the stage-3 options (stages 1-2: as is).

    ``field_at_point`` asked ``opts.points_per_record`` points per conversation (one: as is); stage timelines
    over ``opts.timeline_dates``.
    """
    if PHASES[stage] != "stage3":
        return tasks
    out = dict(tasks)
    fields, growth = tasks.get("field_boundaries"), tasks.get("growth_stages")
    if opts.points_per_record != 1 and fields is not None:
        out["field_boundaries"] = {**fields, "points_per_record": opts.points_per_record}
    if growth is not None:  # written out, so the recipe keeps its rule whatever the recipes' default becomes
        out["growth_stages"] = {**growth, "timeline_dates": opts.timeline_dates}
    return out


def build_data(out: Path, scenes_dir: Path, opts: DefaultTraining, echo: Callable[[str], None]) -> dict[str, Path]:
    """Recipes of the three stages → ``out/data/<stage>`` (kept when already built)."""
    from agrivlm.recipes.build import build_recipe

    roots = {}
    for stage in phases(opts):
        path = out / "recipes" / f"{stage}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = recipe_text(stage, f"{scenes_dir.resolve()}/*", opts)
        data = out / "data" / stage
        if not (data / "manifest.json").is_file() or not path.is_file() or path.read_text() != text:
            path.write_text(text)
            build_recipe(path, data, overwrite=True, progress=False)
        roots[stage] = data
        echo(f"data: {stage} built")
    return roots


def phase_overrides(stage: str, opts: DefaultTraining, data: Path, folder: Path, prev: Path | None) -> dict[str, Any]:
    """The ``--set`` keys of one phase (over ``configs/<PHASES[stage]>.yaml``): data, steps, model source.

    ``prev``: the previous phase's final folder; None after stage 1 means the stages before were skipped, so this
    one builds its model from the model YAML (``benchmarks/ablations.py``'s curriculum ablation).
    """
    n = opts.steps[stage]
    over: dict[str, Any] = {
        "output_dir": str(folder), "data.roots": [str(data)], "train.max_steps": n,
        "train.batch_size": opts.batch_size, "train.save_every": max(n // 6, 1),
        "train.eval_every": max(n // 4, 1), "train.seed": opts.seed, "train.torch_threads": opts.threads,
        "train.progress": False, "optim.lr": opts.lr.get(stage, opts.lr[PHASES[stage]]),
    }
    if stage == "stage1" or prev is None:
        over["model.config"] = str(resources.package_file(opts.model_config))  # a path inside the package
    if stage != "stage1":
        over["data.frames.num_frames"] = opts.num_frames
        over["model.init_from"] = None if prev is None else str(prev)
        # a random-weight LLM has no language to protect: trained fully, so its text head learns to end
        # answers (with LoRA or frozen it keeps a random head and lists boxes to the token budget); a
        # random-weight vision encoder has no features to protect either: frozen, its random features
        # cap how well fields can be located
        over["trainable.llm.mode"] = "full"
        over["trainable.vision"] = PHASES[stage] == "stage3" and opts.train_vision
    if PHASES[stage] == "stage3":
        over["data.growth_focus"] = opts.growth_focus
        over["data.point_marker"] = opts.point_marker
    if stage in ("stage3", "stage3_fields"):
        over["train.snapshot_every"] = opts.snapshot_every
    return over


def pretrain_default_encoder(out: Path, scenes: list[Path], opts: DefaultTraining,
                             echo: Callable[[str], None]) -> Path | None:
    """The encoder phase (``opts.encoder_steps`` > 0): ``out/train/encoder``, a SigLIP folder (kept when written).

    It trains on the scenes the recipes deal to ``train`` (the same deal: :func:`recipe_text`'s split rule) and
    reports its scores on the ones dealt to ``val``; held-out evaluation scenes (seeds ≥ 9000) are never read.
    """
    from agrivlm.recipes.config import SceneSplitConfig
    from agrivlm.recipes.sources import deal_scenes
    from agrivlm.train.encoder import EncoderPretrainConfig, pretrain_encoder

    if opts.encoder_steps <= 0:
        return None
    folder = out / "train" / "encoder"
    if (folder / "pretrain.json").is_file():
        echo("encoder: already trained")
        return folder
    rule = SceneSplitConfig(fractions=SYNTH_SPLIT, seed=opts.seed)
    dealt = deal_scenes([p.name for p in scenes], rule)
    t0 = time.perf_counter()
    pretrain_encoder(EncoderPretrainConfig(
        scenes=[p for p in scenes if dealt[p.name] == "train"],
        val_scenes=[p for p in scenes if dealt[p.name] == "val"],
        out=folder, model_config=str(resources.package_file(opts.model_config)), steps=opts.encoder_steps,
        seed=opts.seed, threads=opts.threads), log=lambda line: echo(f"encoder: {line}"))
    echo(f"encoder: {opts.encoder_steps} steps in {time.perf_counter() - t0:.0f} s → {folder}")
    return folder


def model_overrides(opts: DefaultTraining, encoder: Path | None) -> dict[str, Any]:
    """The model YAML's overrides of the stage that builds the model: the pre-trained encoder, point features."""
    over: dict[str, Any] = {}
    if encoder is not None:
        over["vision.checkpoint"] = str(encoder.resolve())
    if opts.point_features:
        over["lape.point_features"] = True
    return over


def train(out: Path, roots: dict[str, Path], opts: DefaultTraining, echo: Callable[[str], None],
          encoder: Path | None = None) -> Path:
    """Stage 1 → 2 → 3 (each resumed when a checkpoint of it exists, skipped when finished).

    ``encoder``: a pre-trained SigLIP folder stage 1 starts from (:func:`pretrain_default_encoder`).
    """
    from agrivlm.train.checkpoint import latest_checkpoint
    from agrivlm.train.trainer import run_stage

    prev: Path | None = None
    for stage in phases(opts):
        folder = out / "train" / stage
        n = opts.steps[stage]
        over = phase_overrides(stage, opts, roots[stage], folder, prev)
        if "model.config" in over:
            over["model.overrides"] = model_overrides(opts, encoder)
        if (folder / "final" / "config.json").is_file():
            prev = folder / "final"
            echo(f"{stage}: already trained")
            continue
        resume = latest_checkpoint(folder / "checkpoints") is not None
        t0 = time.perf_counter()
        prev = run_stage(resources.stage_config(PHASES[stage]), over, stage=PHASES[stage], resume=resume,
                         overwrite=not resume and folder.exists())
        echo(f"{stage}: {n} steps in {time.perf_counter() - t0:.0f} s → {prev}")
    assert prev is not None
    return prev


def step_seconds(folder: Path) -> float:
    """The summed optimizer-step time of a phase's training log (``logs/metrics.jsonl``; 0 without one).

    A phase trained by an earlier run (skipped by this one) still counts, so the card tells what the whole
    checkpoint cost, not only what this run resumed.
    """
    from agrivlm.train.logs import read_metrics

    if not (folder / "logs" / "metrics.jsonl").is_file():
        return 0.0
    return round(sum(float(row.get("step_time_s") or 0.0) for row in read_metrics(folder)), 1)


def write_card(final: Path, opts: DefaultTraining, info: dict[str, Any]) -> None:
    """``README.md`` (model card) and ``default_training.json`` in the final folder."""
    (final / "default_training.json").write_text(json.dumps({"options": asdict(opts), **info}, indent=1) + "\n")
    scores = info.get("heldout")
    lines = [
        "# agrivlm default checkpoint", "",
        "A LAPE vision-language model (SigLIP-style encoder + Qwen2-style LM with small dimensions, random "
        "initialisation, no downloaded weights) trained by `agrivlm train default` on this project's own data.", "",
        "## Data", "",
        f"- `agrivlm synth` scenes: regions {', '.join(TRAIN_REGIONS)} × {opts.scenes_per_region} seeds "
        f"(0–{opts.scenes_per_region - 1}), {opts.area_km2:g} km² each, {opts.start} → {opts.end} "
        "(Mato Grosso: August → July), NDVI, truth stages and key dates; `corn_belt` is never seen.",
        "- the embedded real sample (Sentinel-2 NDVI, Slovenia): its train blocks only.", "",
        "## Training", "",
        f"- model: `{opts.model_config}`; stages 1 → 2 → 3: {opts.steps} optimizer steps, batch {opts.batch_size}, "
        f"learning rates {opts.lr}; LLM trained fully in stages 2–3 (random weights: nothing to protect).",
        *([f"- vision encoder pre-trained first: {opts.encoder_steps} steps of FTW's three classes (background, field, "
           "boundary), each field's extent and every date's pixels from its pooled tokens on the training scenes "
           f"(`agrivlm.train.encoder`){'' if opts.train_vision else ', then kept frozen'}."]
          if opts.encoder_steps > 0 else []),
        *(["- `lape.point_features` on: the feature under each question point added to its height token."]
          if opts.point_features else []),
        "- stage 3's growth timelines: spans over "
        + ("every acquisition of the season" if opts.timeline_dates == "season" else "the record's frames")
        + f" (`growth_stages.timeline_dates: {opts.timeline_dates}`).",
        f"- time: {info.get('seconds', 0) / 60:.0f} minutes on {opts.threads} CPU threads for this run"
        + (f"; the optimizer steps of every phase (resumed or not) {info['step_seconds'] / 60:.0f} minutes "
           f"({', '.join(f'{k} {v / 60:.0f}' for k, v in info['phase_step_seconds'].items())})."
           if info.get("step_seconds") else "."), "",
        "## Held-out scores", "",
        "See `benchmarks/results/learning.json` (made by `python benchmarks/learning.py`), measured on scenes "
        "and blocks this model never saw, beside the whole-chip, segmentation and climatology baselines.",
    ]
    if scores:
        lines += ["", "```json", json.dumps(scores, indent=1), "```"]
    (final / "README.md").write_text("\n".join(lines) + "\n")


def install(final: Path, target: Path = DEFAULT_MODEL_DIR) -> Path:
    """Copy a final folder into the package as the default checkpoint, weights in float16."""
    from safetensors.torch import load_file, save_file

    from agrivlm.io import atomic_dir

    with atomic_dir(target) as tmp:
        shutil.copytree(final, tmp, dirs_exist_ok=True)
        for weights in tmp.glob("*.safetensors"):
            tensors = load_file(weights)
            half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
            save_file(half, weights, metadata={"format": "pt"})
    return target


def run_default(out: Path, opts: DefaultTraining, *, do_install: bool = False,
                echo: Callable[[str], None] = print) -> Path:
    """Scenes → recipes → stages 1–3 → card (→ install); returns the final folder."""
    t0 = time.perf_counter()
    scenes_dir = out / "scenes"
    scenes = make_scenes(scenes_dir, opts, echo)
    encoder = pretrain_default_encoder(out, scenes, opts, echo)
    roots = build_data(out, scenes_dir, opts, echo)
    final = train(out, roots, opts, echo, encoder)
    per_phase = {stage: step_seconds(out / "train" / stage) for stage in phases(opts)}
    if encoder is not None:
        history = json.loads((encoder / "pretrain.json").read_text())["history"]
        per_phase = {"encoder": round(float(history[-1]["seconds"]), 1) if history else 0.0, **per_phase}
    write_card(final, opts, {"seconds": round(time.perf_counter() - t0, 1),
                             "step_seconds": round(sum(per_phase.values()), 1), "phase_step_seconds": per_phase})
    if do_install:
        echo(f"installed: {install(final)}")
    return final
