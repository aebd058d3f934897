"""The checkout as a user gets it from PyPI: a wheel built offline, installed (non-editable) into an empty folder.

``pip wheel --no-build-isolation --no-index`` of a copy of the checkout (the venv's setuptools, no network), then
``pip install --target``: a process with ``PYTHONPATH=<site>`` imports that installed copy before the venv's
editable one, so a test run from a folder outside the repository uses only what the wheel carries.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Top-level names of the checkout that a build does not need (or that a build writes).
NOT_COPIED = {".git", ".venv", "runs", "build", "dist", ".pytest_cache", ".mypy_cache", ".ruff_cache", "__pycache__"}


def _copy_checkout(dst: Path) -> Path:
    def ignore(folder: str, names: list[str]) -> set[str]:
        top = Path(folder) == ROOT
        return {n for n in names if (top and n in NOT_COPIED) or n == "__pycache__" or n.endswith(".egg-info")}

    shutil.copytree(ROOT, dst, symlinks=True, ignore=ignore)
    return dst


def build_wheel(tmp: Path) -> Path:
    """The wheel of the checkout, built offline into ``tmp/dist``."""
    src = _copy_checkout(tmp / "src")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "-q", str(src), "-w", str(tmp / "dist")], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    shutil.rmtree(src)
    (found,) = (tmp / "dist").glob("agrivlm-*.whl")
    return found


def install_wheel(wheel: Path, site: Path) -> Path:
    """``pip install --target site`` of the wheel (no dependencies: the venv has them); returns ``site``."""
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                          str(site), str(wheel)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return site


def installed_env(site: Path) -> dict[str, str]:
    """The environment of a process that imports the installed copy first."""
    return {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
