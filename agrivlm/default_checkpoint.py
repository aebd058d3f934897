"""The default checkpoint shipped in the package: where it lives and how ``--model default`` finds it.

It is trained here, from the project's own data (synthetic scenes of several regions and the embedded real
sample's train blocks), by ``agrivlm train default`` (see ``agrivlm/default_model/README.md``, its model
card, for the data, steps, time and held-out scores). Nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from agrivlm.errors import ConfigError

#: The folder of the shipped checkpoint (``save_pretrained`` of model and processor, input settings, card).
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"
#: The word that names it on the command line (``--model default``).
DEFAULT_MODEL_NAME = "default"


def default_model_path() -> Path:
    """The shipped checkpoint's folder.

    Raises:
        ConfigError: the package was installed without it (a checkout that never ran ``agrivlm train default``).

    """
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise ConfigError(
            f"{DEFAULT_MODEL_DIR}: no default checkpoint in this installation; train one with "
            "`agrivlm train default` or pass --model PATH"
        )
    return DEFAULT_MODEL_DIR


def resolve_model(value: str | os.PathLike[str]) -> Path:
    """``default`` → the shipped checkpoint; anything else → that folder as given."""
    if str(value) == DEFAULT_MODEL_NAME:
        return default_model_path()
    return Path(value)
