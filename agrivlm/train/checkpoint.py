"""Crash-safe accelerate checkpoints: a checkpoint exists only once it is complete.

``accelerator.save_state`` writes into ``step_NNNNNNN.partial``; a ``COMPLETE`` marker (holding the
step) is written last and the folder renamed to ``step_NNNNNNN``. A run killed mid-save leaves only a
``.partial`` folder, which resume ignores (and the next save removes). On load, the files accelerate
would silently skip (random states, custom states such as the trainer's position in the data) are
checked first: a checkpoint missing them is an error, never a silent restart from somewhere else.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from agrivlm.errors import AgriVLMError

_STEP_DIR = re.compile(r"^step_(\d{7})$")
MARKER = "COMPLETE"


class CheckpointError(AgriVLMError):
    """A checkpoint is missing or incomplete."""


def checkpoint_dir(root: Path, step: int) -> Path:
    """Folder of the checkpoint after optimizer step ``step``."""
    return root / f"step_{step:07d}"


def save_checkpoint(accelerator: Any, root: str | Path, step: int, keep: int = 2) -> Path:
    """Save model, optimizer, scheduler, RNG and registered custom states after ``step``; keep the last ``keep``."""
    root = Path(root)
    final = checkpoint_dir(root, step)
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if partial.exists():
            shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / MARKER).write_text(json.dumps({"step": step}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
        for stale in root.glob("step_*.partial"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint, or ``None``."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def checkpoint_step(path: str | Path) -> int:
    """The optimizer step a checkpoint was taken after."""
    return int(json.loads((Path(path) / MARKER).read_text())["step"])


def load_checkpoint(accelerator: Any, path: str | Path, num_custom: int) -> int:
    """Restore a checkpoint saved by :func:`save_checkpoint`; return its step.

    Raises:
        CheckpointError: when the folder is incomplete or lacks the RNG or custom states that
            ``accelerator.load_state`` would otherwise skip without a word.
    """
    path = Path(path)
    if not (path / MARKER).is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {MARKER} marker); resume from another one")
    rank = accelerator.process_index
    required = [f"random_states_{rank}.pkl", "optimizer.bin"] + [
        f"custom_checkpoint_{i}.pkl" for i in range(num_custom)
    ]
    missing = [name for name in required if not (path / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{path}: missing {', '.join(missing)}; resuming would silently change the random or data state"
        )
    accelerator.load_state(str(path))
    return checkpoint_step(path)
