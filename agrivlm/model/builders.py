"""Build an AgriVLM: the tiny embedded default from config, or real local checkpoints, with its processor.

``agrivlm/configs/model/tiny.yaml`` → :class:`ModelSettings` → :func:`build_model` →
``(AgriVLMForConditionalGeneration, AgriVLMProcessor)``. Each part comes either from a small config
(nothing downloaded) or from a local folder:

* ``vision.checkpoint``: a SigLIP or CLIP folder (vision-only or the full dual-encoder checkpoint);
* ``llm.checkpoint``: any causal-LM folder ``AutoModelForCausalLM`` reads (Qwen2, Llama, …);
* ``tokenizer.checkpoint``: a tokenizer folder (default: the LLM folder when it has one, else the
  embedded BPE).

Then the agrivlm tokens are added, the LLM's text vocabulary is resized to the tokenizer's text part
(position tokens go to the LAPE tables instead when LAPE is on), and the LAPE tables are initialised from
the LLM's embeddings (:func:`~agrivlm.lape.embedding.smart_init_` or
:func:`~agrivlm.lape.embedding.number_text_init_`). A model saved with ``save_pretrained`` (plus the
processor) reloads with ``AgriVLMForConditionalGeneration.from_pretrained`` /
``AgriVLMProcessor.from_pretrained``, or :func:`load_pretrained`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, cast

import torch
from pydantic import Field, model_validator
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    GenerationConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from agrivlm.config import StrictModel, load_config
from agrivlm.errors import ConfigError
from agrivlm.lape.embedding import LapeInit, number_text_init_, random_init_, smart_init_, smooth_init_
from agrivlm.lape.tokens import DEFAULT_NUM_SPATIAL, DEFAULT_NUM_TEMPORAL, LapeVocab
from agrivlm.model.configuration import RENAMED_KEYS, AgriVLMConfig
from agrivlm.model.modeling import AgriVLMForConditionalGeneration
from agrivlm.model.tokenizer import TokenLayout, add_agrivlm_tokens, default_tokenizer
from agrivlm.pipeline.conversation import answer_end_id
from agrivlm.pipeline.pooling import PoolMode
from agrivlm.resources import configs_dir

#: The tiny default config shipped in the package (``agrivlm/configs/model/tiny.yaml``).
TINY_CONFIG = configs_dir() / "model" / "tiny.yaml"


class VisionSettings(StrictModel):
    """Vision encoder: a tiny one from these dimensions, or a local checkpoint folder."""

    type: Literal["siglip", "clip"] = "siglip"
    checkpoint: str | None = None
    image_size: int = Field(default=32, ge=1)
    patch_size: int = Field(default=4, ge=1)
    hidden_size: int = Field(default=64, ge=1)
    num_layers: int = Field(default=2, ge=1)
    num_heads: int = Field(default=2, ge=1)
    intermediate_size: int = Field(default=128, ge=1)
    feature_layer: int = -1
    #: NaViT-style packing: visual items of different sizes (multi-scale, AnyRes, mixed chip sizes) go through the
    #: encoder as packed sequences of at most ``pack_tokens`` patches, each frame attending only to itself,
    #: instead of one encoder call per size (SigLIP encoders, last layer).
    packing: bool = False
    pack_tokens: int = Field(default=1024, ge=1)


class LLMSettings(StrictModel):
    """Causal LM: a tiny one from these dimensions, or a local checkpoint folder."""

    type: Literal["qwen2", "llama"] = "qwen2"
    checkpoint: str | None = None
    hidden_size: int = Field(default=64, ge=1)
    num_layers: int = Field(default=2, ge=1)
    num_heads: int = Field(default=4, ge=1)
    num_kv_heads: int = Field(default=2, ge=1)
    intermediate_size: int = Field(default=128, ge=1)
    max_position_embeddings: int = Field(default=1024, ge=16)
    tie_word_embeddings: bool = False


class TokenizerSettings(StrictModel):
    """Tokenizer: a local folder, or the embedded BPE of this vocabulary size."""

    checkpoint: str | None = None
    vocab_size: int = Field(default=1024, ge=300)


class PoolingSettings(StrictModel):
    """Spatial pooling of patch features."""

    stride: int = Field(default=2, ge=1)
    mode: PoolMode = "average"
    #: The faster-video stream (LLaVA-NeXT-Video's ``add_faster_video``): 0 off; ``k ≥ 1``: every ``k``-th frame at
    #: ``stride``, the others at ``2 · stride``, each frame followed by a learned separator token.
    faster_video_stride: int = Field(default=0, ge=0)


class LapeSettings(StrictModel):
    """LAPE switches and hyper-parameters (see :class:`~agrivlm.model.configuration.AgriVLMConfig`)."""

    enabled: bool = True
    num_spatial_tokens: int = Field(default=DEFAULT_NUM_SPATIAL, ge=2)
    num_temporal_tokens: int = Field(default=DEFAULT_NUM_TEMPORAL, ge=2)
    ntp: bool = True
    #: Scale of the height + width LAPE embeddings added to the visual features.
    spatial_injection_scale: float = 1.0
    #: Scale of the temporal LAPE embeddings added to the visual features.
    temporal_injection_scale: float = 1.0
    #: Loss weight of spatial position tokens (text tokens weigh 1).
    spatial_loss_weight: float = Field(default=1.0, gt=0)
    #: Loss weight of temporal position tokens.
    temporal_loss_weight: float = Field(default=1.0, gt=0)
    init: LapeInit = "llm_stats"
    init_std_ratio: float = Field(default=0.1, gt=0)
    decode_window: int = Field(default=2, ge=0)
    #: Add to each point of a question (``<WIDTH-…><HEIGHT-…>`` in the prompt) the visual feature under it, the
    #: item's visual tokens averaged over dates and sampled bilinearly at the point (Ferret's / GPT4RoI's region
    #: features), so the LM reads the point's field without finding its token first.
    point_features: bool = False

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for old, new in RENAMED_KEYS.items():
                if old in data:
                    raise ValueError(f"{old} was renamed {new} (the scale of the LAPE embeddings added to the visual "
                                     "features; the loss weights are spatial/temporal_loss_weight)")
        return data


class ModelSettings(StrictModel):
    """Everything :func:`build_model` needs (``configs/model/*.yaml``)."""

    vision: VisionSettings = Field(default_factory=VisionSettings)
    llm: LLMSettings = Field(default_factory=LLMSettings)
    tokenizer: TokenizerSettings = Field(default_factory=TokenizerSettings)
    pooling: PoolingSettings = Field(default_factory=PoolingSettings)
    lape: LapeSettings = Field(default_factory=LapeSettings)
    num_bands: int = Field(default=1, ge=1)
    projector_act: str = "gelu"
    #: ``none`` | ``batch``: see ``AgriVLMConfig.projector_norm``.
    projector_norm: Literal["none", "batch"] = "batch"
    seed: int = 0


def load_model_settings(
    path: str | os.PathLike[str] = TINY_CONFIG, overrides: dict[str, Any] | None = None
) -> ModelSettings:
    """Read a model YAML (strict: unknown keys are errors naming the file and key)."""
    return load_config(ModelSettings, path, overrides)


# ---------------------------------------------------------------------------------------------------
# parts
# ---------------------------------------------------------------------------------------------------
def _folder(path: str, key: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ConfigError(f"{key}: {path} is not a folder; give a local checkpoint folder (nothing is downloaded)")
    if not (p / "config.json").is_file():
        raise ConfigError(f"{key}: {path} has no config.json; is it a transformers checkpoint folder?")
    return p


def load_vision_tower(path: str) -> PreTrainedModel:
    """The vision transformer of a local SigLIP/CLIP checkpoint (vision-only or full), without SigLIP's pooling head."""
    folder = _folder(path, "vision.checkpoint")
    model_type = AutoConfig.from_pretrained(folder, local_files_only=True).model_type
    if model_type in ("siglip", "siglip_vision_model"):
        cfg = SiglipVisionConfig.from_pretrained(folder, local_files_only=True)
        cfg.vision_use_head = False  # the attention-pool head is unused: its weights are left out
        return SiglipVisionModel.from_pretrained(folder, config=cfg, local_files_only=True)  # type: ignore[no-any-return]
    if model_type in ("clip", "clip_vision_model"):
        return CLIPVisionModel.from_pretrained(folder, local_files_only=True)  # type: ignore[no-any-return]
    raise ConfigError(
        f"vision.checkpoint: {path} is a {model_type!r} model; agrivlm reads SigLIP or CLIP vision encoders"
    )


def tiny_vision_config(s: VisionSettings) -> SiglipVisionConfig | CLIPVisionConfig:
    """A small SigLIP/CLIP vision config from :class:`VisionSettings`."""
    common: dict[str, Any] = dict(
        hidden_size=s.hidden_size, intermediate_size=s.intermediate_size, num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads, image_size=s.image_size, patch_size=s.patch_size, num_channels=3,
    )
    if s.type == "siglip":
        return SiglipVisionConfig(**common, vision_use_head=False)
    return CLIPVisionConfig(**common)


def tiny_text_config(s: LLMSettings, vocab_size: int) -> Qwen2Config | LlamaConfig:
    """A small Qwen2/Llama config from :class:`LLMSettings`."""
    common: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads, num_key_value_heads=s.num_kv_heads,
        max_position_embeddings=s.max_position_embeddings, tie_word_embeddings=s.tie_word_embeddings,
    )
    if s.type == "qwen2":
        return Qwen2Config(**common)
    return LlamaConfig(**common)


def _tokenizer(settings: ModelSettings) -> PreTrainedTokenizerBase:
    path = settings.tokenizer.checkpoint
    if path is None and settings.llm.checkpoint is not None:
        llm_dir = Path(settings.llm.checkpoint)
        if (llm_dir / "tokenizer_config.json").is_file() or (llm_dir / "tokenizer.json").is_file():
            path = str(llm_dir)
    if path is None:
        return default_tokenizer(settings.tokenizer.vocab_size)
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"tokenizer.checkpoint: {path} is not a folder")
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------------
def build_model(
    settings: ModelSettings | str | os.PathLike[str] | None = None,
) -> tuple[AgriVLMForConditionalGeneration, Any]:
    """Build the model and its processor (seeded: the same settings give the same weights).

    Args:
        settings: :class:`ModelSettings`, a YAML path, or None for ``agrivlm/configs/model/tiny.yaml``.

    Returns:
        ``(model, processor)``; ``processor`` is an :class:`~agrivlm.model.processing.AgriVLMProcessor`.
    """
    from agrivlm.model.processing import AgriVLMProcessor

    if settings is None:
        settings = load_model_settings(TINY_CONFIG) if TINY_CONFIG.is_file() else ModelSettings()
    elif not isinstance(settings, ModelSettings):
        settings = load_model_settings(settings)
    torch.manual_seed(settings.seed)
    s = settings
    vocab = LapeVocab(s.lape.num_spatial_tokens, s.lape.num_temporal_tokens)
    tokenizer = _tokenizer(s)
    layout = add_agrivlm_tokens(tokenizer, vocab)
    text_vocab = layout.position_token_offset if s.lape.enabled else layout.total_size

    vision = load_vision_tower(s.vision.checkpoint) if s.vision.checkpoint else None
    llm = None
    if s.llm.checkpoint:
        folder = _folder(s.llm.checkpoint, "llm.checkpoint")
        llm = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    vision_config = vision.config if vision is not None else tiny_vision_config(s.vision)
    text_config = llm.config if llm is not None else tiny_text_config(s.llm, text_vocab)
    model = AgriVLMForConditionalGeneration(_agrivlm_config(s, vision_config, text_config, layout))
    if vision is not None:
        model.vision_tower.load_state_dict(vision.state_dict())
    if llm is not None:
        model.language_model.load_state_dict(llm.state_dict())
    del vision, llm
    if model.language_model.get_input_embeddings().weight.shape[0] != text_vocab:
        model.resize_text_vocab(text_vocab)
    init_lape(model, tokenizer, seed=s.seed)
    model.generation_config = generation_config_for(model, tokenizer)
    model.eval()
    processor = AgriVLMProcessor(
        tokenizer=tokenizer,
        patch_size=int(model.config.vision_config.patch_size),  # type: ignore[union-attr]
        pool_stride=s.pooling.stride,
        num_bands=s.num_bands,
        pool_mode=s.pooling.mode,
        num_spatial_tokens=s.lape.num_spatial_tokens,
        num_temporal_tokens=s.lape.num_temporal_tokens,
        faster_video_stride=s.pooling.faster_video_stride,
    )
    return model, processor


def _agrivlm_config(
    s: ModelSettings, vision_config: PretrainedConfig, text_config: PretrainedConfig, layout: TokenLayout
) -> AgriVLMConfig:
    """The :class:`AgriVLMConfig` of ``s`` around these vision and text configs, with the tokenizer's ids."""
    return AgriVLMConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        num_bands=s.num_bands,
        projector_hidden_act=s.projector_act,
        projector_norm=s.projector_norm,
        vision_feature_layer=s.vision.feature_layer,
        vision_packing=s.vision.packing,
        vision_pack_tokens=s.vision.pack_tokens,
        pool_stride=s.pooling.stride,
        pool_mode=s.pooling.mode,
        faster_video_stride=s.pooling.faster_video_stride,
        enable_lape=s.lape.enabled,
        num_spatial_tokens=s.lape.num_spatial_tokens,
        num_temporal_tokens=s.lape.num_temporal_tokens,
        lape_ntp=s.lape.ntp,
        spatial_injection_scale=s.lape.spatial_injection_scale,
        temporal_injection_scale=s.lape.temporal_injection_scale,
        spatial_loss_weight=s.lape.spatial_loss_weight,
        temporal_loss_weight=s.lape.temporal_loss_weight,
        lape_init=s.lape.init,
        lape_init_std_ratio=s.lape.init_std_ratio,
        decode_window=s.lape.decode_window,
        point_features=s.lape.point_features,
        image_token_id=layout.image_token_id,
        video_token_id=layout.video_token_id,
        lape_input_token_ids=list(layout.input_token_ids),
        lape_output_token_ids=list(layout.output_token_ids),
        position_token_offset=layout.position_token_offset,
    )


def init_lape(model: AgriVLMForConditionalGeneration, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> None:
    """Initialise the LAPE tables and heads from the LLM's embeddings (``config.lape_init``); no-op without LAPE."""
    if model.lape is None:
        return
    gen = torch.Generator().manual_seed(seed)
    inp = cast(torch.Tensor, model.get_input_embeddings().weight)
    out_layer = model.get_output_embeddings()
    out = None if out_layer is None else cast(torch.Tensor, out_layer.weight)
    if model.config.lape_init == "random":
        # the ablation of the smart init: as a new vocabulary row is drawn (HF's _init_weights)
        std = float(getattr(model.config.text_config, "initializer_range", 0.02))
        random_init_(model.lape, std, gen)
    elif model.config.lape_init == "number_text":

        def encode(text: str) -> list[int]:
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])

        number_text_init_(model.lape, inp, encode, out, model.config.lape_init_std_ratio, gen)
    elif model.config.lape_init == "smooth":
        smooth_init_(model.lape, inp, out, model.config.lape_init_std_ratio, gen)
    else:
        smart_init_(model.lape, inp, out, model.config.lape_init_std_ratio, gen)


def generation_config_for(
    model: AgriVLMForConditionalGeneration, tokenizer: PreTrainedTokenizerBase
) -> GenerationConfig:
    """Greedy by default; placeholders and LAPE control tokens can never be generated.

    Generation stops on the answer's end, :func:`~agrivlm.pipeline.conversation.answer_end_id` — the token the
    processor appends to every supervised answer; pad is the tokenizer's pad (its eos when it has none).
    """
    cfg = model.config
    suppress = [i for i in (cfg.image_token_id, cfg.video_token_id) if i is not None]
    suppress += list(cfg.lape_input_token_ids or []) + list(cfg.lape_output_token_ids or [])
    return GenerationConfig(
        eos_token_id=answer_end_id(tokenizer),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        do_sample=False,
        suppress_tokens=suppress,
        max_new_tokens=32,
    )


def load_pretrained(folder: str | os.PathLike[str]) -> tuple[AgriVLMForConditionalGeneration, Any]:
    """Load a model and processor saved together with ``save_pretrained`` into ``folder``."""
    from agrivlm.model.processing import AgriVLMProcessor

    p = Path(folder)
    if not (p / "config.json").is_file():
        raise ConfigError(f"{folder}: no config.json; save the model with model.save_pretrained(folder)")
    check_saved_files(p)
    try:
        model = AgriVLMForConditionalGeneration.from_pretrained(p, local_files_only=True)
        processor = AgriVLMProcessor.from_pretrained(p, local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{folder}: cannot load the checkpoint ({first}); save it again with save_pretrained "
                          "or use an intact copy") from exc
    model.eval()
    return model, processor


def check_saved_files(folder: Path) -> None:
    """The files of a saved checkpoint that its loading needs, each readable (named in the error when not).

    ``config.json`` parses as JSON; every ``*.safetensors`` has an intact header covering the file (a truncated
    or overwritten file fails here, named, instead of deep inside ``from_pretrained``); a tokenizer saved with
    ``tokenizer_config.json`` still has its ``tokenizer.json``.

    Raises:
        ConfigError: naming the file and what is wrong with it.

    """
    import json

    from safetensors import safe_open

    config = folder / "config.json"
    try:
        json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{config}: not a readable JSON config ({exc}); restore it from the saved "
                          "checkpoint") from exc
    weights = sorted(folder.glob("*.safetensors"))
    if not weights and not any(folder.glob("pytorch_model*.bin")):
        raise ConfigError(f"{folder}: no weights (model.safetensors); save the model with save_pretrained")
    for path in weights:
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as exc:  # noqa: BLE001 — safetensors raises its own SafetensorError and OSError
            raise ConfigError(f"{path}: unreadable weights ({str(exc).splitlines()[0]}); the file is truncated "
                              "or corrupt: use an intact copy") from exc
    if (folder / "tokenizer_config.json").is_file() and not (folder / "tokenizer.json").is_file():
        raise ConfigError(f"{folder / 'tokenizer.json'}: missing; the checkpoint's tokenizer cannot load without it")
