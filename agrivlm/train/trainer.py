"""The training loop of a curriculum stage, on accelerate (the same code on one CPU and under ``accelerate launch``).

:func:`run_stage` (Python) and ``agrivlm train stage1|stage2|stage3`` (CLI) run one stage into
``<output_dir>``:

* ``checkpoints/step_NNNNNNN/`` — ``accelerator.save_state`` every ``train.save_every`` steps and at the
  end (model, optimizer, RNG states and the trainer's :class:`TrainState`), crash-safe
  (:mod:`agrivlm.train.checkpoint`);
* ``logs/metrics.{jsonl,csv}`` (and accelerate's experiment trackers of ``train.report_to``: TensorBoard under
  ``logs/agrivlm``, wandb, ...), ``logs/samples.jsonl`` (the sample ids of every optimizer step) and
  ``logs/loss_curves.png``;
* ``final/`` — ``save_pretrained`` of the model and the processor (:func:`~agrivlm.train.final.save_final`: the
  stage info and input settings in their configs, ``band_stats.json``, ``stage_info.json``, a model card
  ``README.md``); with LoRA, the model merged by peft and the adapter in ``final/adapter``
  (:mod:`agrivlm.train.lora`); the next stage's ``model.init_from``.

**Exact resume.** accelerate owns devices, mixed precision, gradient accumulation and checkpoints, but the
DataLoader is *not* passed through ``accelerator.prepare``: :class:`~agrivlm.train.sampler.ResumableSampler`
shards by rank itself, and the position in the data (epoch, samples of the epoch already trained on,
optimizer step) lives in :class:`TrainState`, registered with ``accelerator.register_for_checkpointing``.
On resume the sampler restarts exactly there (prefetched batches do not matter: only trained samples are
counted), per-sample randomness is seeded from ``(seed, epoch, index)``, and the torch RNG is re-seeded
from ``(seed, rank, step)`` at every optimizer step (dropout), so nothing depends on how the run got to a
step. Checkpoints missing RNG or custom state are refused (``load_checkpoint``). The learning rates are a
pure function of the step (:mod:`agrivlm.train.schedule`), set on the param groups before each step.
A run killed at any moment and resumed with ``resume=True`` ends with bit-identical weights on CPU.

**Nothing silently wrong.** Resume verifies the checkpoint files against the SHA-256 recorded at save and
falls back, with a warning, to the newest intact checkpoint
(:func:`~agrivlm.train.checkpoint.latest_intact_checkpoint`). The run's optimiser, schedule and batch settings
(:func:`run_settings`) are kept in ``<output_dir>/run_settings.json``; a resume with other values is refused
(a :class:`ConfigError` naming each ``old → new``) unless ``allow_changed_settings`` is set, which records the
change in ``logs/settings_changes.jsonl``. A NaN or infinite loss, or a weight that is not finite (at the start,
after loading a checkpoint, after an update), stops the run with a :class:`TrainError` naming the step and the
first such parameter; what was already written (checkpoints, logs) stays.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from agrivlm.config import parse_config
from agrivlm.errors import ConfigError, TrainError
from agrivlm.io import write_json
from agrivlm.model.modeling import AgriVLMForConditionalGeneration
from agrivlm.model.reconstruction import FrozenTeacher, NextFramePredictor, visual_hidden_states
from agrivlm.pipeline.bands import BandStats
from agrivlm.pipeline.inputs import ChipRule, InputConfig, item_layout
from agrivlm.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    latest_intact_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from agrivlm.train.config import StageConfig, load_stage_config, resolve
from agrivlm.train.curriculum import STAGE_INFO, StageModel, build_stage_model, final_model
from agrivlm.train.data import (
    Collator,
    EpochIndexSampler,
    RecordDataset,
    SourceRecord,
    StackCache,
    dataset_band_stats,
    fixed_band_stats,
    read_split,
    recipe_chips,
    select_records,
)
from agrivlm.train.final import data_sources, save_final
from agrivlm.train.logs import TRACKER_PROJECT, TrainLog, check_trackers, plot_losses, tracker_config
from agrivlm.train.sampler import ResumableSampler, sample_seed, seeded_generator
from agrivlm.train.schedule import base_lr_factor, lape_lr_factor

log = logging.getLogger(__name__)

#: Metric names of the three losses, logged apart.
LOSS_KEYS = ("loss", "main_loss", "text_loss", "position_loss", "autoregressive_loss")
#: Distinct "epoch" of the per-step dropout seeds (data epochs are small numbers).
_STEP_SEED_STREAM = 1 << 30
#: The optimiser, schedule and batch settings the run goes on with (:func:`run_settings`), beside ``stage_info.json``.
SETTINGS_FILE = "run_settings.json"
#: Settings changes allowed on resume, one JSON line each (step, time, ``{key: {"old", "new"}}``), in ``logs/``.
SETTINGS_CHANGES = "settings_changes.jsonl"


@dataclass
class TrainState:
    """Where the run is: registered for checkpointing, restored by ``load_state``.

    Attributes:
        epoch: current epoch.
        offset: samples of this rank's share of ``epoch`` already trained on.
        step: optimizer steps done.
        samples: samples trained on, all ranks.
        tokens: non-padding tokens trained on, all ranks.
    """

    epoch: int = 0
    offset: int = 0
    step: int = 0
    samples: int = 0
    tokens: int = 0

    def state_dict(self) -> dict[str, int]:
        """Plain ints (accelerate pickles them as ``custom_checkpoint_0.pkl``)."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore from :meth:`state_dict`; a missing key is an error."""
        for key in asdict(self):
            if key not in state:
                raise CheckpointError(f"trainer state lacks {key!r}; the checkpoint is from another version")
            setattr(self, key, int(state[key]))


