"""Shared by the training tests: the small curriculum recipe, built once per session, and stage configs for tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from agrivlm.cli import app
from agrivlm.resources import configs_dir

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "tests" / "recipes" / "curriculum_tiny.yaml"
CONFIGS = configs_dir()


def curriculum_recipe(factory: pytest.TempPathFactory) -> Path:
    """``agrivlm recipe build --recipe tests/recipes/curriculum_tiny.yaml`` into the session's temp folder (once)."""
    out = factory.getbasetemp() / "curriculum_recipe"
    if not (out / "manifest.json").is_file():
        args = ["recipe", "build", "--recipe", str(RECIPE), "--out", str(out), "--no-progress"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
    return out


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[leaf] = value


def stage_yaml(stage: str, path: Path, overrides: dict[str, Any]) -> Path:
    """``configs/<stage>.yaml`` with dotted ``overrides``, written to ``path``."""
    data = yaml.safe_load((CONFIGS / f"{stage}.yaml").read_text())
    for key, value in overrides.items():
        _set(data, key, value)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
