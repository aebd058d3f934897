"""A non-editable install carries the stage configs and data recipes, and finds them through the package API.

The wheel is built offline from a copy of the checkout (``pip wheel --no-build-isolation --no-index``),
installed with ``pip install --target`` into an empty folder, and imported from there by a fresh interpreter
whose current directory is outside the repository: ``agrivlm.resources`` must find every shipped YAML inside
that installed copy, and the stage configs, model YAMLs and recipes (with their ``extends:`` chains) must load.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from agrivlm.resources import configs_dir, recipes_dir

ROOT = Path(__file__).resolve().parents[1]
#: Top-level names of the checkout that a build does not need (or that a build writes).
NOT_COPIED = {".git", ".venv", "runs", "build", "dist", ".pytest_cache", ".mypy_cache", ".ruff_cache", "__pycache__"}

#: Run by the installed copy, from an empty folder: prints what it found as JSON.
PROBE = """
import json, sys
import agrivlm
from agrivlm import resources
from agrivlm.model.builders import TINY_CONFIG, load_model_settings
from agrivlm.quickstart import Quickstart, QuickstartOptions
from agrivlm.recipes.config import load_recipe
from agrivlm.train.config import load_stage_config
from agrivlm.train.default import DefaultTraining, recipe_text

stages = {s: load_stage_config(resources.stage_config(s)).stage for s in ("stage1", "stage2", "stage3")}
recipes = {p.stem: load_recipe(p).name for p in sorted(resources.recipes_dir().glob("*.yaml"))
           if not p.stem.endswith("_base")}  # the bases are only extended
qs = Quickstart("out", QuickstartOptions(start="scratch", steps=10), progress=False)
over = qs.stage_overrides("stage1")
built = load_stage_config(resources.stage_config("stage1"), over)
print(json.dumps({
    "package": agrivlm.__file__, "stages": stages, "recipes": recipes,
    "tiny": str(TINY_CONFIG), "tiny_vocab": load_model_settings().lape.num_spatial_tokens,
    "quickstart_recipe": str(qs.recipe_file("stage1")), "quickstart_model": over["model.config"],
    "stage1_model": built.model.config,
    "default_recipe": "default_stage3" in recipe_text("stage3", "/x/*", DefaultTraining()),
}))
try:
    resources.recipe("no_such_recipe")
except Exception as exc:
    print(type(exc).__name__ + ": " + str(exc), file=sys.stderr)
"""


def _copy_checkout(dst: Path) -> Path:
    def ignore(folder: str, names: list[str]) -> set[str]:
        top = Path(folder) == ROOT
        return {n for n in names if (top and n in NOT_COPIED) or n == "__pycache__" or n.endswith(".egg-info")}

    shutil.copytree(ROOT, dst, symlinks=True, ignore=ignore)
    return dst


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of the checkout, built offline with the venv's setuptools."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = _copy_checkout(tmp / "src")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "-q", str(src), "-w", str(tmp / "dist")], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (found,) = (tmp / "dist").glob("agrivlm-*.whl")
    return found


def _shipped(folder: Path) -> set[str]:
    return {f"agrivlm/{p.relative_to(folder.parent).as_posix()}" for p in folder.rglob("*.yaml")}


def test_the_wheel_carries_configs_recipes_license_and_py_typed(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    configs, recipes = _shipped(configs_dir()), _shipped(recipes_dir())
    assert {"agrivlm/configs/stage1.yaml", "agrivlm/configs/model/tiny.yaml",
            "agrivlm/configs/accelerate/ddp.yaml"} <= configs
    assert {"agrivlm/data_recipes/stage3.yaml", "agrivlm/data_recipes/sample_base.yaml"} <= recipes
    assert configs <= names and recipes <= names, sorted((configs | recipes) - names)
    assert "agrivlm/py.typed" in names
    (license_file,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
    text = zipfile.ZipFile(wheel).read(license_file).decode()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    assert "License-Expression: Apache-2.0" in zipfile.ZipFile(wheel).read(metadata).decode()
    assert not any(n.startswith(("configs/", "data_recipes/")) for n in names)  # no copies outside the package


def test_an_installed_copy_finds_its_configs_and_recipes_from_anywhere(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                          str(site), str(wheel)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=600, cwd=elsewhere,
                         env={**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    found = json.loads(res.stdout.strip().splitlines()[-1])
    package = site / "agrivlm"
    assert Path(found["package"]) == package / "__init__.py"  # the installed copy, not the checkout
    assert found["stages"] == {"stage1": "stage1", "stage2": "stage2", "stage3": "stage3"}
    assert set(found["recipes"]) == {p.stem for p in recipes_dir().glob("*.yaml") if not p.stem.endswith("_base")}
    assert found["recipes"]["stage3"] and found["default_recipe"]
    assert Path(found["tiny"]) == package / "configs" / "model" / "tiny.yaml" and found["tiny_vocab"] == 150
    assert Path(found["quickstart_recipe"]) == package / "data_recipes" / "stage1.yaml"
    assert Path(found["quickstart_model"]) == Path(found["stage1_model"]) == package / "configs" / "model" / "tiny.yaml"
    assert "ConfigError: " in res.stderr and "no_such_recipe.yaml: no such file shipped in agrivlm/data_recipes" in (
        res.stderr)
