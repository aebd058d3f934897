"""Stage configs (``configs/stage1.yaml`` … ``stage3.yaml``): strict YAML → typed settings.

Every section is a :class:`~agrivlm.config.StrictModel`: an unknown key or a wrong type is a
:class:`~agrivlm.errors.ConfigError` naming the file and the dotted key. Relative paths (model YAML,
``init_from``, recipe outputs, ``output_dir``) resolve against the current directory, as command-line
tools do; run the commands from the repository root.

Naming: the curriculum report's ``--spatial_pos_weight`` / ``--temporal_pos_weight`` are **loss weights**
of the position tokens; here (section ``lape``) they are ``spatial_loss_weight`` / ``temporal_loss_weight``,
written into the model config under the same names. The model's ``spatial_injection_scale`` /
``temporal_injection_scale`` (the scale of the LAPE embeddings added to the visual features) are another
thing: they keep their model-YAML values; change them with ``model.overrides``. The old names are errors
that say the new one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from agrivlm.config import StrictModel, load_config
from agrivlm.errors import ConfigError
from agrivlm.lape.embedding import LapeInit
from agrivlm.lape.tokens import AnswerPositions, QuestionPositions
from agrivlm.pipeline.bands import BandStats
from agrivlm.pipeline.focus import GrowthFocus, PointMarker
from agrivlm.pipeline.frames import FrameSamplingConfig
from agrivlm.pipeline.inputs import (
    AnyResConfig,
    BandConfig,
    ScaleFactors,
    check_item_layout,
    default_frames,
    known_preset,
)
from agrivlm.recipes.config import FamilyName

Stage = Literal["stage1", "stage2", "stage3"]
#: Experiment trackers of accelerate (``Accelerator(log_with=...)``) that ``train.report_to`` may name.
Tracker = Literal["tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio"]
#: The stages, in curriculum order.
STAGES: tuple[Stage, ...] = ("stage1", "stage2", "stage3")


class ModelSource(StrictModel):
    """Where the stage's model comes from."""

    #: Stage 1: model YAML to build from (``configs/model/tiny.yaml``, or one pointing at local checkpoints).
    #: Stages 2 and 3 may give it instead of ``init_from``: the model is built there, LAPE switched on per the
    #: ``lape`` section, the stages before skipped (the curriculum ablation: stage 3 alone).
    config: str | None = None
    #: Dotted overrides of that YAML, e.g. ``{"llm.num_layers": 4}``.
    overrides: dict[str, Any] = Field(default_factory=dict)
    #: Stages 2 and 3: the previous stage's final folder (``<output_dir>/final``).
    init_from: str | None = None
    #: Stages 2 and 3: a peft adapter folder (a LoRA stage's ``<output_dir>/final/adapter``, or any
    #: ``PeftModel.save_pretrained`` output for the ``init_from`` model) merged into ``init_from``'s weights before
    #: the stage starts (``--set model.adapter=PATH``).
    adapter: str | None = None


