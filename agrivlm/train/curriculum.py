"""The three-stage curriculum: what each stage starts from and what it trains.

After the LAPE initialisation report:

* **stage1 — vision–language alignment.** Built from a model YAML with LAPE **off** (position tokens are
  plain vocabulary); the projector and band adapter train, the vision encoder and the LLM are frozen.
* **stage2 — LAPE warm-up.** Starts from stage 1's final folder and switches LAPE **on**: the LAPE tables
  and heads are created and drawn by the smart init from the (frozen) LLM embeddings' statistics; the
  position-token rows of the LLM's text vocabulary, never trained, are dropped (those ids now belong to
  the LAPE tables). LAPE trains in its own optimizer group (``lape_lr_multiplier``, ``lape_warmup_steps``);
  ``spatial_loss_weight`` / ``temporal_loss_weight`` weight the position-token losses.
* **stage3 — agricultural fine-tune.** Starts from stage 2's final folder (LAPE on); the LLM trains
  through LoRA (peft; merged into the weights of the final folder by peft's ``merge_and_unload``, the adapter
  saved beside them in ``final/adapter``, :mod:`agrivlm.train.lora`) or fully, by config.

Stages 2 and 3 may start from ``model.init_from`` plus a peft adapter (``model.adapter``: merged into the
starting weights, :func:`apply_adapter`).

Rules that define a stage are checked (:func:`check_stage_rules`) and broken ones are
:class:`~agrivlm.errors.ConfigError` naming the key; the rest (which parts train) is configuration.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from agrivlm.errors import ConfigError
from agrivlm.model.builders import (
    TINY_CONFIG,
    build_model,
    generation_config_for,
    init_lape,
    load_model_settings,
    load_pretrained,
)
from agrivlm.model.configuration import saved_model_config
from agrivlm.model.modeling import AgriVLMForConditionalGeneration
from agrivlm.pipeline.inputs import saved_processor_config
from agrivlm.train.checkpoint import CheckpointError
from agrivlm.train.config import STAGES, LapeTrainConfig, LoraSettings, StageConfig, Trainables, resolve
from agrivlm.train.lora import LLM, LORA_MARK, adapter_model, apply_adapter, inject_lora, split_lora_state

log = logging.getLogger(__name__)

#: Written into every run folder and final folder: which stage, from what, with which settings (a final folder's
#: ``config.json`` carries the same as ``stage_info``, :mod:`agrivlm.train.final`).
STAGE_INFO = "stage_info.json"
#: The training data's band normalisation (:meth:`BandStats.to_dict`), reused by the next stage (a final folder's
#: ``processor_config.json`` carries the same as ``band_stats``).
BAND_STATS = "band_stats.json"
#: Top-level parts of the model whose weights are fingerprinted (:func:`module_digests`).
PARTS: tuple[str, ...] = ("band_adapter", "vision_tower", "projector", "language_model", "lape")


def previous_stage(stage: str) -> str | None:
    """The stage a stage starts from (None for stage 1)."""
    i = STAGES.index(stage)  # type: ignore[arg-type]
    return STAGES[i - 1] if i > 0 else None


def check_stage_rules(cfg: StageConfig, source: str = "config") -> None:
    """The rules that make a stage that stage; :class:`ConfigError` naming the key otherwise."""
    t = cfg.trainable
    if cfg.stage == "stage1":
        if cfg.lape is not None:
            raise ConfigError(f"{source}: lape: stage1 (alignment) runs without LAPE; remove the lape section")
        if t.llm.mode != "frozen" or t.vision:
            raise ConfigError(
                f"{source}: trainable: stage1 (alignment) keeps the vision encoder and the LLM frozen "
                "(trainable.vision: false, trainable.llm.mode: frozen)"
            )
        if cfg.model.init_from is not None:
            raise ConfigError(f"{source}: model.init_from: stage1 builds its model from model.config; remove init_from")
        if cfg.model.adapter is not None:
            raise ConfigError(f"{source}: model.adapter: stage1 builds its model from model.config; an adapter goes on "
                              "a stage 2 or 3 model.init_from")
    else:
        if (cfg.model.init_from is None) == (cfg.model.config is None):
            prev = previous_stage(cfg.stage)
            raise ConfigError(
                f"{source}: model.init_from: {cfg.stage} starts from the {prev} model; set it to {prev}'s "
                "<output_dir>/final (or, to skip the stages before, model.config and not init_from)"
            )
        if cfg.model.overrides and cfg.model.config is None:
            raise ConfigError(f"{source}: model.overrides: they change model.config, which {cfg.stage} does not set "
                              "(it loads init_from)")
        if cfg.model.config is not None and cfg.model.adapter is not None:
            raise ConfigError(f"{source}: model.adapter: goes on an init_from model, not one built from model.config")


def module_digests(model: nn.Module) -> dict[str, str]:
    """SHA-256 of the weights of each part in :data:`PARTS` (names and bytes, sorted by name); absent parts left out."""
    return state_digests(model.state_dict())


def state_digests(sd: dict[str, torch.Tensor]) -> dict[str, str]:
    """:func:`module_digests` of a state dict (parameters and buffers by their names in the model)."""
    out: dict[str, str] = {}
    for part in PARTS:
        keys = sorted(k for k in sd if k.split(".", 1)[0] == part)
        if not keys:
            continue
        h = hashlib.sha256()
        for k in keys:
            t = sd[k].detach().cpu().contiguous()
            h.update(k.encode())
            h.update(str(t.dtype).encode())
            # reshape: 0-d tensors too (BatchNorm's num_batches_tracked)
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        out[part] = h.hexdigest()
    return out


def read_stage_info(folder: str | Path) -> dict[str, Any] | None:
    """The ``stage_info.json`` of a run or final folder, else the ``stage_info`` of its ``config.json``, or None."""
    path = Path(folder) / STAGE_INFO
    if path.is_file():
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    return (saved_model_config(folder) or {}).get("stage_info")


def read_band_stats(folder: str | Path) -> dict[str, Any] | None:
    """The ``band_stats.json`` of a final folder, else the ``band_stats`` of its ``processor_config.json``, or None."""
    path = Path(folder) / BAND_STATS
    if path.is_file():
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    return (saved_processor_config(folder) or {}).get("band_stats")


def enable_lape(
    model: AgriVLMForConditionalGeneration, tokenizer: Any, lape: LapeTrainConfig, seed: int
) -> AgriVLMForConditionalGeneration:
    """A LAPE-on copy of a LAPE-off model: same weights, LAPE tables and heads drawn by the chosen init.

    The LLM's text vocabulary shrinks to the ids below ``position_token_offset`` (the position tokens'
    rows, plain vocabulary while LAPE was off, are replaced by the LAPE tables).

    Raises:
        ConfigError: the token counts differ from the model's tokenizer.
    """
    cfg = model.config
    for key in ("num_spatial_tokens", "num_temporal_tokens"):
        if getattr(lape, key) not in (None, getattr(cfg, key)):
            raise ConfigError(
                f"lape.{key}: {getattr(lape, key)} but the stage-1 model's tokenizer has {getattr(cfg, key)}; "
                f"use {getattr(cfg, key)} or build stage 1 with model.overrides lape.{key}"
            )
    offset = cfg.position_token_offset
    if offset is None:
        raise ConfigError("the stage-1 model has no position_token_offset; build it with agrivlm.model.builders")
    new_cfg = copy.deepcopy(cfg)
    new_cfg.enable_lape = True
    new_cfg.lape_ntp = lape.ntp
    new_cfg.lape_init = lape.init
    new_cfg.lape_init_std_ratio = lape.init_std_ratio
    new_cfg.text_config.vocab_size = offset  # type: ignore[union-attr]
    new = AgriVLMForConditionalGeneration(new_cfg)
    target = new.state_dict()
    src = {}
    for key, value in model.state_dict().items():
        want = target.get(key)
        if want is not None and want.shape != value.shape and value.shape[1:] == want.shape[1:]:
            value = value[: want.shape[0]]  # text vocabulary rows below the position-token offset
        src[key] = value
    missing, unexpected = new.load_state_dict(src, strict=False)
    if unexpected or any(not k.startswith("lape.") for k in missing):
        raise ConfigError(f"cannot switch LAPE on: missing {missing}, unexpected {unexpected}")
    init_lape(new, tokenizer, seed=seed)
    new.generation_config = generation_config_for(new, tokenizer)
    return new


def _lape_for_stage(model: AgriVLMForConditionalGeneration, processor: Any, lape: LapeTrainConfig,
                    cfg: StageConfig, folder: Path) -> AgriVLMForConditionalGeneration:
    """The ``init_from`` model with LAPE as the stage's ``lape`` section says (switched on in stage 2)."""
    if not model.config.enable_lape:
        if not lape.enabled:  # the LAPE-off ablation: position tokens stay plain vocabulary
            return model
        if cfg.stage == "stage3":
            raise ConfigError(f"model.init_from: {folder} has LAPE off; stage3 starts from a stage2 model (or "
                              "keeps LAPE off with lape.enabled: false, when that stage 2 was trained so)")
        return enable_lape(model, processor.tokenizer, lape, cfg.train.seed)
    if not lape.enabled:
        raise ConfigError(f"lape.enabled: false, but {folder} has LAPE on; LAPE is left off from stage 2 on")
    for key in ("num_spatial_tokens", "num_temporal_tokens"):
        if getattr(lape, key) not in (None, getattr(model.config, key)):
            raise ConfigError(f"lape.{key}: {getattr(lape, key)} but {folder} has {getattr(model.config, key)}")
    if cfg.stage == "stage2" and lape.ntp != model.config.lape_ntp:
        raise ConfigError(f"lape.ntp: {lape.ntp} but {folder} has LAPE on with ntp {model.config.lape_ntp}")
    return model


