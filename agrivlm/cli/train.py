"""``agrivlm train stage1|stage2|stage3 --config configs/stageN.yaml [--resume]``: the curriculum stages."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from agrivlm.train.default import DefaultTraining

train_app = typer.Typer(
    name="train",
    help="Three-stage curriculum on accelerate: stage1 alignment → stage2 LAPE warm-up → stage3 agricultural "
    "fine-tune. Runs the same on one CPU and under `accelerate launch`.",
    no_args_is_help=True,
)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Stage YAML (configs/stageN.yaml).")]
ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="Continue from the newest complete checkpoint in the output folder.")
]
AllowChangedOpt = Annotated[
    bool,
    typer.Option("--allow-changed-settings", help="With --resume: go on although the optimiser, schedule or batch "
                 "settings differ from the run's (recorded in logs/settings_changes.jsonl)."),
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Start over in an output folder that holds a run.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key, KEY=VALUE (YAML value), e.g. --set train.max_steps=20."),
]


def _run(stage: str, config: Path, resume: bool, overwrite: bool, overrides: list[str] | None,
         allow_changed: bool = False) -> None:
    from agrivlm.train.config import parse_overrides
    from agrivlm.train.trainer import run_stage

    final = run_stage(config, parse_overrides(overrides), stage=stage, resume=resume, overwrite=overwrite,
                      allow_changed_settings=allow_changed)
    typer.echo(f"{stage}: final model in {final}")


@train_app.command("stage1")
def stage1(config: ConfigOpt, resume: ResumeOpt = False, overwrite: OverwriteOpt = False, set_: SetOpt = None,
           allow_changed_settings: AllowChangedOpt = False) -> None:
    """Vision–language alignment: LAPE off, projector and band adapter trained, vision encoder and LLM frozen."""
    _run("stage1", config, resume, overwrite, set_, allow_changed_settings)


@train_app.command("stage2")
def stage2(config: ConfigOpt, resume: ResumeOpt = False, overwrite: OverwriteOpt = False, set_: SetOpt = None,
           allow_changed_settings: AllowChangedOpt = False) -> None:
    """LAPE warm-up from stage 1: LAPE on (smart init), own LR group with warm-up, weighted position losses."""
    _run("stage2", config, resume, overwrite, set_, allow_changed_settings)


@train_app.command("stage3")
def stage3(config: ConfigOpt, resume: ResumeOpt = False, overwrite: OverwriteOpt = False, set_: SetOpt = None,
           allow_changed_settings: AllowChangedOpt = False) -> None:
    """Agricultural fine-tune from stage 2: LAPE on, the LLM through LoRA or fully."""
    _run("stage3", config, resume, overwrite, set_, allow_changed_settings)


#: The recipe of the shipped default checkpoint: the command's defaults are its options, so the README's
#: ``agrivlm train default`` remakes it (a CLI default of 20 scenes per region once disagreed with the 60 it used).
_DEFAULTS = DefaultTraining()


@train_app.command("default")
def default(
    out: Annotated[Path, typer.Option("--out", "-o", help="Working folder: scenes/, recipes/, data/, train/.")] = Path(
        "runs/default"),
    scenes_per_region: Annotated[int, typer.Option(
        min=1, help="Synthetic scenes per training region.")] = _DEFAULTS.scenes_per_region,
    stage3_steps: Annotated[int, typer.Option(
        min=1, help="Optimizer steps of stage 3 (stages 1 and 2 are short).")] = _DEFAULTS.steps["stage3"],
    fields_steps: Annotated[int, typer.Option(
        min=0, help="Steps of the closing fields phase (the field at a point, the growth timeline replayed; 0: none). "
             "See data_recipes/synthetic_stage3_fields.yaml for what it buys."
    )] = _DEFAULTS.steps["stage3_fields"],
    points_per_record: Annotated[int, typer.Option(
        help="Point questions per conversation in stage 3's field_at_point records (every answer supervised).",
        min=1)] = _DEFAULTS.points_per_record,
    timeline_dates: Annotated[Literal["frames", "season"], typer.Option(
        help="Stage 3's growth timelines: spans over the record's frames or over every acquisition of the season."
    )] = _DEFAULTS.timeline_dates,
    encoder_steps: Annotated[int, typer.Option(
        min=0, help="Steps of the vision encoder's dense pre-training before stage 1 (FTW's three classes from the "
             "pooled tokens; 0: a random encoder).")] = _DEFAULTS.encoder_steps,
    train_vision: Annotated[bool, typer.Option(
        help="Stage 3 trains the vision encoder (--no-train-vision: it stays as stage 1 started it).")
    ] = _DEFAULTS.train_vision,
    point_features: Annotated[bool, typer.Option(
        help="The model's lape.point_features: the feature under each question point added to its height token."
    )] = _DEFAULTS.point_features,
    threads: Annotated[int, typer.Option(min=1, help="torch CPU threads.")] = 2,
    install: Annotated[bool, typer.Option(help="Copy the result into the package as the default checkpoint.")] = False,
) -> None:
    """The default checkpoint from the project's own data: synthetic scenes + the sample's train blocks → stages 1–3.

    Resumes what a killed run left (scenes, recipes, a stage's newest checkpoint). See agrivlm/train/default.py.
    """
    from agrivlm.train.default import run_default

    base = _DEFAULTS
    opts = DefaultTraining(scenes_per_region=scenes_per_region, threads=threads, points_per_record=points_per_record,
                           encoder_steps=encoder_steps, train_vision=train_vision, point_features=point_features,
                           timeline_dates=timeline_dates,
                           steps={**base.steps, "stage3": stage3_steps, "stage3_fields": fields_steps})
    final = run_default(out, opts, do_install=install, echo=typer.echo)
    typer.echo(f"default checkpoint: {final}")


@train_app.command("encoder")
def encoder(
    scenes: Annotated[list[Path], typer.Argument(help="agrivlm synth scene folders to train on.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the SigLIP encoder (config.json, weights, "
                                      "pretrain.json).")],
    val: Annotated[list[Path] | None, typer.Option(help="Scene folders to score on (repeat the option).")] = None,
    model_config: Annotated[Path, typer.Option(help="Model YAML whose vision and pooling settings to use.")] = Path(
        "configs/model/small.yaml"),
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 3000,
    batch_size: Annotated[int, typer.Option(min=1, help="Chips per step.")] = 16,
    threads: Annotated[int, typer.Option(min=1, help="torch CPU threads.")] = 2,
    overwrite: OverwriteOpt = False,
) -> None:
    """Pre-train the vision encoder on scenes with parcels (FTW's three classes); point vision.checkpoint at --out."""
    from agrivlm.train.encoder import EncoderPretrainConfig, pretrain_encoder

    if (out / "config.json").exists() and not overwrite:
        raise typer.BadParameter(f"{out} already holds an encoder; pass --overwrite to replace it", param_hint="--out")
    pretrain_encoder(EncoderPretrainConfig(scenes=list(scenes), val_scenes=list(val or []), out=out,
                                           model_config=str(model_config), steps=steps, batch_size=batch_size,
                                           threads=threads), log=typer.echo)
    typer.echo(f"encoder: {out} (set vision.checkpoint: {out} in a model YAML)")