class LapeTrainConfig(StrictModel):
    """LAPE in stages 2 and 3 (the LAPE initialisation report's flags)."""

    #: LAPE on (the position tokens get their own tables, heads and injection into the visual features) or off
    #: (an ablation: stages 2 and 3 keep stage 1's model, whose position tokens are ordinary rows of the LLM's
    #: vocabulary and LM head, read by the same decoder). Stage 3 keeps what its ``init_from`` has.
    enabled: bool = True
    #: The NTP reparameterisation of the LAPE tables (``agrivlm.lape.embedding``); set where LAPE is switched on
    #: (stage 2, or a stage built from ``model.config``), a later stage keeps its ``init_from``'s.
    ntp: bool = True
    #: The position-token counts live in the model config (``lape.num_spatial_tokens`` of the model YAML, the
    #: checkpoint's ``config.json``); None reads them from there. Given (older stage configs wrote them), they
    #: must equal the model's, or the stage is refused.
    num_spatial_tokens: int | None = Field(default=None, ge=2)
    num_temporal_tokens: int | None = Field(default=None, ge=2)
    #: LR of the LAPE parameter group as a multiple of the base LR (after its warmup).
    lape_lr_multiplier: float = Field(default=0.5, gt=0)
    #: Optimizer steps of the LAPE warm-up (the report's §4.2): the factor ramps linearly from 0 to 0.1, then is
    #: ``lape_lr_multiplier``.
    lape_warmup_steps: int = Field(default=1000, ge=0)
    #: Loss weight of spatial (HEIGHT/WIDTH) position tokens (text tokens weigh 1); the report's
    #: ``spatial_pos_weight``.
    spatial_loss_weight: float = Field(default=2.0, gt=0)
    #: Loss weight of temporal (TEMP) position tokens; the report's ``temporal_pos_weight``.
    temporal_loss_weight: float = Field(default=1.0, gt=0)
    #: Initialisation when LAPE is switched on: ``llm_stats`` (smart init: Normal(mean, ratio·std) of the
    #: LLM embeddings), ``smooth`` (the same statistics, rows smooth along each axis), ``number_text`` or
    #: ``random`` (Normal(0, the LLM's ``initializer_range``), as new vocabulary rows are drawn: the ablation of
    #: the smart init).
    init: LapeInit = "llm_stats"
    #: std of the smart init as a fraction of the LLM embeddings' std.
    init_std_ratio: float = Field(default=0.1, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for old, new in (("spatial_pos_weight", "spatial_loss_weight"),
                             ("temporal_pos_weight", "temporal_loss_weight")):
                if old in data:
                    raise ValueError(f"{old} was renamed {new} (a loss weight of the position tokens; the model's "
                                     "injection scale is model.overrides lape.spatial/temporal_injection_scale)")
        return data


class LoraSettings(StrictModel):
    """LoRA on the LLM (peft)."""

    #: Rank.
    r: int = Field(default=8, ge=1)
    #: Scale numerator (the update is ``alpha / r · B·A``).
    alpha: float = Field(default=16.0, gt=0)
    #: Dropout on the LoRA input.
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    #: Names of the LLM's linear layers that get adapters.
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


class LLMTraining(StrictModel):
    """How the LLM is trained."""

    #: ``frozen``, ``lora`` (adapters trained, merged into the weights of the final folder by peft and saved beside
    #: them in peft's format, ``final/adapter``) or ``full``.
    mode: Literal["frozen", "lora", "full"] = "frozen"
    lora: LoraSettings = Field(default_factory=LoraSettings)


class Trainables(StrictModel):
    """Which parts of the model are trained (everything else is frozen, bit for bit)."""

    #: The 2-layer MLP between the vision encoder and the LLM.
    projector: bool = True
    #: The 1×1 conv mapping the bands to the encoder's channels.
    band_adapter: bool = True
    #: The vision encoder.
    vision: bool = False
    #: The LAPE tables and heads (stages 2 and 3; they get their own optimizer group).
    lape: bool = True
    llm: LLMTraining = Field(default_factory=LLMTraining)


class FramesConfig(StrictModel):
    """Which of a record's frames become the model's frames (every sample of a batch gets ``num_frames``)."""

    #: ``random``: a sorted random subset, drawn per (seed, epoch, sample) — a temporal augmentation;
    #: ``uniform``: evenly spread over the record's frames (first and last kept);
    #: ``fast_slow``: ``num_slow`` slow frames over the series and the ``num_fast`` most recent (pipeline.frames).
    sampler: Literal["random", "uniform", "fast_slow"] = "random"
    #: Frames per sample (``random``/``uniform``); records with fewer frames are left out (counted in the log).
    num_frames: int = Field(default=4, ge=1)
    #: ``fast_slow``: step between fast frames, least step between slow frames, counts and merge order.
    fast_stride: int = Field(default=1, ge=1)
    slow_stride: int = Field(default=4, ge=1)
    num_fast: int = Field(default=2, ge=1)
    num_slow: int = Field(default=2, ge=1)
    merge: Literal["concat", "interleave"] = "interleave"
    #: Cloud-masked pixels become no data (then 0 after normalisation, as every no-data pixel), as ``agrivlm infer``
    #: prepares chips (the checkpoint's ``frames.clouds_as_nodata``). Off trains on cloudy values the checkpoint's
    #: users never feed it (a warning says so when the checkpoint is written).
    clouds_as_nodata: bool = True

    @property
    def frames_per_sample(self) -> int:
        """The number of frames each sample has."""
        return self.num_fast + self.num_slow if self.sampler == "fast_slow" else self.num_frames

    def input_frames(self) -> FrameSamplingConfig:
        """The contract's frame choice for a model trained on these frames (the checkpoint's ``frames``).

        ``fast_slow``: these strides, counts and merge order, the same sampler training draws with
        (:func:`agrivlm.train.data.choose_frames`); ``random``/``uniform``: :func:`default_frames`' evenly spread
        dates, at most ``frames_per_sample``. Dates and cloudy pixels as :func:`default_frames` takes them;
        :meth:`~agrivlm.pipeline.inputs.ChipRule.input_frames` then applies a recipe's clear fraction.
        """
        base = default_frames()
        if self.sampler != "fast_slow":
            return base.model_copy(update={"max_frames": self.frames_per_sample})
        return FrameSamplingConfig(
            sampler="fast_slow", fast_stride=self.fast_stride, slow_stride=self.slow_stride,
            num_fast=self.num_fast, num_slow=self.num_slow, merge=self.merge,
            empty=base.empty, clouds_as_nodata=True, min_valid_fraction=base.min_valid_fraction,
        )


class NormalizeConfig(StrictModel):
    """Band values → ``[0, 1]`` (``agrivlm.pipeline.bands.normalize``)."""

    #: ``dataset``: one per-band percentile range over the training chips (computed in the first stage,
    #: saved as ``band_stats.json`` and reused by later stages); ``chip``: each sample's own frames;
    #: ``fixed``: ``low``/``high`` below.
    mode: Literal["dataset", "chip", "fixed"] = "dataset"
    #: Band preset (a key of ``agrivlm.pipeline.bands.PRESETS``, e.g. ``ndvi``, ``sentinel2_l2a``): stored values
    #: → reflectance / index units before normalising, exactly as ``agrivlm infer`` prepares chips. It is
    #: written, with the normalisation range, into the final folder's ``agrivlm_inputs.yaml``. None: stored
    #: values as they are (``agrivlm infer`` then needs ``--preset``).
    preset: str | None = None
    #: Percentiles of ``dataset``/``chip``.
    percentiles: tuple[float, float] = (2.0, 98.0)
    #: At most this many distinct training chips are read for ``dataset`` stats.
    max_chips: int = Field(default=64, ge=1)
    #: ``fixed``: per-band values mapped to 0 and 1.
    low: list[float] | None = None
    high: list[float] | None = None

    _known_preset = field_validator("preset")(known_preset)

    @model_validator(mode="after")
    def _fixed_has_range(self) -> NormalizeConfig:
        if self.mode == "fixed" and (self.low is None or self.high is None or len(self.low) != len(self.high)):
            raise ValueError("mode fixed needs low and high, one value per band each")
        return self

    def input_bands(self, stats: BandStats | None) -> BandConfig:
        """The contract's band settings for a model trained so (the checkpoint's ``bands``).

        The preset and percentiles; the normalisation range ``stats`` training used, unless it normalised each
        chip by its own percentiles (``mode: chip``, or no ``stats``), which ``agrivlm infer`` then does too.
        """
        fixed = stats is not None and self.mode != "chip"
        return BandConfig(
            preset=self.preset,
            low=[float(x) for x in stats.low] if fixed and stats is not None else None,
            high=[float(x) for x in stats.high] if fixed and stats is not None else None,
            percentiles=self.percentiles,
        )


class MixtureEntry(StrictModel):
    """One component of the training mixture."""

    #: Record families pooled in this component.
    families: list[FamilyName]
    #: Share of each epoch drawn from it.
    weight: float = Field(gt=0)


class DataConfig(StrictModel):
    """Instruction records (outputs of ``agrivlm recipe build``) and how they become samples."""

    #: Recipe output folders (each with ``manifest.json`` and ``shards/``).
    roots: list[str] = Field(min_length=1)
    #: Keep only records without positions (stage 1 alignment).
    text_only: bool = False
    #: Keep only these families (None: all).
    families: list[FamilyName] | None = None
    #: Re-mix the training records by component weight (None: the shards' records as built).
    mixture: dict[str, MixtureEntry] | None = None
    #: Samples per epoch when mixing (None: the number of distinct records in the mixture's pools).
    samples_per_epoch: int | None = Field(default=None, ge=1)
    frames: FramesConfig = Field(default_factory=FramesConfig)
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    #: DataLoader worker processes (0: load in the training process).
    num_workers: int = Field(default=0, ge=0)
    #: ``box``: growth-stage questions see only the pixels inside their field's box (the first box of the
    #: question), the rest is no data; saved with the checkpoint so ``agrivlm infer`` does the same
    #: (:mod:`agrivlm.pipeline.focus`). ``none``: they see the whole chip.
    growth_focus: GrowthFocus = "none"
    #: ``square``: the point a question gives (the first) is also drawn into its frames, a 3 × 3 px square shifted
    #: out of the value range (:func:`~agrivlm.pipeline.focus.mark_point`); saved with the checkpoint so
    #: ``agrivlm infer`` marks its point prompts the same. ``none``: the point is in the words only.
    point_marker: PointMarker = "none"
    #: How the positions a question gives (a field's box, a point) are written: ``bins`` (position tokens, as the
    #: answers) or ``input`` (``-INPUT`` placeholders carrying the exact value, LLaVA-ST's layout; needs LAPE on).
    #: Saved with the checkpoint so ``agrivlm infer`` asks the same way.
    question_positions: QuestionPositions = "bins"
    #: How the positions an answer gives are written in training: ``bins`` (the tokens the model generates) or
    #: ``output`` (``-OUTPUT`` placeholders carrying the exact value: the same soft-target label, the next step's
    #: input the exact value instead of its bin's row; LLaVA-ST's layout; needs LAPE on). Training only: the
    #: model generates bins either way. Measured: ``benchmarks/ablations.py`` ``llava_st_positions``.
    answer_positions: AnswerPositions = "bins"
    #: AnyRes: every sample's frames become a thumbnail plus tiles of ``anyres.tile_size`` px, each token carrying
    #: its (u, v) on the chip (:meth:`~agrivlm.model.processing.AgriVLMProcessor.from_frames`); saved with the
    #: checkpoint so ``agrivlm infer`` cuts the same. None: one item per sample.
    anyres: AnyResConfig | None = None
    #: Multi-scale: one item per scale factor, e.g. ``[1.0, 0.5]`` (the chip and a half-size copy); not with
    #: ``anyres``. None: one scale.
    scales: ScaleFactors | None = None
    #: NaViT-style dynamic resolution: each sample's frames resized at their aspect ratio to the most patches within
    #: this budget (up or down; ``agrivlm.pipeline.inputs.navit_size``); saved with the checkpoint so ``agrivlm
    #: infer`` resizes the same; not with ``anyres``/``scales``. None: the chip's own size.
    max_patches: Annotated[int, Field(ge=1)] | None = None
    #: The sampled frames become the bands of one image (date-major; ``agrivlm.pipeline.inputs.frames_as_bands``):
    #: the encoder sees every date of a patch at once. The model's ``num_bands`` must be frames × bands; saved with
    #: the checkpoint so ``agrivlm infer`` does the same.
    frames_as_bands: bool = False

    @model_validator(mode="after")
    def _one_layout(self) -> DataConfig:
        check_item_layout(self.anyres, self.scales, self.max_patches)
        return self

    @model_validator(mode="after")
    def _weights(self) -> DataConfig:
        if self.mixture is not None:
            total = sum(c.weight for c in self.mixture.values())
            if not self.mixture or abs(total - 1.0) > 1e-6:
                raise ValueError(f"mixture weights must sum to 1, got {total:g}")
        return self


class ReconstructionConfig(StrictModel):
    """Auxiliary autoregressive next-frame reconstruction (``agrivlm.model.reconstruction``)."""

    #: Add ``loss_weight · MSE`` of the next frame's teacher features to the loss.
    enabled: bool = False
    #: Weight of the reconstruction loss.
    loss_weight: float = Field(default=0.1, ge=0)
    #: Width of the predictor (the notes' ``embedding_dim``).
    embedding_dim: int = Field(default=128, ge=8)
    #: Transformer layers of the predictor.
    num_layers: int = Field(default=3, ge=1)
    #: Attention heads of the predictor (must divide ``embedding_dim``).
    num_heads: int = Field(default=8, ge=1)
    #: History frames each frame sees, itself included (sliding window); 0 = every earlier frame (causal).
    num_hist: int = Field(default=3, ge=0)
    #: Use the fast/slow frame mask (needs ``data.frames.sampler: fast_slow`` with ``merge: interleave``).
    fast_slow: bool = False
    #: Layer-normalise the teacher features before the MSE (as MAE's normalised pixel loss).
    normalize_targets: bool = True
    #: Multi-scale pooling of the loss (the notes' ``enable_multiscale_pooling``): the MSE averaged over the token
    #: grid average-pooled by each stride, e.g. ``[1, 2]``; ``[1]``: the grid alone.
    pool_strides: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1], min_length=1)

    @model_validator(mode="after")
    def _heads_divide(self) -> ReconstructionConfig:
        if self.embedding_dim % self.num_heads:
            raise ValueError(f"num_heads {self.num_heads} must divide embedding_dim {self.embedding_dim}")
        return self


