"""YAML → typed config. Unknown keys and wrong types are errors that name the key and the file.

Configs are pydantic models with ``extra="forbid"``; :func:`load_config` reads a YAML file into one and
turns pydantic's validation error into a :class:`~agrivlm.errors.ConfigError` like
``configs/stage2.yaml: lape.lape_lr_multiplyer: unknown key``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from agrivlm.errors import ConfigError


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


M = TypeVar("M", bound=BaseModel)


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem: ``SOURCE: dotted.key: what is wrong``."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"{source}: {key}: {msg}")
    return "\n".join(lines)


def parse_config(model: type[M], data: dict[str, Any], source: str = "<config>") -> M:
    """Validate a dict against ``model``; :class:`ConfigError` naming ``source`` and the keys on failure."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from exc


def read_yaml_mapping(path: Path, missing: str = "no such config file") -> dict[str, Any]:
    """The top-level mapping of a YAML file.

    Raises:
        ConfigError: missing file (``missing`` says what), invalid YAML, a top level that is not a mapping.
    """
    if not path.is_file():
        raise ConfigError(f"{path}: {missing}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, not {type(data).__name__}")
    return data


def read_json_mapping(path: Path) -> dict[str, Any] | None:
    """The top-level object of a JSON file (a checkpoint's ``config.json``, …), or None when there is no file.

    Raises:
        ConfigError: invalid JSON, a top level that is not an object (naming the file).
    """
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); write it again (e.g. save_pretrained)") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be an object of keys, not {type(data).__name__}")
    return data


def load_config(model: type[M], path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> M:
    """Read a YAML file into ``model`` (pydantic, ``extra="forbid"``), applying dotted-key ``overrides``.

    Raises:
        ConfigError: missing file, invalid YAML, unknown key, wrong type — naming the file and key.
    """
    path = Path(path)
    data = read_yaml_mapping(path)
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return parse_config(model, data, str(path))
