"""A non-editable install carries the stage configs and data recipes, and finds them through the package API.

The wheel is built offline from a copy of the checkout (``pip wheel --no-build-isolation --no-index``) and
installed with ``pip install --target`` into an empty folder (``wheel_helpers``; conftest's ``wheel`` and
``installed_copy`` fixtures, shared with the quickstart test, which runs the main job from that installed copy).
A fresh interpreter whose current directory is outside the repository imports it: ``agrivlm.resources`` must find
every shipped YAML inside that installed copy, and the stage configs, model YAMLs and recipes (with their
``extends:`` chains) must load.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

from wheel_helpers import installed_env

from agrivlm.resources import configs_dir, recipes_dir

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


def test_an_installed_copy_finds_its_configs_and_recipes_from_anywhere(installed_copy: Path, tmp_path: Path) -> None:
    site = installed_copy
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=600, cwd=elsewhere,
                         env=installed_env(site))
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