class OptimConfig(StrictModel):
    """AdamW and the base LR schedule (``agrivlm.train.schedule``)."""

    #: Base learning rate (the main group; the LAPE group gets ``lape_lr_multiplier`` × this).
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0)
    #: Gradient-norm clip (0: off).
    max_grad_norm: float = Field(default=1.0, ge=0)
    #: Base schedule after the base warmup: ``constant``, ``linear`` or ``cosine`` decay to 0.
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    #: Base warmup steps (linear from 0).
    warmup_steps: int = Field(default=0, ge=0)


class RunConfig(StrictModel):
    """Steps, batches, precision, checkpoints, logs."""

    #: Optimizer steps of the stage.
    max_steps: int = Field(default=100, ge=1)
    #: Samples per micro-batch on each process.
    batch_size: int = Field(default=4, ge=1)
    #: Micro-batches per optimizer step (accelerate's gradient accumulation).
    grad_accum: int = Field(default=1, ge=1)
    #: ``auto`` (bf16 on GPUs that support it, else fp32; or what ``accelerate launch`` sets), ``no``, ``bf16``,
    #: ``fp16``.
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    #: Seed of the sample order, per-sample randomness, init and dropout.
    seed: int = 0
    #: Save a resumable checkpoint (``accelerator.save_state``) every this many optimizer steps (0: only at the end).
    save_every: int = Field(default=50, ge=0)
    #: Checkpoints kept.
    keep_checkpoints: int = Field(default=2, ge=1)
    #: Also write an HF folder like ``final/`` to ``snapshots/step-NNNNNN`` every this many steps (0: never),
    #: all kept: what a learning curve evaluates (``benchmarks/learning.py --snapshots``).
    snapshot_every: int = Field(default=0, ge=0)
    #: Log every this many optimizer steps.
    log_every: int = Field(default=1, ge=1)
    #: Experiment trackers the logged metrics also go to, through accelerate (``Accelerator(log_with=...)``), e.g.
    #: ``[tensorboard]`` (``pip install 'agrivlm[track]'``: events under ``<output_dir>/logs/agrivlm``) or
    #: ``[wandb]``; the run's config is their hyperparameters. Empty: none (``logs/metrics.{jsonl,csv}`` and
    #: ``loss_curves.png`` are always written).
    report_to: list[Tracker] = Field(default_factory=list)
    #: Evaluate on the val split every this many steps (0: only at the start and the end; -1: never).
    eval_every: int = Field(default=0, ge=-1)
    #: Val micro-batches per evaluation.
    eval_batches: int = Field(default=4, ge=1)
    #: CPU threads of torch in this process (None: torch's default).
    torch_threads: int | None = Field(default=None, ge=1)
    #: Show a progress bar (loss, tokens/s).
    progress: bool = True