@dataclass
class StageModel:
    """A stage's model, processor and trainable parameter groups."""

    model: AgriVLMForConditionalGeneration
    processor: Any
    #: Fingerprints of the starting weights of each part (:func:`module_digests`), before LoRA.
    init_digests: dict[str, str]
    #: Where the weights came from.
    init_source: str
    #: The init folder's band statistics (:func:`read_band_stats`: dataset normalisation carried across stages).
    band_stats: dict[str, Any] | None = None
    #: LoRA scaling ``alpha / r`` when the LLM trains through LoRA.
    lora_scaling: float | None = None
    #: The peft adapter merged into the ``init_from`` weights at the start (``model.adapter``), or None.
    init_adapter: str | None = None
    #: Whether the LLM's weights came from a checkpoint (``llm.checkpoint`` of stage 1's model YAML), carried in
    #: ``stage_info.json`` from stage to stage; None when the init folder does not say.
    llm_pretrained: bool | None = None
    groups: dict[str, list[nn.Parameter]] = field(default_factory=dict)


def build_stage_model(cfg: StageConfig) -> StageModel:
    """Build or load the stage's model per the curriculum, freeze it, and open the trainable parts."""
    check_stage_rules(cfg)
    stats = None
    lape = cfg.lape or LapeTrainConfig()
    if cfg.stage == "stage1" or cfg.model.config is not None:
        # stage 1 builds with LAPE off; a stage 2 or 3 built here (the curriculum skipped) with the lape section's
        path = resolve(cfg.model.config) if cfg.model.config else TINY_CONFIG
        lape_keys: dict[str, Any] = {"lape.enabled": False} if cfg.stage == "stage1" else {
            "lape.enabled": lape.enabled, "lape.ntp": lape.ntp, "lape.init": lape.init,
            "lape.init_std_ratio": lape.init_std_ratio, "seed": cfg.train.seed,
            # the counts are the model YAML's; an older stage config's are applied as it asked
            **{f"lape.{k}": v for k in ("num_spatial_tokens", "num_temporal_tokens")
               if (v := getattr(lape, k)) is not None}}
        settings = load_model_settings(path, {**cfg.model.overrides, **lape_keys})
        model, processor = build_model(settings)
        source = str(path)
        llm_pretrained: bool | None = settings.llm.checkpoint is not None
    else:
        assert cfg.model.init_from is not None
        folder = resolve(cfg.model.init_from)
        if not (folder / "config.json").is_file():
            raise ConfigError(
                f"model.init_from: {folder} is not a model folder (no config.json); run "
                f"`agrivlm train {previous_stage(cfg.stage)}` first and point at its <output_dir>/final"
            )
        info = read_stage_info(folder)
        prev = previous_stage(cfg.stage)
        if info is not None and info.get("stage") not in (prev, cfg.stage):
            raise ConfigError(
                f"model.init_from: {folder} is a {info.get('stage')} model; {cfg.stage} starts from {prev}"
            )
        if info is None:
            log.warning("%s has no %s: not checked to be a %s model", folder, STAGE_INFO, prev)
        model, processor = load_pretrained(folder)
        stats = read_band_stats(folder)
        # what the init folder's configs say about its own weights and inputs is not yet true of this stage's:
        # the final save (agrivlm.train.final.save_final) sets them anew
        model.config.stage_info = None
        processor.set_checkpoint_inputs(None, None)
        llm_pretrained = info.get("llm_pretrained") if info is not None else None
        model = _lape_for_stage(model, processor, lape, cfg, folder)
        source = str(folder)
    if cfg.stage != "stage1":
        model.config.spatial_loss_weight = lape.spatial_loss_weight
        model.config.temporal_loss_weight = lape.temporal_loss_weight
    adapter = None
    if cfg.model.adapter is not None:
        adapter = str(resolve(cfg.model.adapter))
        model = apply_adapter(model, adapter, source)
    digests = module_digests(model)
    sm = StageModel(model=model, processor=processor, init_digests=digests, init_source=source, band_stats=stats,
                    llm_pretrained=llm_pretrained, init_adapter=adapter)
    sm.groups, sm.lora_scaling = set_trainable(model, cfg.trainable)
    warning = frozen_head_warning(cfg, llm_pretrained)
    if warning:
        log.warning(warning)
    return sm


