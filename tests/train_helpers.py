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


def quick_run(data: Path, out: Path, steps: int = 2, **extra: Any) -> dict[str, Any]:
    """Stage overrides of a few-step run on ``data`` into ``out``: batch 4, one thread, no saves, evaluation or bars."""
    return {"output_dir": str(out), "data.roots": [str(data)], "train.max_steps": steps, "train.batch_size": 4,
            "train.save_every": 0, "train.torch_threads": 1, "train.progress": False, "train.eval_every": -1, **extra}


def ask_sample_fields(model: Path, sample_root: Path, out: Path) -> Any:
    """``agrivlm infer --task fields`` of ``model`` on the embedded sample's 32-px chips → the GeoDataFrame written."""
    import geopandas as gpd

    from agrivlm.infer.batch import run_inference

    run_inference([str(sample_root / "ndvi")], model, out, task="fields", masks=[str(sample_root / "cloud_mask")],
                  overrides={"stride": 32}, batch_size=16, max_new_tokens=8, progress=False, threads=1)
    return gpd.read_file(out)


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
