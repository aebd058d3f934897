"""Crash-safe accelerate checkpoints: a checkpoint exists only once it is complete.

``accelerator.save_state`` writes into ``step_NNNNNNN.partial``; a ``COMPLETE`` marker (JSON: the step and
the size and SHA-256 of every file of the folder) is written last and the folder renamed to
``step_NNNNNNN``. A run killed mid-save leaves only a ``.partial`` folder, which resume ignores (and the
next save removes). On load, the files are checked against the marker (a truncated or corrupt file is an
error naming it; :func:`latest_intact_checkpoint` skips such a checkpoint with a warning and falls back to
an older one), then the files accelerate would silently skip (random states, custom states such as the
trainer's position in the data): a checkpoint missing them is an error, never a silent restart from
somewhere else. Markers written before the hashes were recorded (only ``{"step": N}``) still load,
unverified.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from agrivlm.errors import AgriVLMError
from agrivlm.io import sha256_file

_STEP_DIR = re.compile(r"^step_(\d{7})$")
MARKER = "COMPLETE"
#: Bytes read at a time while hashing a checkpoint file.

log = logging.getLogger(__name__)


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
        (partial / MARKER).write_text(json.dumps({"step": step, "files": file_digests(partial)}, indent=1))
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


def file_digests(folder: str | Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"bytes": size, "sha256": hex digest}}`` of every file under ``folder`` but the marker."""
    folder = Path(folder)
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name != MARKER:
            out[name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return out


def read_marker(path: str | Path) -> dict[str, Any]:
    """The ``COMPLETE`` marker of checkpoint folder ``path`` (``{"step": N, "files": {...}}``; old ones lack ``files``).

    Raises:
        CheckpointError: no marker, or one that is not the JSON :func:`save_checkpoint` writes.
    """
    marker = Path(path) / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {MARKER} marker); resume from another one")
    try:
        data = json.loads(marker.read_text())
        int(data["step"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{marker}: unreadable marker ({exc}); the checkpoint is corrupt") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{marker}: unreadable marker (not a JSON object); the checkpoint is corrupt")
    return data


def checkpoint_step(path: str | Path) -> int:
    """The optimizer step a checkpoint was taken after."""
    return int(read_marker(path)["step"])


def verify_checkpoint(path: str | Path) -> bool:
    """Check every file of checkpoint ``path`` against the size and SHA-256 its marker recorded at save.

    Returns:
        True when every recorded file is there, whole and unchanged; False for an old marker without
        hashes (the checkpoint is then used unverified).

    Raises:
        CheckpointError: naming the first file that is missing, truncated (or grown) or corrupt.
    """
    path = Path(path)
    files = read_marker(path).get("files")
    if files is None:
        log.warning("%s: saved without file hashes (an older agrivlm); used unverified", path)
        return False
    for name, want in sorted(files.items()):
        target = path / name
        if not target.is_file():
            raise CheckpointError(f"{target}: missing, but recorded when the checkpoint was saved")
        size = target.stat().st_size
        if size != want["bytes"]:
            what = "truncated" if size < want["bytes"] else "grown"
            raise CheckpointError(f"{target}: {what} ({size} bytes, {want['bytes']} when the checkpoint was saved)")
        if sha256_file(target) != want["sha256"]:
            raise CheckpointError(f"{target}: corrupt (its SHA-256 differs from the one recorded at save)")
    return True


def latest_intact_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` whose files pass :func:`verify_checkpoint`.

    A newer checkpoint that fails is named in a warning and skipped (the run goes on from the older one and
    writes the skipped step again when it gets there).

    Returns:
        The checkpoint folder, or None when ``root`` holds no complete checkpoint at all.

    Raises:
        CheckpointError: there are complete checkpoints but none is intact (names each failing file).
    """
    failures: list[str] = []
    for path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            log.warning("%s; skipping %s", exc, path.name)
            failures.append(str(exc))
            continue
        if failures:
            log.warning("resuming from %s, the newest intact checkpoint", path)
        return path
    if failures:
        raise CheckpointError(
            f"{root}: no intact checkpoint to resume from ({'; '.join(failures)}); start over with --overwrite"
        )
    return None


def load_checkpoint(accelerator: Any, path: str | Path, num_custom: int, verify: bool = True) -> int:
    """Restore a checkpoint saved by :func:`save_checkpoint`; return its step.

    Args:
        accelerator: the run's ``Accelerator`` (model, optimizer and custom states registered).
        path: the checkpoint folder (``step_NNNNNNN``).
        num_custom: custom states registered with ``register_for_checkpointing``.
        verify: check the files against the marker's hashes first (:func:`verify_checkpoint`); pass False
            only for a folder that was just verified.

    Raises:
        CheckpointError: when the folder is incomplete, a file fails its hash, or the folder lacks the RNG
            or custom states that ``accelerator.load_state`` would otherwise skip without a word.
    """
    path = Path(path)
    step = checkpoint_step(path)
    rank = accelerator.process_index
    required = [f"random_states_{rank}.pkl", "optimizer.bin"] + [
        f"custom_checkpoint_{i}.pkl" for i in range(num_custom)
    ]
    missing = [name for name in required if not (path / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{path}: missing {', '.join(missing)}; resuming would silently change the random or data state"
        )
    if verify:
        verify_checkpoint(path)
    accelerator.load_state(str(path))
    return step