class StageConfig(StrictModel):
    """One curriculum stage (``configs/stageN.yaml``)."""

    #: Which stage this file configures (checked against the command).
    stage: Stage
    #: Folder of the run: ``checkpoints/``, ``logs/``, ``final/``.
    output_dir: str
    model: ModelSource = Field(default_factory=ModelSource)
    #: LAPE settings (stages 2 and 3; must be absent in stage 1).
    lape: LapeTrainConfig | None = None
    trainable: Trainables = Field(default_factory=Trainables)
    data: DataConfig
    reconstruction: ReconstructionConfig = Field(default_factory=ReconstructionConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _consistent(self) -> StageConfig:
        rec, frames = self.reconstruction, self.data.frames
        if rec.enabled and frames.frames_per_sample < 2:
            raise ValueError("reconstruction needs at least 2 frames per sample (data.frames)")
        if rec.enabled and (self.data.anyres is not None or self.data.scales is not None
                            or self.data.max_patches is not None):
            raise ValueError("reconstruction predicts one item's next frame; it does not take data.anyres or "
                             "data.scales (several items per sample) or data.max_patches (items of different sizes)")
        if rec.enabled and self.data.frames_as_bands:
            raise ValueError("reconstruction predicts the next frame; data.frames_as_bands leaves one frame per sample")
        if rec.enabled and rec.fast_slow and (frames.sampler != "fast_slow" or frames.merge != "interleave"):
            raise ValueError(
                "reconstruction.fast_slow needs data.frames.sampler: fast_slow with merge: interleave "
                "(the next frame must be the next date)"
            )
        return self


def load_stage_config(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> StageConfig:
    """Read a stage YAML (strict) with dotted-key ``overrides``; :class:`ConfigError` naming the file and key."""
    return load_config(StageConfig, path, overrides)


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["train.max_steps=5", "data.roots=[a, b]"]`` → ``{"train.max_steps": 5, ...}`` (values parsed as YAML)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.max_steps=20")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({exc})") from exc
    return out


def resolve(path: str | os.PathLike[str]) -> Path:
    """A config path (``~`` expanded, relative to the current directory) as an absolute path."""
    return Path(os.path.expanduser(str(path))).resolve()
