"""``AgriVLMConfig``: vision encoder + projector + pooling + LAPE + causal LM, as one HF config.

Saved with ``save_pretrained``, the config carries an ``auto_map`` (and the folder a small re-export module,
:mod:`agrivlm.remote_code`), so ``AutoConfig.from_pretrained(path, trust_remote_code=True)`` works without
``import agrivlm``; after the import ``AutoConfig`` finds it by ``model_type`` alone. It also carries
``stage_info``, how the curriculum made the weights, so no re-save loses it.

Sub-configs are real transformers configs (``vision_config``: SigLIP or CLIP vision; ``text_config``:
any causal LM, e.g. Qwen2 or Llama), so a real checkpoint's configs drop in unchanged. The token ids
(``image_token_id``, …, ``position_token_offset``) come from the tokenizer prepared by
:func:`agrivlm.model.tokenizer.add_agrivlm_tokens`; the builders fill them in.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import CONFIG_NAME

from agrivlm.config import read_json_mapping
from agrivlm.errors import ConfigError
from agrivlm.lape.embedding import LAPE_INITS
from agrivlm.lape.tokens import DEFAULT_NUM_SPATIAL, DEFAULT_NUM_TEMPORAL
from agrivlm.pipeline.pooling import POOL_MODES
from agrivlm.remote_code import CONFIG_AUTO_MAP, write_remote_code

#: Vision sub-config model types the model knows how to read a patch grid from.
VISION_MODEL_TYPES: tuple[str, ...] = ("siglip_vision_model", "clip_vision_model")

#: Keys renamed since checkpoints were first saved: a ``config.json`` with the old key still loads (its value
#: goes to the new key). ``spatial_pos_weight``/``temporal_pos_weight`` named the injection scales, which
#: the stage configs' loss weights of the same name were mistaken for.
RENAMED_KEYS: dict[str, str] = {
    "spatial_pos_weight": "spatial_injection_scale",
    "temporal_pos_weight": "temporal_injection_scale",
}

#: The tiny default vision encoder (a real SigLIP vision transformer with small dimensions).
TINY_VISION: dict[str, Any] = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
    "image_size": 32, "patch_size": 4, "num_channels": 3, "vision_use_head": False,
}
#: The tiny default LLM (a real Qwen2 with small dimensions).
TINY_TEXT: dict[str, Any] = {
    "vocab_size": 1032, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
}


class AgriVLMConfig(PreTrainedConfig):
    """Configuration of :class:`~agrivlm.model.AgriVLMForConditionalGeneration`.

    Values are checked here; a bad one raises :class:`~agrivlm.errors.ConfigError` naming the key and the
    allowed values.
    """

    model_type = "agrivlm"
    sub_configs_defaults: ClassVar[dict[str, SubConfigSpec]] = {  # type: ignore[misc]
        "vision_config": SubConfigSpec(
            config_class=AutoConfig, model_type="siglip_vision_model", init_kwargs=TINY_VISION
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2", init_kwargs=TINY_TEXT),
    }

    #: Vision encoder config (SigLIP or CLIP vision).
    vision_config: dict | PreTrainedConfig | None = None  # type: ignore[type-arg]
    #: Causal LM config; its ``vocab_size`` is the text vocabulary (position tokens excluded when LAPE is on).
    text_config: dict | PreTrainedConfig | None = None  # type: ignore[type-arg]
    #: Bands of the input frames; a learnable 1×1 conv maps them to the encoder's channels.
    num_bands: int = 1
    #: Activation between the projector's two linear layers.
    projector_hidden_act: str = "gelu"
    #: Normalisation of the vision features before the projector: ``none`` (LLaVA-1.5) or ``batch`` (each
    #: feature standardised over all visual tokens, running statistics at inference). A randomly initialised
    #: encoder's tokens share one direction (mean cosine 0.95 between tokens of random frames for
    #: ``configs/model/small.yaml``); trained without the norm, that direction grew until every visual token of
    #: the first default checkpoint had cosine 1.00 with every other (RMS 20 against 0.05 for text
    #: embeddings), so answers did not depend on the image at all (the same loss on real, shuffled and blank
    #: frames). Standardised, the LM sees what differs between tokens from the first step.
    projector_norm: str = "none"
    #: Vision hidden state to use: -1 = the encoder's ``last_hidden_state``, else an index into ``hidden_states``.
    vision_feature_layer: int = -1
    #: NaViT-style packing of visual items of different sizes into shared encoder sequences of at most
    #: ``vision_pack_tokens`` patches, a block-diagonal attention mask keeping each frame to itself
    #: (:meth:`~agrivlm.model.modeling.AgriVLMForConditionalGeneration.encode_packed`); SigLIP, last layer.
    vision_packing: bool = False
    vision_pack_tokens: int = 1024
    #: Spatial pooling stride on the patch grid (``agrivlm.pipeline.pooling``).
    pool_stride: int = 2
    #: Pooling mode: average, max or bilinear.
    pool_mode: str = "average"
    #: The faster-video stream (LLaVA-NeXT-Video's ``add_faster_video``): 0 off; ``k ≥ 1``: frames ``0, k, 2k, …``
    #: pooled at ``pool_stride``, the others at ``2 · pool_stride``, each frame followed by a learned separator
    #: (:func:`agrivlm.pipeline.inputs.frame_token_counts`).
    faster_video_stride: int = 0
    #: Each point of a prompt (a width token then a height token, both unsupervised) gets the visual feature under
    #: it added to its height token: the item's tokens averaged over frames, sampled bilinearly at ``(u, v)``
    #: (:meth:`~agrivlm.model.modeling.AgriVLMForConditionalGeneration.add_point_features`); with LAPE on only.
    point_features: bool = False
    #: LAPE on: separate position tables/heads, NTP, injection, soft targets. Off: position tokens are plain vocabulary.
    enable_lape: bool = True
    #: Position tokens per spatial axis.
    num_spatial_tokens: int = DEFAULT_NUM_SPATIAL
    #: Temporal position tokens.
    num_temporal_tokens: int = DEFAULT_NUM_TEMPORAL
    #: Neighbouring token propagation on the LAPE tables and heads.
    lape_ntp: bool = True
    #: Scale of the height + width LAPE embeddings added to the visual features (formerly ``spatial_pos_weight``).
    spatial_injection_scale: float = 1.0
    #: Scale of the temporal LAPE embeddings added to the visual features (formerly ``temporal_pos_weight``).
    temporal_injection_scale: float = 1.0
    #: Loss weight of spatial position tokens (text tokens weigh 1).
    spatial_loss_weight: float = 1.0
    #: Loss weight of temporal position tokens.
    temporal_loss_weight: float = 1.0
    #: LAPE initialisation used by the builders: ``llm_stats``, ``smooth``, ``number_text`` or ``random``.
    lape_init: str = "llm_stats"
    #: std of the LAPE init as a fraction of the LLM embeddings' std.
    lape_init_std_ratio: float = 0.1
    #: Bins on each side of the argmax in sub-bin decoding.
    decode_window: int = 2
    #: Id of ``<image>``.
    image_token_id: int | None = None
    #: Id of ``<video>``.
    video_token_id: int | None = None
    #: Ids of ``<HEIGHT-INPUT>``, ``<WIDTH-INPUT>``, ``<TEMP-INPUT>``.
    lape_input_token_ids: list[int] | None = None
    #: Ids of ``<HEIGHT-OUTPUT>``, ``<WIDTH-OUTPUT>``, ``<TEMP-OUTPUT>``.
    lape_output_token_ids: list[int] | None = None
    #: Id of ``<HEIGHT-000>``: position tokens are ids ``[offset, offset + 2·spatial + temporal)``.
    position_token_offset: int | None = None
    tie_word_embeddings: bool = False
    #: How the curriculum made these weights (stage, init folder and digests, stage config, data, steps); the
    #: ``stage_info.json`` beside a final folder's weights is written from it. None: not made by ``agrivlm train``.
    stage_info: dict[str, Any] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        for old, new in RENAMED_KEYS.items():  # a config.json saved before the rename
            if old not in kwargs:
                continue
            value = kwargs.pop(old)
            default = type(self).__dataclass_fields__[new].default
            if getattr(self, new) not in (default, value):
                raise ConfigError(
                    f"AgriVLMConfig: both {old} (the old name of {new}) = {value} and {new} = {getattr(self, new)}; "
                    f"keep only {new}"
                )
            setattr(self, new, value)
        kwargs.pop("auto_map", None)  # always the current one, below (an old folder's may point elsewhere)
        super().__post_init__(**kwargs)
        #: The Auto classes of ``trust_remote_code=True`` loading (:data:`agrivlm.remote_code.CONFIG_AUTO_MAP`).
        self.auto_map = dict(CONFIG_AUTO_MAP)
        self.validate_values()

    def save_pretrained(self, save_directory: str | os.PathLike[str], push_to_hub: bool = False, **kwargs: Any) -> None:
        """``config.json`` (with its ``auto_map``) and the re-export module the ``auto_map`` names."""
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        write_remote_code(save_directory)

    @classmethod
    def register_for_auto_class(cls, auto_class: Any = "AutoConfig") -> None:
        """Nothing to do: the ``auto_map`` is set on every config (transformers' version would copy this module)."""

    def validate_values(self) -> None:
        """Check every value; :class:`ConfigError` naming the key and what is allowed."""
        vt = getattr(self.vision_config, "model_type", None)
        if vt not in VISION_MODEL_TYPES:
            raise ConfigError(f"AgriVLMConfig.vision_config: model_type {vt!r} is not one of {VISION_MODEL_TYPES}")
        if self.pool_mode not in POOL_MODES:
            raise ConfigError(f"AgriVLMConfig.pool_mode: {self.pool_mode!r} is not one of {POOL_MODES}")
        if self.lape_init not in LAPE_INITS:
            raise ConfigError(f"AgriVLMConfig.lape_init: {self.lape_init!r} is not one of {LAPE_INITS}")
        for key in ("num_bands", "pool_stride"):
            if getattr(self, key) < 1:
                raise ConfigError(f"AgriVLMConfig.{key}: must be ≥ 1, got {getattr(self, key)}")
        if self.vision_pack_tokens < 1:
            raise ConfigError(f"AgriVLMConfig.vision_pack_tokens: must be ≥ 1, got {self.vision_pack_tokens}")
        if self.vision_packing and (vt != "siglip_vision_model" or self.vision_feature_layer != -1):
            raise ConfigError("AgriVLMConfig.vision_packing: packs SigLIP encoders read at their last layer "
                              f"(vision_feature_layer -1); this one is {vt} at layer {self.vision_feature_layer}")
        if self.point_features and self.faster_video_stride:
            raise ConfigError("AgriVLMConfig.point_features: not with the faster-video stream (it samples one grid of "
                              "tokens per frame)")
        if self.faster_video_stride < 0:
            raise ConfigError(f"AgriVLMConfig.faster_video_stride: must be ≥ 0 (0 = off), got "
                              f"{self.faster_video_stride}")
        for key in ("num_spatial_tokens", "num_temporal_tokens"):
            if getattr(self, key) < 2:
                raise ConfigError(f"AgriVLMConfig.{key}: must be ≥ 2, got {getattr(self, key)}")
        for key in ("spatial_loss_weight", "temporal_loss_weight", "lape_init_std_ratio"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"AgriVLMConfig.{key}: must be > 0, got {getattr(self, key)}")
        if self.decode_window < 0:
            raise ConfigError(f"AgriVLMConfig.decode_window: must be ≥ 0, got {self.decode_window}")
        for key in ("lape_input_token_ids", "lape_output_token_ids"):
            ids = getattr(self, key)
            if ids is not None and len(ids) != 3:
                raise ConfigError(f"AgriVLMConfig.{key}: needs 3 ids (HEIGHT, WIDTH, TEMP), got {ids}")

    @property
    def num_position_tokens(self) -> int:
        """``2 · num_spatial_tokens + num_temporal_tokens``."""
        return 2 * self.num_spatial_tokens + self.num_temporal_tokens

    @property
    def logits_size(self) -> int:
        """Size of the logits: the LLM's rows, plus the LAPE heads' rows when LAPE is on."""
        base = int(self.text_config.vocab_size)  # type: ignore[union-attr]
        return base + self.num_position_tokens if self.enable_lape else base

    @property
    def answers_positions(self) -> bool:
        """Whether the model was trained to answer with position tokens.

        LAPE on, or LAPE off in a stage 2 or 3 (``lape.enabled: false``, the ablation: the position tokens are
        rows of the LLM's vocabulary); not a stage-1 model, which never saw a position.
        """
        stage = self.stage_info.get("stage") if isinstance(self.stage_info, dict) else None
        return bool(self.enable_lape) or stage in ("stage2", "stage3")


def saved_model_config(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``config.json`` of a checkpoint folder as a dict (nothing built from it), or None without one.

    Raises:
        ConfigError: the file is not a JSON object (naming it).
    """
    return read_json_mapping(Path(folder) / CONFIG_NAME)


AutoConfig.register("agrivlm", AgriVLMConfig)
