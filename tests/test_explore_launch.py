"""The launcher: settings survive the trip through Streamlit's command line; the server flags are safe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agrivlm.explore.errors import ExploreError
from agrivlm.explore.launch import SAFE_SERVER_OPTIONS, app_script, streamlit_command
from agrivlm.explore.settings import ExploreSettings

ROOT = Path(__file__).resolve().parents[1]


def test_settings_round_trip() -> None:
    settings = ExploreSettings(
        stack=("a dir/", "b/*.tif"), masks=("m/",), predictions=("p.gpkg", "stages.csv"), truth=("t.gpkg",),
        truth_id="RABA_ID", model="ckpt", tiles="https://t/{z}/{x}/{y}.png", chip_size=32, stride=16,
        bands=("red=B04", "nir=8"), title="My farm",
    )
    assert ExploreSettings.from_argv(settings.to_argv()) == settings
    stac = ExploreSettings(stack=("https://cat.example/search.json",), masks=("https://cat.example/search.json",),
                           assets=("B04", "B08"), mask_assets=("SCL",))
    assert ExploreSettings.from_argv(stac.to_argv()) == stac
    assert ExploreSettings.from_argv(ExploreSettings(stack=("s",)).to_argv()) == ExploreSettings(stack=("s",))
    assert settings.band_map() == {"red": "B04", "nir": "8"}
    with pytest.raises(ExploreError, match="no stack given"):
        ExploreSettings.from_argv([])
    with pytest.raises(ExploreError, match="bad arguments.*--nope"):
        ExploreSettings.from_argv(["--stack", "s", "--nope", "1"])


def test_command_is_safe_by_default() -> None:
    cmd = streamlit_command(ExploreSettings(stack=("s",)), port=8600, python="python")
    assert cmd[:5] == ["python", "-m", "streamlit", "run", str(app_script())]
    flags = cmd[5:cmd.index("--")]
    for key, value in SAFE_SERVER_OPTIONS.items():
        assert f"--{key}={value}" in flags
    assert "--server.address=127.0.0.1" in flags and "--server.port=8600" in flags
    assert "--client.showErrorDetails=none" in flags and "--server.enableXsrfProtection=true" in flags
    assert "--browser.gatherUsageStats=false" in flags
    assert {"--server.allowedHosts=localhost", "--server.allowedHosts=127.0.0.1"} <= set(flags)
    exposed = streamlit_command(ExploreSettings(stack=("s",)), host="0.0.0.0")
    assert "--server.address=0.0.0.0" in exposed and not any("allowedHosts" in f for f in exposed)
    assert cmd[cmd.index("--") + 1:] == ["--stack", "s", "--chip-size", "32", "--title", "agrivlm field explorer"]


def test_app_script_is_the_repositorys() -> None:
    assert app_script() == ROOT / "app" / "field_explorer.py"


def test_cli_prints_the_command_for_the_sample() -> None:
    out = subprocess.run([sys.executable, "-m", "agrivlm.cli", "explore", "--sample", "--port", "8611",
                          "--print-command"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--server.address=127.0.0.1" in out.stdout and "--server.port=8611" in out.stdout
    assert "slovenia_s2_ndvi/parcels.gpkg" in out.stdout and "--masks" in out.stdout
    missing = subprocess.run([sys.executable, "-m", "agrivlm.cli", "explore"], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 2 and "--stack" in missing.stderr