def frozen_head_warning(cfg: StageConfig, llm_pretrained: bool | None) -> str | None:
    """Why stage 3 cannot give answers that end, when it keeps a randomly initialised LM head; else None.

    ``lora`` and ``frozen`` leave the LLM's output head as it is. A random head (the tiny model's LLM, built
    from config) then cannot raise any text token — the answer's end included — above the LAPE heads, which do
    train: the model lists boxes up to the token budget instead of ending its answer.
    """
    if cfg.stage != "stage3" or cfg.trainable.llm.mode == "full" or llm_pretrained is not False:
        return None
    return (f"stage3 with trainable.llm.mode: {cfg.trainable.llm.mode} on an LLM with random weights (no "
            "llm.checkpoint in stage 1's model YAML): its LM head stays random and frozen, so the model cannot learn "
            "text or to end its answers (they repeat boxes up to the token budget); set trainable.llm.mode: full")


def set_trainable(
    model: AgriVLMForConditionalGeneration, trainable: Trainables
) -> tuple[dict[str, list[nn.Parameter]], float | None]:
    """Freeze everything, then open the configured parts; returns the groups ``{"main": [...], "lape": [...]}``.

    With ``llm.mode: lora`` the LLM gets LoRA adapters (peft, injected in place so the model's structure
    and forward stay the same) and only they train in the LLM.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    scaling = inject_lora(model, trainable.llm.lora) if trainable.llm.mode == "lora" else None
    parts: list[nn.Module] = []
    if trainable.projector:
        parts.append(model.projector)
    if trainable.band_adapter:
        parts.append(model.band_adapter)
    if trainable.vision:
        parts.append(model.vision_tower)
    if trainable.llm.mode == "full":
        parts.append(model.language_model)
    for part in parts:
        for p in part.parameters():
            p.requires_grad_(True)
    if trainable.projector and model.faster_token is not None:  # the faster stream's separator: the connector's
        model.faster_token.requires_grad_(True)
    if scaling is not None:
        for name, p in model.language_model.named_parameters():
            if LORA_MARK in name:
                p.requires_grad_(True)
    lape_params: list[nn.Parameter] = []
    if trainable.lape and model.lape is not None:
        lape_params = list(model.lape.parameters())
        for p in lape_params:
            p.requires_grad_(True)
    lape_ids = {id(p) for p in lape_params}
    main = [p for p in model.parameters() if p.requires_grad and id(p) not in lape_ids]
    return {"main": main, "lape": lape_params}, scaling


def changed_parts(state: dict[str, torch.Tensor], init_digests: dict[str, str]) -> list[str]:
    """The parts of :data:`PARTS` other than the LLM whose weights or buffers differ from the start's.

    Args:
        state: the plain model's state after training (LoRA split off, :func:`~agrivlm.train.lora.split_lora_state`).
        init_digests: :attr:`StageModel.init_digests`.

    The LLM's own weights are frozen under LoRA; when they differ all the same (a DeepSpeed bf16 copy of the
    model rounds them) a warning says that base + adapter gives the saved weights only up to that difference.
    """
    now = state_digests(state)
    if LLM in init_digests and now.get(LLM) != init_digests[LLM]:
        log.warning("the LLM's own weights differ from the stage's start (frozen under LoRA; rounded by a bf16 copy of "
                    "the model?): its base + adapter reproduces the saved weights only up to that difference")
    return [part for part in PARTS if part != LLM and part in now and now[part] != init_digests.get(part)]


def final_model(sm: StageModel, state: dict[str, torch.Tensor], lora: LoraSettings) -> Any:
    """The model a stage saves (:func:`agrivlm.train.final.save_final`), from its trained state dict.

    Args:
        sm: the stage's model (its config, generation settings, starting digests and source).
        state: the trained weights under the model's own names (LoRA injected or not).
        lora: the LoRA settings training used (``trainable.llm.lora``).

    Returns:
        A plain :class:`AgriVLMForConditionalGeneration` with the trained weights or, when ``state`` holds LoRA
        tensors, peft's model of it (:func:`~agrivlm.train.lora.adapter_model`: the LoRA layers plus, saved whole,
        the parts this stage changed; the adapter's base is ``sm.init_source``).

    Raises:
        CheckpointError: the weights do not fit the model (names the missing and unexpected keys).
    """
    base, lora_state = split_lora_state(state)
    plain = type(sm.model)(sm.model.config)
    missing, unexpected = plain.load_state_dict(base, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"final weights do not fit the model: missing {missing}, unexpected {unexpected}")
    plain.generation_config = sm.model.generation_config
    if not lora_state:
        return plain
    return adapter_model(plain, lora_state, lora, changed_parts(base, sm.init_digests), sm.init_source)
