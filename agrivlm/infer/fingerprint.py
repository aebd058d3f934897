"""Content fingerprints of what an inference journal's answers were made from: the stacks and the weights.

A resumed run reuses the journal's answers only if the inputs are still those they were made from. The
journal's ``stack`` record carries :func:`stack_fingerprint` (every data and mask file's absolute path, size
in bytes, ``mtime_ns`` and date; the reference grid's CRS, transform and shape); the header's model entry
carries :func:`weights_fingerprint` (the sha256 of every weights file). :func:`describe_stack_change` says
in a few words what differs, for the one-line refusal.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agrivlm.geo.rasters import network_stamp
from agrivlm.geo.stack import SourceInfo, Stack
from agrivlm.io import sha256_file

#: Weights files of a checkpoint folder, by suffix.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
#: Items named in a refusal before "…".
_SHOWN = 3


def weights_fingerprint(folder: Path) -> list[list[Any]]:
    """``[[name, size in bytes, sha256], …]`` of the checkpoint's weights files, sorted by name."""
    weights = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    return [[p.name, p.stat().st_size, sha256_file(p)] for p in weights]


def _file_entry(info: SourceInfo, date: str) -> list[Any]:
    """``[absolute path, size in bytes, mtime_ns, date]`` of one file of the stack.

    A remote file or a STAC item's raster has no mtime: its entry is ``[address, None, "<stamp> | <header>",
    date]`` (:func:`~agrivlm.geo.rasters.network_stamp`: the server's size, ETag and Last-Modified, or the item's
    VRT digest; the header: grid, bands, data type), so a file replaced under the same address is caught when
    the stamp or the header changes.
    """
    if not isinstance(info.path, Path):
        header = (f"{info.crs.to_string()} {list(info.transform)[:6]} {info.height}x{info.width}x{info.count} "
                  f"{info.dtype}")
        return [str(info.path), None, f"{network_stamp(info.path)} | {header}", date]
    st = info.path.stat()
    return [str(info.path.resolve()), st.st_size, st.st_mtime_ns, date]


def stack_fingerprint(stack: Stack) -> dict[str, Any]:
    """The content fingerprint of an opened stack (JSON-able; see the module docstring).

    ``files`` and ``masks`` are ``[path, size, mtime_ns, date]`` in time order; ``grid`` is the reference
    grid's CRS (WKT), transform (6 coefficients) and shape ``[height, width]`` in pixels.
    """
    files: list[list[Any]] = []
    masks: list[list[Any]] = []
    for step in stack.steps:
        date = step.time.isoformat()
        files.extend(_file_entry(s, date) for s in step.sources)
        masks.extend(_file_entry(m, date) for m in step.masks if m is not None)
    grid = stack.grid
    return {
        "files": files,
        "masks": masks,
        "grid": {"crs": grid.crs.to_wkt(), "transform": list(grid.transform)[:6],
                 "shape": [grid.height, grid.width]},
    }


def _listed(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return f"{shown}{' …' if len(items) > _SHOWN else ''}"


def _file_changes(old: Sequence[Sequence[Any]], new: Sequence[Sequence[Any]], what: str) -> list[str]:
    """What differs between two lists of ``[path, size, mtime_ns, date]`` (``what``: "file" or "mask file")."""
    before = {str(e[0]): list(e) for e in old}
    after = {str(e[0]): list(e) for e in new}
    old_dates = {str(e[3]) for e in old}
    new_dates = {str(e[3]) for e in new}
    out = []
    gone_dates = sorted(old_dates - new_dates)
    added_dates = sorted(new_dates - old_dates)
    label = "dates" if what == "file" else "mask dates"
    if gone_dates:
        out.append(f"{len(gone_dates)} {label} removed ({_listed([d[:10] for d in gone_dates])})")
    if added_dates:
        out.append(f"{len(added_dates)} {label} added ({_listed([d[:10] for d in added_dates])})")
    removed = [p for p in before if p not in after and str(before[p][3]) not in gone_dates]
    added = [p for p in after if p not in before and str(after[p][3]) not in added_dates]
    if removed:
        out.append(f"{len(removed)} {what}(s) removed ({_listed([Path(p).name for p in removed])})")
    if added:
        out.append(f"{len(added)} {what}(s) added ({_listed([Path(p).name for p in added])})")
    changed = []
    for p in before.keys() & after.keys():
        (_, s0, m0, d0), (_, s1, m1, d1) = before[p], after[p]
        if s0 != s1:
            changed.append(f"{Path(p).name}: size {s0} → {s1} bytes")
        elif d0 != d1:
            changed.append(f"{Path(p).name}: date {str(d0)[:10]} → {str(d1)[:10]}")
        elif m0 != m1:
            changed.append(f"{Path(p).name}: rewritten (modified time changed)")
    if changed:
        out.append(f"{len(changed)} {what}(s) changed ({_listed(sorted(changed))})")
    return out


def describe_stack_change(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """What changed from fingerprint ``old`` to ``new`` in a few words, or None when they are equal."""
    if old == new:
        return None
    changes = _file_changes(old.get("files", []), new.get("files", []), "file")
    changes += _file_changes(old.get("masks", []), new.get("masks", []), "mask file")
    old_grid, new_grid = old.get("grid", {}), new.get("grid", {})
    grid = [k for k in ("crs", "transform", "shape") if old_grid.get(k) != new_grid.get(k)]
    if grid:
        changes.append(f"grid changed ({', '.join(grid)})")
    return ", ".join(changes) or "its fingerprint differs"
