"""Killing a dask worker mid-run, and seeing that the scheduler ran its tasks again (shared by the cluster tests)."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from typing import Any


def worker_killer(client: Any, holding: str | None = None) -> tuple[Callable[[int, int], None], dict[str, Any]]:
    """An ``on_task_done`` callback that SIGKILLs a worker after the first result, and what it did.

    It kills a worker that is running a task or, with ``holding``, one that holds the finished, not yet
    gathered result of a task whose key contains ``holding`` (waiting up to a minute for one): the client
    then fails to gather it and must have it recomputed. The dict fills with ``addr``, ``pid`` and
    ``remaining`` (tasks not yet back) when it strikes, and ``lost`` (the result's key) with ``holding``.
    """
    killed: dict[str, Any] = {}

    def finished_results(dask_scheduler: Any) -> dict[str, list[str]]:
        return {str(k): [ws.address for ws in ts.who_has] for k, ts in dask_scheduler.tasks.items()
                if ts.state == "memory" and ts.who_has}

    def kill_a_worker(done: int, total: int) -> None:
        if killed or done != 1:
            return
        if holding is None:
            busy = [addr for addr, keys in client.processing().items() if keys]
            assert busy, "no worker was running a task after the first result"
            addr = busy[0]
        else:
            deadline = time.monotonic() + 60
            while not (held := {k: w for k, w in client.run_on_scheduler(finished_results).items()
                                if holding in k}):
                assert time.monotonic() < deadline, "no finished result waited on a worker"
                time.sleep(0.05)
            key, (addr, *_) = next(iter(held.items()))
            killed["lost"] = key
        pid = client.run(os.getpid, workers=[addr])[addr]
        os.kill(pid, signal.SIGKILL)
        killed.update(addr=addr, pid=pid, remaining=total - done)

    return kill_a_worker, killed


def rescheduled(client: Any, key_part: str) -> list[str]:
    """Keys containing ``key_part`` that the scheduler sent to a worker more than once."""
    starts = client.run_on_scheduler(
        lambda dask_scheduler: [t[0] for t in dask_scheduler.transition_log if t[2] == "processing"]
    )
    return [k for k, n in Counter(str(k) for k in starts).items() if n > 1 and key_part in k]
