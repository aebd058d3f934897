"""Start the explorer: ``streamlit run app/field_explorer.py`` with safe server settings.

Safe by default: the server listens on 127.0.0.1 only and accepts only ``localhost``/``127.0.0.1`` as
host names (no DNS rebinding), XSRF and CORS protection are on, error details are hidden from the page
(``client.showErrorDetails=none``: only the terminal gets tracebacks), usage statistics are off, the
developer menu (rerun, clear cache, deploy) is hidden, and no file watcher or static file serving runs.
``--host`` exposes the app on purpose.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from agrivlm.explore.settings import ExploreSettings

#: Streamlit options that every launch sets (``--host``/``--port`` add the address, port and host names).
SAFE_SERVER_OPTIONS: dict[str, str] = {
    "server.headless": "true",
    "server.enableXsrfProtection": "true",
    "server.enableCORS": "true",
    "server.enableStaticServing": "false",
    "server.fileWatcherType": "none",
    "server.runOnSave": "false",
    "client.showErrorDetails": "none",
    "client.toolbarMode": "viewer",
    "browser.gatherUsageStats": "false",
    "global.developmentMode": "false",
    "theme.base": "light",
}

#: Host names accepted on a loopback-only server.
LOOPBACK_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1")

#: The page module: run as the Streamlit script when the repository's ``app/`` is not there (wheel install).
PAGE_MODULE = Path(__file__).with_name("page.py")


def app_script() -> Path:
    """``app/field_explorer.py`` of a source checkout, else the packaged page module (same page)."""
    script = Path(__file__).resolve().parents[2] / "app" / "field_explorer.py"
    return script if script.is_file() else PAGE_MODULE


def streamlit_command(settings: ExploreSettings, host: str = "127.0.0.1", port: int = 8501,
                      python: str = sys.executable, script: Path | None = None) -> list[str]:
    """The ``python -m streamlit run SCRIPT [options] -- [settings]`` command line."""
    options = dict(SAFE_SERVER_OPTIONS)
    options["server.address"] = host
    options["server.port"] = str(port)
    argv = [python, "-m", "streamlit", "run", str(script or app_script())]
    for key, value in options.items():
        argv.append(f"--{key}={value}")
    if host in ("127.0.0.1", "localhost", "::1"):
        for name in LOOPBACK_HOSTS + (("[::1]",) if host == "::1" else ()):
            argv.append(f"--server.allowedHosts={name}")
    return argv + ["--", *settings.to_argv()]


def launch(settings: ExploreSettings, host: str = "127.0.0.1", port: int = 8501) -> int:
    """Run the app in the foreground until Ctrl-C; returns Streamlit's exit code."""
    command = streamlit_command(settings, host=host, port=port)
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return 130
