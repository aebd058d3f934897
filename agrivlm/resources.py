"""The stage configs and data recipes shipped inside the package, found through :mod:`importlib.resources`.

``agrivlm/configs/`` (``stage1.yaml`` … ``stage3.yaml``, ``model/*.yaml``, ``accelerate/*.yaml``) and
``agrivlm/data_recipes/`` (``*.yaml``) are package data: a wheel carries them, so ``agrivlm quickstart`` and
``agrivlm train default`` run from any installation, not only from a clone. In a clone, ``configs`` and
``data_recipes`` at the repository's root are links to these two folders (no copies), so the README's commands
(``--config configs/stage1.yaml``, ``--recipe data_recipes/stage2.yaml``, run from the root) keep working.

Relative paths inside a stage config (``model.config: configs/model/tiny.yaml``) resolve against the current
directory, as on the command line; code that runs a shipped config from anywhere passes the packaged file
instead (:func:`package_file`).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from agrivlm.errors import ConfigError

#: The package folder holding the stage configs (``<stage>.yaml``, ``model/``, ``accelerate/``).
CONFIGS = "configs"
#: The package folder holding the data recipes (``<name>.yaml``).
RECIPES = "data_recipes"


def package_dir() -> Path:
    """The installed ``agrivlm`` package folder.

    Raises:
        ConfigError: the package is not a folder on disk (imported from a zip), so its YAML files have no paths.

    """
    root = files("agrivlm")
    if not isinstance(root, Path):
        raise ConfigError(f"{root}: agrivlm is imported from an archive; install it as a folder (pip install) so "
                          "its configs and recipes are files")
    return root


def package_file(relative: str) -> Path:
    """A file shipped in the package, from its path inside it (``configs/model/small.yaml``).

    Raises:
        ConfigError: no such file in this installation (naming the folder looked in).

    """
    path = package_dir() / relative
    if not path.is_file():
        raise ConfigError(f"{path}: not in this installation of agrivlm; reinstall the package (pip install .) "
                          "or pass the file's own path")
    return path


def _named(folder: str, name: str) -> Path:
    """``<package>/<folder>/<name>.yaml``, or a :class:`ConfigError` listing the names there."""
    root = package_dir() / folder
    path = root / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))
        raise ConfigError(f"{path}: no such file shipped in agrivlm/{folder}; the shipped ones are "
                          f"{', '.join(names) or 'none'}")
    return path


def configs_dir() -> Path:
    """``agrivlm/configs``: the shipped stage, model and accelerate configs."""
    return package_dir() / CONFIGS


def recipes_dir() -> Path:
    """``agrivlm/data_recipes``: the shipped data recipes (they ``extends:`` each other by file name)."""
    return package_dir() / RECIPES


def stage_config(stage: str) -> Path:
    """The shipped config of a curriculum stage: ``stage_config("stage2")`` → ``agrivlm/configs/stage2.yaml``."""
    return _named(CONFIGS, stage)


def model_config(name: str) -> Path:
    """A shipped model YAML: ``model_config("tiny")`` → ``agrivlm/configs/model/tiny.yaml``."""
    return _named(CONFIGS, f"model/{name}")


def recipe(name: str) -> Path:
    """A shipped data recipe: ``recipe("stage3")`` → ``agrivlm/data_recipes/stage3.yaml``."""
    return _named(RECIPES, name)
