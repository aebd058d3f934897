"""What lets ``trust_remote_code=True`` load an agrivlm checkpoint in a process that never imported agrivlm.

transformers reads an ``auto_map`` entry ``"module.Class"`` as the file ``module.py`` *in the checkpoint folder*
(exactly one dot: a dotted path into an installed package is refused), copies it to its module cache and takes
``Class`` from it. The classes live in the installed agrivlm package, so every saved folder gets
:data:`REMOTE_CODE_FILE`: three re-exports of the package's own classes, no copy of their code (a copy would
define second, different classes; :meth:`~transformers.PreTrainedConfig.register_for_auto_class` would copy the
defining modules, which is why the agrivlm classes turn it off). transformers checks the file's imports first
and, without agrivlm installed, names the missing package (``pip install agrivlm``).

The config's ``auto_map`` (:data:`CONFIG_AUTO_MAP`) and the processor's (:data:`PROCESSOR_AUTO_MAP`) point into
that file; both are set on every instance, so every ``save_pretrained`` writes them.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The module name of the re-export file in a checkpoint folder.
REMOTE_CODE_MODULE = "agrivlm_auto"
#: The file written beside every saved config.
REMOTE_CODE_FILE = f"{REMOTE_CODE_MODULE}.py"
#: ``config.json``'s ``auto_map``: the Auto classes an agrivlm checkpoint loads with.
CONFIG_AUTO_MAP: dict[str, str] = {
    "AutoConfig": f"{REMOTE_CODE_MODULE}.AgriVLMConfig",
    "AutoModelForImageTextToText": f"{REMOTE_CODE_MODULE}.AgriVLMForConditionalGeneration",
    "AutoModelForCausalLM": f"{REMOTE_CODE_MODULE}.AgriVLMForConditionalGeneration",
    "AutoProcessor": f"{REMOTE_CODE_MODULE}.AgriVLMProcessor",
}
#: ``processor_config.json``'s ``auto_map``.
PROCESSOR_AUTO_MAP: dict[str, str] = {"AutoProcessor": CONFIG_AUTO_MAP["AutoProcessor"]}

#: The text of :data:`REMOTE_CODE_FILE`.
REMOTE_CODE = '''"""agrivlm's classes for ``trust_remote_code=True`` (written by agrivlm's save_pretrained).

The code is the installed agrivlm package's (``pip install agrivlm``); this file only re-exports it.
"""

from agrivlm.model import AgriVLMConfig, AgriVLMForConditionalGeneration, AgriVLMProcessor

__all__ = ["AgriVLMConfig", "AgriVLMForConditionalGeneration", "AgriVLMProcessor"]
'''


def write_remote_code(folder: str | os.PathLike[str]) -> Path:
    """Write :data:`REMOTE_CODE_FILE` into a checkpoint folder (created if needed); returns its path."""
    path = Path(folder) / REMOTE_CODE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text(encoding="utf-8") != REMOTE_CODE:
        path.write_text(REMOTE_CODE, encoding="utf-8")
    return path
