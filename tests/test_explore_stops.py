"""`agrivlm explore` never leaves its Streamlit server listening: a signal to the launcher stops the server,
and on Linux so does the launcher's death by ``kill -9``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads children from /proc (Linux)")

#: Generous: the server imports the whole stack of libraries on a busy 2-core machine.
START_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start(tmp_path: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    port = _free_port()
    log = (tmp_path / f"server_{port}.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "agrivlm.cli", "explore", "--sample", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_S
    while not _listening(port):
        assert proc.poll() is None, (tmp_path / f"server_{port}.log").read_text()
        assert time.monotonic() < deadline, "the explorer did not start"
        time.sleep(0.5)
    children = _children(proc.pid)
    assert len(children) == 1, children
    return proc, children[0], port


def _gone(pid: int, port: int, within: float = 20.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not _alive(pid) and not _listening(port):
            return True
        time.sleep(0.25)
    return False


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_the_server_stops_with_the_launcher(tmp_path: Path, how: signal.Signals) -> None:
    proc, server, port = _start(tmp_path)
    try:
        os.kill(proc.pid, how)
        proc.wait(timeout=30)
        assert _gone(server, port), f"the server {server} still runs after {how.name} to the launcher"
        if how == signal.SIGTERM:
            assert proc.returncode == 128 + signal.SIGTERM
    finally:
        for pid in (proc.pid, server):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
