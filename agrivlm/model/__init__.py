"""The agrivlm VLM: config, model, builders (tiny default and local checkpoints), embedded tokenizer."""

from agrivlm.model.builders import ModelSettings, build_model, load_model_settings, load_pretrained
from agrivlm.model.configuration import AgriVLMConfig
from agrivlm.model.modeling import AgriVLMForConditionalGeneration, AgriVLMOutput, BandAdapter
from agrivlm.model.processing import AgriVLMProcessor, register_auto_processor
from agrivlm.model.tokenizer import TokenLayout, add_agrivlm_tokens, default_tokenizer

register_auto_processor()

__all__ = [
    "AgriVLMConfig",
    "AgriVLMForConditionalGeneration",
    "AgriVLMOutput",
    "AgriVLMProcessor",
    "BandAdapter",
    "ModelSettings",
    "TokenLayout",
    "add_agrivlm_tokens",
    "build_model",
    "default_tokenizer",
    "load_model_settings",
    "load_pretrained",
]
