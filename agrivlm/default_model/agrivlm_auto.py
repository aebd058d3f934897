"""agrivlm's classes for ``trust_remote_code=True`` (written by agrivlm's save_pretrained).

The code is the installed agrivlm package's (``pip install agrivlm``); this file only re-exports it.
"""

from agrivlm.model import AgriVLMConfig, AgriVLMForConditionalGeneration, AgriVLMProcessor

__all__ = ["AgriVLMConfig", "AgriVLMForConditionalGeneration", "AgriVLMProcessor"]
