"""Start the explorer: ``streamlit run app/field_explorer.py`` with safe server settings.

Safe by default: the server listens on 127.0.0.1 only and accepts only ``localhost``/``127.0.0.1`` as
host names (no DNS rebinding), XSRF and CORS protection are on, error details are hidden from the page
(``client.showErrorDetails=none``: only the terminal gets tracebacks), usage statistics are off, the
developer menu (rerun, clear cache, deploy) is hidden, and no file watcher or static file serving runs.
``--host`` exposes the app on purpose.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
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


#: Signals the launcher passes on to the server before it exits itself.
FORWARDED_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
#: Seconds the server gets to stop after a forwarded signal before it is killed.
STOP_GRACE_S = 10.0


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the server gets SIGTERM when the launcher dies, even by ``kill -9`` (``PR_SET_PDEATHSIG``)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def launch(settings: ExploreSettings, host: str = "127.0.0.1", port: int = 8501) -> int:
    """Run the app in the foreground until Ctrl-C or a signal; returns Streamlit's exit code.

    The server never outlives the launcher: SIGTERM, SIGHUP and SIGINT are passed on to it (then it is killed
    after :data:`STOP_GRACE_S` seconds), and on Linux it gets SIGTERM when the launcher dies by any means.
    """
    command = streamlit_command(settings, host=host, port=port)
    proc = subprocess.Popen(command, preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    received: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        while True:
            try:
                code = proc.wait(timeout=STOP_GRACE_S if received else None)
                break
            except subprocess.TimeoutExpired:
                proc.kill()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:  # an exception in the launcher itself: the server goes with it
            proc.kill()
            proc.wait()
    if received:
        return 130 if received[0] == signal.SIGINT else 128 + received[0]
    return code