class CurriculumModule(nn.Module):
    """The model plus the optional next-frame predictor: one module for accelerate to wrap.

    ``forward(batch)`` returns ``{"loss", "main_loss", "text_loss"?, "position_loss"?, "autoregressive_loss"?}``.
    The frozen teacher is held outside the module tree (never wrapped, trained or saved).
    """

    def __init__(
        self,
        model: AgriVLMForConditionalGeneration,
        predictor: NextFramePredictor | None = None,
        teacher: FrozenTeacher | None = None,
        loss_weight: float = 0.0,
        fast_slow: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.predictor = predictor
        object.__setattr__(self, "teacher", teacher)
        self.loss_weight = loss_weight
        self.fast_slow = fast_slow

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Losses of one micro-batch (see the class docstring)."""
        is_fast = batch.pop("is_fast", None)
        want_hidden = self.predictor is not None
        out = self.model(**batch, output_hidden_states=want_hidden)
        losses: dict[str, torch.Tensor] = {"main_loss": out.loss}
        if out.text_loss is not None:
            losses["text_loss"] = out.text_loss
        if out.position_loss is not None:
            losses["position_loss"] = out.position_loss
        total = out.loss
        if self.predictor is not None:
            teacher: FrozenTeacher = self.teacher  # type: ignore[assignment]
            pixels = batch["pixel_values"]
            targets, grid = teacher(pixels)
            cfg = self.model.config
            ids = [i for i in (cfg.image_token_id, cfg.video_token_id) if i is not None]
            hidden = visual_hidden_states(
                out.hidden_states[-1], batch["input_ids"], ids,
                pixels.shape[0], pixels.shape[1],
            )
            rec = self.predictor.loss(targets, hidden, grid, is_fast if self.fast_slow else None)
            losses["autoregressive_loss"] = rec.loss.detach()
            total = total + self.loss_weight * rec.loss
        losses["loss"] = total
        return losses


def _mixed_precision(choice: str) -> str | None:
    if choice != "auto":
        return choice
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return None  # what `accelerate launch` was told
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory so far in MiB: allocated by torch on a CUDA device, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def set_learning_rates(optimizer: torch.optim.Optimizer, cfg: StageConfig, step: int) -> dict[str, float]:
    """Set each param group's LR for optimizer step ``step`` (0-based); returns ``{"lr_main", "lr_lape"}``."""
    o = cfg.optim
    base = o.lr * base_lr_factor(step, cfg.train.max_steps, o.warmup_steps, o.schedule)
    lape = cfg.lape
    lape_lr = base * (lape_lr_factor(step, lape.lape_lr_multiplier, lape.lape_warmup_steps) if lape else 1.0)
    out = {}
    for group in optimizer.param_groups:
        group["lr"] = lape_lr if group.get("name") == "lape" else base
        out[f"lr_{group.get('name', 'main')}"] = float(group["lr"])
    return out


def _band_stats(cfg: StageConfig, sm: StageModel, records: list[SourceRecord], stacks: StackCache) -> BandStats | None:
    norm = cfg.data.normalize
    if norm.mode == "chip":
        return None
    if norm.mode == "fixed":
        return fixed_band_stats(norm)
    if sm.band_stats is not None:
        return BandStats.from_dict(sm.band_stats)
    return dataset_band_stats(records, stacks, norm)


def checkpoint_inputs(cfg: StageConfig, stats: BandStats | None, records: Sequence[SourceRecord],
                      chips: ChipRule | None = None) -> InputConfig:
    """How ``agrivlm infer`` must prepare inputs for the model this stage trains (``agrivlm_inputs.yaml``).

    Chips as the recipes cut them (``chips``, :func:`recipe_chips`: size, edge, the clear fraction a date
    needs; without it the training records' size and the recipes' defaults), stride half the size (the
    overlap inference merges; the recipes' own stride only sets how many training chips there are), cloudy
    pixels as no data, as many frames per question as each training sample had (fewer: the chip is skipped,
    as training left such records out), the band preset and the normalisation range training used (per-chip
    percentiles when training normalised per chip), the time axis of the records.
    """
    if chips is not None:
        size, edge = chips.size, chips.edge
    else:
        size = int(records[0].record.chip.window.width) if records else InputConfig().chip_size
        edge = InputConfig().edge
    frames_cfg = cfg.data.frames
    n = frames_cfg.frames_per_sample
    if not frames_cfg.clouds_as_nodata:
        log.warning("data.frames.clouds_as_nodata is off: trained on cloudy pixels' values, but agrivlm infer feeds "
                    "this checkpoint cloudy pixels as no data (its frames.clouds_as_nodata)")
    frames = frames_cfg.input_frames()
    if chips is not None:
        frames = chips.input_frames(frames)
    bands = cfg.data.normalize.input_bands(stats)
    # a model trained on point prompts is asked for fields point by point (a listing it may never have seen)
    points = any(sr.record.task == "field_at_point" for sr in records)
    # and for growth stages by one timeline per field and season when it learned them more than date by date
    tasks = Counter(sr.record.task for sr in records)
    timeline = tasks["stage_timeline"] > tasks["stage_on_date"]
    # records written before their time_range measured t on their frames' range: the model learned that axis
    seasons = all(sr.record.chip.time_range is not None for sr in records)
    return InputConfig(time_axis="seasons" if seasons else "usable_dates",
                       chip_size=size, stride=max(size // 2, 1), edge=edge,
                       frames=frames, min_frames=n, bands=bands,
                       fields_prompt="points" if points else "listing",
                       growth_prompt="timeline" if timeline else "dates", growth_focus=cfg.data.growth_focus,
                       point_marker=cfg.data.point_marker, question_positions=cfg.data.question_positions,
                       anyres=cfg.data.anyres, scales=cfg.data.scales, max_patches=cfg.data.max_patches,
                       frames_as_bands=cfg.data.frames_as_bands)


def run_settings(cfg: StageConfig, num_processes: int) -> dict[str, Any]:
    """The settings a resume must keep, by dotted key (``{"optim.lr": 0.001, "train.batch_size": 8, ...}``).

    The optimizer and every ``optim`` key, the batch (``train.batch_size``, ``train.grad_accum``, the number of
    processes), the LAPE group's LR factors and, when the schedule decays, its length ``train.max_steps``.
    """
    settings: dict[str, Any] = {"optimizer": "AdamW"}
    settings.update({f"optim.{k}": v for k, v in cfg.optim.model_dump(mode="json").items()})
    settings.update({"train.batch_size": cfg.train.batch_size, "train.grad_accum": cfg.train.grad_accum,
                     "processes": num_processes})
    if cfg.lape is not None:
        settings["lape.lape_lr_multiplier"] = cfg.lape.lape_lr_multiplier
        settings["lape.lape_warmup_steps"] = cfg.lape.lape_warmup_steps
    if cfg.optim.schedule != "constant":
        settings["train.max_steps"] = cfg.train.max_steps
    return settings


def started_settings(out: Path) -> dict[str, Any] | None:
    """The settings the run in ``out`` goes on with (:func:`run_settings`), or None when nothing says.

    From ``run_settings.json`` or, for a run from before it, its ``stage_info.json``.

    Raises:
        ConfigError: ``run_settings.json`` is unreadable.
    """
    path = out / SETTINGS_FILE
    if path.is_file():
        try:
            return dict(json.loads(path.read_text())["settings"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: unreadable ({exc}); remove it to resume without checking the settings") from exc
    try:
        info = json.loads((out / STAGE_INFO).read_text())
        return run_settings(StageConfig.model_validate(info["config"]), int(info["num_processes"]))
    except (OSError, ValueError, KeyError, TypeError):  # none, or from another version (ValidationError: ValueError)
        return None


def settings_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (old, new)}`` of every setting that differs, keys sorted (a key on one side only: None on the other)."""
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    """``"optim.lr 0.01 → 0.02, train.batch_size 8 → 4"`` (an absent value reads ``unset``)."""
    def show(v: Any) -> str:
        return "unset" if v is None else str(v)

    return ", ".join(f"{k} {show(a)} → {show(b)}" for k, (a, b) in changes.items())


def first_nonfinite(named: Sequence[tuple[str, torch.Tensor]]) -> str | None:
    """The first tensor of ``named`` holding NaN or ±inf, as ``"name (n NaN, m inf of N values)"``; None if none.

    One device sync for the whole list; the counts only for the tensor named.
    """
    if not named:
        return None
    device = named[0][1].device
    ok = torch.stack([torch.isfinite(t.detach()).all().to(device) for _, t in named])
    if bool(ok.all()):
        return None
    name, t = named[int((~ok).nonzero()[0, 0])]
    t = t.detach()
    return f"{name} ({int(torch.isnan(t).sum())} NaN, {int(torch.isinf(t).sum())} inf of {t.numel()} values)"


def _largest(named: Sequence[tuple[str, torch.Tensor]]) -> str:
    """``"largest |value| 1e+30 in name"`` over finite tensors (a diverged learning rate shows here)."""
    sizes = [(float(t.detach().abs().max()), n) for n, t in named if t.numel()]
    value, name = max(sizes) if sizes else (0.0, "-")
    return f"largest |value| {value:.3g} in {name}"


def _kept(ckpt_root: Path) -> str:
    """What a stopped run leaves to resume from, for its error message."""
    last = latest_checkpoint(ckpt_root)
    return f"checkpoints up to {last} are kept" if last else "no checkpoint was written yet"


def _check_start_weights(cfg: StageConfig, sm: StageModel) -> None:
    """Refuse starting weights that are not finite, naming the parameter as its source folder names it."""
    named = [(n.replace(".base_layer.", "."), p) for n, p in sm.model.named_parameters()]
    culprit = first_nonfinite(named)
    if culprit is None:
        return
    fix = ("retrain the stage that wrote it or point model.init_from at another folder" if cfg.stage != "stage1"
           else "check the checkpoints the model YAML points at")
    raise TrainError(f"{sm.init_source}: parameter {culprit} is not finite before training; {fix}")


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _has_run(out: Path) -> bool:
    return (out / "checkpoints").exists() or (out / "final").exists() or (out / "logs").exists()


def _check_output(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to start over a previous run without ``overwrite`` (nothing is removed here)."""
    if not resume and _has_run(out) and not overwrite:
        raise ConfigError(
            f"{out}: already holds a run (checkpoints/, logs/ or final/); pass --resume to continue it or "
            "--overwrite to start over"
        )


def _clear_previous(out: Path, resume: bool, is_main: bool) -> None:
    """``overwrite``: remove the previous run, once the new one's model and data have loaded."""
    if resume or not is_main or not _has_run(out):
        return
    for name in ("checkpoints", "final", "final.partial", "logs"):
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)


def run_stage(
    config: StageConfig | str | os.PathLike[str],
    overrides: dict[str, Any] | None = None,
    *,
    stage: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    allow_changed_settings: bool = False,
) -> Path:
    """Run one curriculum stage; returns its final folder (``<output_dir>/final``, the next stage's ``init_from``).

    Args:
        config: a :class:`StageConfig` or the path of a stage YAML.
        overrides: dotted-key overrides (``{"train.max_steps": 20, "data.roots": ["runs/data/x"]}``).
        stage: the stage the caller means (checked against the config's ``stage``).
        resume: continue from the newest complete checkpoint under ``<output_dir>/checkpoints`` (an error
            when there is none).
        overwrite: start over in an ``output_dir`` that already holds a run.
        allow_changed_settings: let ``resume`` go on with optimiser, schedule or batch settings other than the
            run's (:func:`run_settings`); the change is recorded in ``logs/settings_changes.jsonl``.

    Raises:
        ConfigError: bad config, a stage rule broken, an output folder in the way, a resume with changed
            settings (without ``allow_changed_settings``).
        CheckpointError: ``resume`` without an intact checkpoint.
        TrainError: a loss or weight that is not finite (names the step and the parameter).
    """
    if isinstance(config, StageConfig):
        cfg = config
        if overrides:
            cfg = parse_config(StageConfig, _nest(overrides, cfg.model_dump(mode="json")), "config + overrides")
        source = "config"
    else:
        cfg = load_stage_config(config, overrides)
        source = str(config)
    if stage is not None and cfg.stage != stage:
        raise ConfigError(f"{source}: stage: the file configures {cfg.stage}, but {stage} was asked for")
    threads = torch.get_num_threads()
    if cfg.train.torch_threads is not None:
        torch.set_num_threads(cfg.train.torch_threads)
    try:
        return _Run(cfg, resume, overwrite, allow_changed_settings).run()
    finally:
        torch.set_num_threads(threads)


def _nest(overrides: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(base))
    for dotted, value in overrides.items():
        node = out
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


@dataclass
class _StageData:
    """What a stage trains on: the train loader and its sampler, the val split, and how they were made."""

    loader: DataLoader[Any]
    sampler: ResumableSampler
    val_ds: RecordDataset | None
    collate: Collator
    stats: BandStats | None
    report: dict[str, Any]  # select_records' report of the train split
    val_records: int


@dataclass
class _StepTotals:
    """The micro-batches of the optimizer step under way, added up (a new one for each step)."""

    sums: dict[str, float] = field(default_factory=dict)  # per loss, summed over the micro-batches
    n: int = 0  # micro-batches
    ids: list[str] = field(default_factory=list)
    tokens: int = 0
    start: float = 0.0  # perf_counter() at the step's first micro-batch
    lrs: dict[str, float] = field(default_factory=dict)
    data_s: float = 0.0  # waiting for the loader's micro-batches (reading, normalising, collating)


def _timed(loader: DataLoader[Any]) -> Iterator[tuple[dict[str, Any], float]]:
    """The loader's batches, each with the seconds spent waiting for it (``data_time_s`` of the step's log)."""
    it = iter(loader)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        yield batch, time.perf_counter() - t0


def _reduce_step(acc: Any, totals: _StepTotals) -> tuple[dict[str, float], int, list[str], int]:
    """A finished step's mean losses, tokens, sample ids and sample count, over all processes."""
    from accelerate.utils import gather_object

    reduced = {k: v / totals.n for k, v in totals.sums.items()}
    step_tokens, step_ids = totals.tokens, totals.ids
    if acc.num_processes > 1:
        keys = sorted(reduced)
        local = [reduced[k] for k in keys] + [float(step_tokens), float(len(step_ids))]
        vec = acc.reduce(torch.tensor(local, device=acc.device), "sum")
        reduced = {k: float(vec[i]) / acc.num_processes for i, k in enumerate(keys)}
        step_tokens, n_samples = int(vec[-2]), int(vec[-1])
        all_ids = gather_object([step_ids])
        step_ids = [i for part in all_ids for i in part]
    else:
        n_samples = len(step_ids)
    return reduced, step_tokens, step_ids, n_samples


class _Run:
    """One stage run (state shared by the steps of :func:`run_stage`)."""

    def __init__(self, cfg: StageConfig, resume: bool, overwrite: bool, allow_changed_settings: bool = False) -> None:
        self.cfg, self.resume, self.overwrite = cfg, resume, overwrite
        self.allow_changed_settings = allow_changed_settings
        self.out = resolve(cfg.output_dir)

    # -- setup ---------------------------------------------------------------------------------------
    def _accelerator(self) -> Any:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState

        # a process may run several stages (the quickstart): start each with a fresh accelerate state
        AcceleratorState._reset_state()
        GradientState._reset_state()
        world = int(os.environ.get("WORLD_SIZE", "1"))
        # torchrun on a machine without GPUs: accelerate needs cpu=True to see the other processes (gloo)
        cpu = world > 1 and not torch.cuda.is_available()
        trackers = check_trackers(self.cfg.train.report_to)
        acc = Accelerator(
            mixed_precision=_mixed_precision(self.cfg.train.mixed_precision),
            gradient_accumulation_steps=self.cfg.train.grad_accum,
            cpu=cpu,
            log_with=trackers or None,
            project_dir=str(self.out / "logs"),
        )
        if acc.num_processes != world:
            raise ConfigError(
                f"{world} processes were launched but accelerate sees {acc.num_processes}; each would train alone "
                "into the same folder — check the launcher (accelerate launch / torchrun) and its environment"
            )
        return acc

    def run(self) -> Path:
        """Train the stage (from its checkpoint when resumed) and write its final folder; returns that folder."""
        from accelerate.utils import set_seed

        cfg, out = self.cfg, self.out
        final = out / "final"
        if self.resume and (final / STAGE_INFO).is_file() and (final / "config.json").is_file():
            log.info("%s: the stage already finished; nothing to resume", out)
            return final
        ckpt_root = out / "checkpoints"
        if self.resume and latest_checkpoint(ckpt_root) is None:
            raise CheckpointError(
                f"{ckpt_root}: no complete checkpoint to resume from; run without --resume to start the stage"
            )
        found = latest_intact_checkpoint(ckpt_root) if self.resume else None  # warns about and skips corrupt ones
        acc = self._accelerator()
        changes = self._check_settings(acc.num_processes) if self.resume else {}
        _check_output(out, self.resume, self.overwrite)
        out.mkdir(parents=True, exist_ok=True)
        set_seed(cfg.train.seed)

        sm = build_stage_model(cfg)
        _check_start_weights(cfg, sm)
        stacks = StackCache()
        data = self._data(acc, sm, stacks)
        module, optimizer, predictor = self._prepared_module(acc, sm)
        state = TrainState()
        acc.register_for_checkpointing(state)
        if found is not None:
            self._resume_from(acc, module, found, state, ckpt_root)
        info = self._stage_info(acc, sm, data, predictor)
        metrics, seen = self._start_logs(acc, state, info, changes, data.stats)
        self._snapshot = (sm, data.stats, info)
        try:
            self._loop(acc, module, optimizer, data.loader, data.sampler, data.val_ds, data.collate, state, metrics,
                       seen, ckpt_root)
            last = metrics.read()[-1] if metrics is not None and metrics.read() else {}
            finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
            result = self._save_final(acc, module, sm, data.stats,
                                      {**info, "steps": state.step, "final_metrics": last, "finished_at": finished})
        finally:
            stacks.close()
            if metrics is not None:
                metrics.close()
                plot_losses({cfg.stage: metrics.read()}, out / "logs" / "loss_curves.png")
            # the trackers' own end (what Accelerator.end_training does first), without its destroying the process
            # group: a process may train several stages (the quickstart, agrivlm train default)
            for tracker in acc.trackers:
                tracker.finish()
        acc.wait_for_everyone()
        return result

    def _data(self, acc: Any, sm: StageModel, stacks: StackCache) -> _StageData:
        """The stage's records as the train loader and val split; sets :attr:`inputs`, clears an overwritten run."""
        cfg, out = self.cfg, self.out
        lape_on = bool(sm.model.config.enable_lape)
        train_records, report = select_records(read_split(cfg.data.roots, "train"), cfg.data, cfg.train.seed, True)
        val_records, _ = select_records(read_split(cfg.data.roots, "val"), cfg.data, cfg.train.seed, False)
        stats = _band_stats(cfg, sm, train_records, stacks)
        self.inputs = checkpoint_inputs(cfg, stats, train_records, recipe_chips(cfg.data.roots))
        # --overwrite removes the previous run only now: a missing data root, model config or init_from
        # raised above and left it as it was
        _clear_previous(out, self.resume, acc.is_main_process)
        acc.wait_for_everyone()
        vocab = sm.processor.vocab
        frames, norm, seed = cfg.data.frames, cfg.data.normalize, cfg.train.seed
        focus, given, marker = cfg.data.growth_focus, cfg.data.question_positions, cfg.data.point_marker
        answered = cfg.data.answer_positions
        if (given == "input" or answered == "output") and not lape_on:
            key = "question_positions: input" if given == "input" else "answer_positions: output"
            raise ConfigError(f"data.{key} needs LAPE on (the -INPUT/-OUTPUT placeholders take their value from the "
                              "LAPE tables); use bins with lape.enabled: false")
        # how a record becomes a sample: the same for the training and the validation records
        rendering: dict[str, Any] = {"growth_focus": focus, "question_positions": given, "point_marker": marker,
                                     "answer_positions": answered, "frames_as_bands": cfg.data.frames_as_bands}
        train_ds = RecordDataset(train_records, frames, norm, vocab, seed, stats, stacks=stacks, **rendering)
        val_ds = RecordDataset(val_records, frames, norm, vocab, seed, stats, False, stacks,
                               **rendering) if val_records else None
        collate = Collator(sm.processor, lape_on, item_layout(cfg.data.anyres, cfg.data.scales, cfg.data.max_patches))
        sampler = ResumableSampler(
            len(train_ds), cfg.train.seed, shuffle=True, num_replicas=acc.num_processes, rank=acc.process_index
        )
        if sampler.per_rank() < 1:
            raise ConfigError(f"data: {len(train_ds)} training samples for {acc.num_processes} processes")
        loader = DataLoader(
            train_ds, batch_size=cfg.train.batch_size, sampler=EpochIndexSampler(sampler), collate_fn=collate,
            num_workers=cfg.data.num_workers, generator=seeded_generator(cfg.train.seed),
        )
        return _StageData(loader, sampler, val_ds, collate, stats, report, len(val_records))

    def _prepared_module(self, acc: Any, sm: StageModel) -> tuple[Any, Any, NextFramePredictor | None]:
        """The :class:`CurriculumModule` and its AdamW (param groups ``main``, ``lape``), prepared by accelerate.

        With ``reconstruction`` on, the module holds a new next-frame predictor (also returned) and its frozen teacher.
        """
        cfg = self.cfg
        model = sm.model
        rec = cfg.reconstruction
        predictor = teacher = None
        if rec.enabled:
            if model.config.faster_video_stride:
                raise ConfigError("reconstruction.enabled: the next-frame loss reads every frame's visual tokens on "
                                  "one grid; the model's faster_video_stride "
                                  f"({model.config.faster_video_stride}) pools frames on two: turn one of them off")
            teacher = FrozenTeacher(model, share_vision=not cfg.trainable.vision)
            vcfg: Any = model.config.vision_config
            tcfg: Any = model.config.text_config
            predictor = NextFramePredictor(
                int(vcfg.hidden_size), int(tcfg.hidden_size),
                rec.embedding_dim, rec.num_layers, rec.num_heads, rec.num_hist, rec.normalize_targets,
                rec.pool_strides,
            )
        module = CurriculumModule(model, predictor, teacher, rec.loss_weight, rec.fast_slow)
        main = sm.groups["main"] + (list(predictor.parameters()) if predictor is not None else [])
        groups = [{"params": main, "name": "main"}]
        if sm.groups["lape"]:
            groups.append({"params": sm.groups["lape"], "name": "lape"})
        o = cfg.optim
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
        prepared, optimizer = acc.prepare(module, optimizer)
        if teacher is not None:
            teacher.to(acc.device)
        return prepared, optimizer, predictor

    def _resume_from(self, acc: Any, module: nn.Module, found: Path, state: TrainState, ckpt_root: Path) -> None:
        """Load checkpoint ``found`` (weights, optimizer, RNG, ``state``); refuse one whose weights are not finite."""
        step = load_checkpoint(acc, found, num_custom=1, verify=False)  # verified by latest_intact_checkpoint
        if step != state.step:
            raise CheckpointError(f"{found}: marker says step {step} but the trainer state says {state.step}")
        culprit = first_nonfinite(list(acc.unwrap_model(module).named_parameters()))
        if culprit is not None:
            raise TrainError(f"{found}: parameter {culprit} is not finite; move this checkpoint out of "
                             f"{ckpt_root} to resume from an older one")
        log.info("resumed from %s (step %d, epoch %d, offset %d)", found, state.step, state.epoch, state.offset)

    def _stage_info(self, acc: Any, sm: StageModel, data: _StageData, predictor: NextFramePredictor | None
                    ) -> dict[str, Any]:
        """What ``stage_info.json`` says of the run (and, completed at the end, the final folder's)."""
        cfg = self.cfg
        return {
            "stage": cfg.stage,
            "init_source": sm.init_source,
            "init_adapter": sm.init_adapter,
            "init_digests": sm.init_digests,
            "lape": bool(sm.model.config.enable_lape),
            "llm_pretrained": sm.llm_pretrained,
            "config": cfg.model_dump(mode="json"),
            "data": data.report,
            "val_records": data.val_records,
            "num_processes": acc.num_processes,
            "mixed_precision": str(acc.mixed_precision),
            "trainable_parameters": {k: int(sum(p.numel() for p in v)) for k, v in sm.groups.items()},
            "predictor_parameters": int(sum(p.numel() for p in predictor.parameters())) if predictor else 0,
            "data_sources": data_sources(cfg.data.roots),
            "started_at": self._started_at(),
        }

    def _start_logs(self, acc: Any, state: TrainState, info: dict[str, Any], changes: dict[str, tuple[Any, Any]],
                    stats: BandStats | None) -> tuple[TrainLog | None, _SeenLog]:
        """Write the run's info and settings, start the trackers; the metrics log (main process) and samples log."""
        cfg, out = self.cfg, self.out
        if acc.is_main_process:
            write_json(out / STAGE_INFO, info, sort_keys=True, trailing_newline=False)
            self._write_settings(acc.num_processes, state.step, changes)
            if stats is not None:
                write_json(out / "band_stats.json", stats.to_dict(), sort_keys=True, trailing_newline=False)
        metrics = None
        if cfg.train.report_to:  # after _clear_previous: the trackers write into logs/
            acc.init_trackers(TRACKER_PROJECT, config=tracker_config(cfg.model_dump(mode="json")),
                              init_kwargs={"wandb": {"name": f"{out.name} {cfg.stage}"}})
        if acc.is_main_process:
            sink = (lambda row, step: acc.log(row, step=step)) if cfg.train.report_to else None
            metrics = TrainLog(out / "logs", resume_step=state.step if self.resume else None, sink=sink)
        seen = _SeenLog(out / "logs" / "samples.jsonl", state.step if self.resume else None, acc.is_main_process)
        return metrics, seen

    def _started_at(self) -> str:
        """When the stage started (UTC, ISO 8601): now, or a resumed run's first start from its ``stage_info.json``."""
        if self.resume:
            try:
                return str(json.loads((self.out / STAGE_INFO).read_text())["started_at"])
            except (OSError, ValueError, KeyError, TypeError):  # a run from before started_at was recorded
                pass
        return datetime.now(timezone.utc).isoformat(timespec="seconds")

    # -- loop ----------------------------------------------------------------------------------------
    def _loop(
        self, acc: Any, module: nn.Module, optimizer: Any, loader: DataLoader[Any], sampler: ResumableSampler,
        val_ds: RecordDataset | None, collate: Collator, state: TrainState, metrics: TrainLog | None,
        seen: _SeenLog, ckpt_root: Path,
    ) -> None:
        """Train from ``state`` to ``train.max_steps`` optimizer steps, epoch after epoch, logging and checkpointing."""
        from accelerate.utils import set_seed

        cfg = self.cfg
        t = cfg.train
        params = [p for p in module.parameters() if p.requires_grad]
        trainable = [(n, p) for n, p in acc.unwrap_model(module).named_parameters() if p.requires_grad]
        show = t.progress and acc.is_main_process
        bar = tqdm(total=t.max_steps, initial=state.step, desc=cfg.stage, disable=not show, dynamic_ncols=True)
        if state.step == 0 and t.eval_every >= 0 and val_ds is not None:
            baseline = self._evaluate(acc, module, val_ds, collate)  # the starting point, logged as step 0
            if metrics is not None:
                metrics.log(0, baseline)
        module.train()
        totals = _StepTotals()
        began = time.perf_counter()
        while state.step < t.max_steps:
            sampler.set_position(state.epoch, state.offset)
            for batch, waited in _timed(loader):
                if totals.n == 0:
                    set_seed(sample_seed(t.seed, _STEP_SEED_STREAM + acc.process_index, state.step) % (1 << 32))
                    totals.lrs = set_learning_rates(optimizer, cfg, state.step)
                    totals.start = time.perf_counter()
                totals.data_s += waited
                self._micro_batch(acc, module, optimizer, params, batch, state, ckpt_root, totals)
                if not acc.sync_gradients:
                    continue
                # one optimizer step done
                culprit = first_nonfinite(trainable)
                if culprit is not None:
                    raise TrainError(
                        f"optimizer step {state.step + 1}: parameter {culprit} is not finite after the update "
                        f"(the loss was finite); {_kept(ckpt_root)}; lower optim.lr or optim.max_grad_norm, then resume"
                    )
                reduced, step_tokens, step_ids, n_samples = _reduce_step(acc, totals)
                elapsed = max(time.perf_counter() - totals.start, 1e-9)
                state.step += 1
                state.samples += n_samples
                state.tokens += step_tokens
                seen.write(state.step, step_ids)
                row = {**reduced, **totals.lrs, "epoch": state.epoch, "samples": state.samples,
                       "tokens_per_s": step_tokens / elapsed, "step_time_s": elapsed,
                       # the loader's share, and the wall clock since the loop began (what data, logging,
                       # evaluation and checkpoints cost beside the steps: benchmarks/train_step.py --vs-bare)
                       "data_time_s": totals.data_s, "wall_s": time.perf_counter() - began,
                       "peak_mem_mib": peak_memory_mib(acc.device)}
                self._after_step(acc, module, val_ds, collate, state, metrics, row, bar, ckpt_root)
                totals = _StepTotals()
                if state.step >= t.max_steps:
                    break
            else:
                state.epoch += 1
                state.offset = 0
        bar.close()

    def _micro_batch(
        self, acc: Any, module: nn.Module, optimizer: Any, params: list[nn.Parameter], batch: dict[str, Any],
        state: TrainState, ckpt_root: Path, totals: _StepTotals,
    ) -> None:
        """Forward and backward one micro-batch (clipped and applied when it ends a step); add it to ``totals``."""
        cfg = self.cfg
        ids = batch.pop("sample_ids")
        tokens = int(batch["attention_mask"].sum())
        batch = _to_device(batch, acc.device)
        with acc.accumulate(module):
            losses = module(batch)
            self._stop_if_nonfinite(acc, module, losses, state.step + 1, ids, ckpt_root)
            acc.backward(losses["loss"])
            if acc.sync_gradients and cfg.optim.max_grad_norm > 0:
                acc.clip_grad_norm_(params, cfg.optim.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
        for k, v in losses.items():
            totals.sums[k] = totals.sums.get(k, 0.0) + float(v.detach())
        totals.n += 1
        totals.ids.extend(ids)
        totals.tokens += tokens
        state.offset += len(ids)

    def _after_step(
        self, acc: Any, module: nn.Module, val_ds: RecordDataset | None, collate: Collator, state: TrainState,
        metrics: TrainLog | None, row: dict[str, Any], bar: Any, ckpt_root: Path,
    ) -> None:
        """Evaluate, log ``row``, checkpoint and snapshot after optimizer step ``state.step``, as ``train`` says."""
        t = self.cfg.train
        if t.eval_every > 0 and state.step % t.eval_every == 0 and val_ds is not None:
            row.update(self._evaluate(acc, module, val_ds, collate))
            module.train()
        if state.step == t.max_steps and t.eval_every >= 0 and val_ds is not None and "eval_loss" not in row:
            row.update(self._evaluate(acc, module, val_ds, collate))
        if metrics is not None and (state.step % t.log_every == 0 or state.step == t.max_steps):
            metrics.log(state.step, row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
        if (t.save_every and state.step % t.save_every == 0) or state.step == t.max_steps:
            save_checkpoint(acc, ckpt_root, state.step, keep=t.keep_checkpoints)
        if t.snapshot_every and state.step % t.snapshot_every == 0:
            sm, stats, info = self._snapshot
            self._save_final(acc, module, sm, stats, {**info, "steps": state.step},
                             folder=self.out / "snapshots" / f"step-{state.step:06d}")

    def _stop_if_nonfinite(self, acc: Any, module: nn.Module, losses: dict[str, torch.Tensor], step: int,
                           ids: list[str], ckpt_root: Path) -> None:
        """Raise :class:`TrainError` before the update when a micro-batch's loss is NaN or ±inf on any process.

        Every process checks the flag reduced over all of them, so all stop together; the message names the
        optimizer step (1-based, as the logs and checkpoints count), the losses, the first samples, and the first
        parameter that is not finite or, when all are, the largest weight (a learning rate that blew up).
        """
        local = not bool(torch.isfinite(losses["loss"].detach()))
        flag = torch.tensor(float(local), device=acc.device)
        if acc.num_processes > 1:
            flag = acc.reduce(flag, "sum")
        if not bool(flag > 0):
            return
        named = list(acc.unwrap_model(module).named_parameters())
        culprit = first_nonfinite(named)
        weights = f"parameter {culprit} is not finite" if culprit else f"every parameter is finite ({_largest(named)})"
        if local:
            shown = ", ".join(f"{k} {float(v.detach()):g}" for k, v in losses.items())
            where = f"({shown}) on samples {', '.join(ids[:3])}{', …' if len(ids) > 3 else ''}"
        else:
            where = f"on another process than {acc.process_index}"
        raise TrainError(
            f"optimizer step {step} of {self.cfg.train.max_steps}: the loss is not finite {where}; {weights}; stopped "
            f"before the update, {_kept(ckpt_root)}; lower optim.lr (now {self.cfg.optim.lr:g}) or check these "
            "samples, then resume"
        )

    # -- settings a resume must keep -----------------------------------------------------------------
    def _check_settings(self, num_processes: int) -> dict[str, tuple[Any, Any]]:
        """The optimiser, schedule and batch settings changed since the run's start: an error unless allowed."""
        old = started_settings(self.out)
        if old is None:
            log.warning("%s: no %s (a run from an older agrivlm); its optimiser and batch settings are not checked",
                        self.out, SETTINGS_FILE)
            return {}
        changes = settings_changes(old, run_settings(self.cfg, num_processes))
        if changes and not self.allow_changed_settings:
            raise ConfigError(
                f"{self.out}: --resume with changed settings: {describe_changes(changes)} (the run's are in "
                f"{SETTINGS_FILE}); set them back, pass --allow-changed-settings (run_stage(..., "
                f"allow_changed_settings=True)) to go on with the new ones, or start over with --overwrite"
            )
        if changes:
            log.warning("%s: resuming with changed settings: %s (allowed; recorded in logs/%s)",
                        self.out, describe_changes(changes), SETTINGS_CHANGES)
        return changes

    def _write_settings(self, num_processes: int, step: int, changes: dict[str, tuple[Any, Any]]) -> None:
        """``run_settings.json`` at a run's start (or a resumed run's first without one), and an allowed change."""
        path = self.out / SETTINGS_FILE
        if self.resume and path.is_file() and not changes:
            return
        if changes:
            record = {"step": step, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      "changes": {k: {"old": a, "new": b} for k, (a, b) in changes.items()}}
            (self.out / "logs").mkdir(parents=True, exist_ok=True)
            with (self.out / "logs" / SETTINGS_CHANGES).open("a") as fh:
                fh.write(json.dumps(record, sort_keys=True) + "\n")
        write_json(path, {"settings": run_settings(self.cfg, num_processes), "from_step": step}, sort_keys=True,
                       trailing_newline=False)

    @torch.no_grad()
    def _evaluate(self, acc: Any, module: nn.Module, ds: RecordDataset, collate: Collator) -> dict[str, float]:
        """Mean losses over the first ``eval_batches`` micro-batches of the val split (every process the same)."""
        module.eval()
        b = self.cfg.train.batch_size
        sums: dict[str, float] = {}
        n = 0
        for k in range(self.cfg.train.eval_batches):
            idx = range(k * b, min((k + 1) * b, len(ds)))
            if not idx:
                break
            batch = collate([ds[(0, i)] for i in idx])
            batch.pop("sample_ids")
            losses = module(_to_device(batch, acc.device))
            for name, v in losses.items():
                sums[name] = sums.get(name, 0.0) + float(v)
            n += 1
        return {f"eval_{k}": v / n for k, v in sums.items()} if n else {}

    # -- final folder --------------------------------------------------------------------------------
    def _save_final(self, acc: Any, module: nn.Module, sm: StageModel, stats: BandStats | None,
                    info: dict[str, Any], folder: Path | None = None) -> Path:
        """The HF folder of the current weights: ``final/`` (or ``folder``, a snapshot), written then renamed."""
        final = folder if folder is not None else self.out / "final"
        partial = final.with_name(final.name + ".partial")
        state = acc.get_state_dict(module)  # gathered (FSDP/DeepSpeed) on the main process
        if acc.is_main_process:
            model_sd = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
            model = final_model(sm, model_sd, self.cfg.trainable.llm.lora)  # with LoRA: peft's, merged by save_final
            if partial.exists():
                shutil.rmtree(partial)
            partial.parent.mkdir(parents=True, exist_ok=True)
            save_final(partial, model, sm.processor, self.inputs, stats, info)
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
        acc.wait_for_everyone()
        return final


class _SeenLog:
    """``samples.jsonl``: the sample ids of every optimizer step (rows past a resumed step are dropped)."""

    def __init__(self, path: Path, resume_step: int | None, active: bool) -> None:
        self.path, self.active = path, active
        if not active:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.unlink(missing_ok=True)
        elif path.exists():
            kept = [r for r in read_seen(path) if r["step"] <= resume_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, step: int, ids: list[str]) -> None:
        """Append one step's ids."""
        if self.active:
            with self.path.open("a") as fh:
                fh.write(json.dumps({"step": step, "ids": ids}) + "\n")


def read_seen(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of ``samples.jsonl`` (a torn last line from a killed run is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


__all__ = [
    "CurriculumModule", "TrainState", "first_nonfinite", "read_seen", "run_settings", "run_stage", "set_learning_rates",
]
