"""Geographic train/val/test splits: spatial blocks with a buffer, never random chips.

The stack's grid is cut into square blocks of ``block_px`` pixels. Blocks that hold a chip centre are
shuffled with the seed and dealt to the splits by their fractions (largest remainder, every split with a
non-zero fraction gets a block when there are enough); every other block takes the split of the nearest
dealt block, so *every* block has exactly one split. A chip takes the split of the block holding its
centre, and is **kept only if its window grown by ``buffer_px`` touches no block of another split**.
Two kept chips of different splits therefore never overlap, and are at least ``buffer_px`` apart:
each lies (with its buffer) inside blocks of its own split, and blocks do not overlap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from rasterio.windows import Window
from scipy.spatial import cKDTree

from agrivlm.recipes.context import rng_for
from agrivlm.recipes.schema import SPLITS


@dataclass
class SplitAssignment:
    """Which chip is in which split (chips that straddle splits are excluded)."""

    #: ``{(block_row, block_col): split}``: blocks that hold a chip centre, and the others chips touch.
    blocks: dict[tuple[int, int], str]
    #: Split of each kept chip, by position in the input window list.
    chip_split: dict[int, str]
    #: Positions of chips excluded because their buffered window reaches another split's block.
    excluded: list[int] = field(default_factory=list)
    #: The blocks that hold a chip centre (the ones dealt by the fractions).
    dealt: list[tuple[int, int]] = field(default_factory=list)


def allocate(fractions: Mapping[str, float], n: int, at_least_one: bool = False) -> dict[str, int]:
    """Split ``n`` items by ``fractions`` (largest remainder, ties in key order); counts sum to ``n``.

    With ``at_least_one``, every key with a non-zero fraction gets one item first (when ``n`` allows).
    """
    keys = list(fractions)
    base = {k: 0 for k in keys}
    positive = [k for k in keys if fractions[k] > 0]
    if at_least_one and n >= len(positive):
        for k in positive:
            base[k] = 1
    rest = n - sum(base.values())
    total = sum(fractions.values())
    exact = {k: fractions[k] / total * n - base[k] for k in keys}
    raw = {k: max(exact[k], 0.0) for k in keys}
    scale = rest / sum(raw.values()) if sum(raw.values()) > 0 else 0.0
    want = {k: raw[k] * scale for k in keys}
    floor = {k: int(np.floor(want[k] + 1e-9)) for k in keys}
    left = rest - sum(floor.values())
    order = sorted(keys, key=lambda k: (-(want[k] - floor[k]), keys.index(k)))
    for k in order[:left]:
        floor[k] += 1
    return {k: base[k] + floor[k] for k in keys}


def _blocks_of(r0: int, c0: int, r1: int, c1: int, block_px: int) -> set[tuple[int, int]]:
    """Blocks touched by the half-open pixel rectangle ``[r0, r1) × [c0, c1)``."""
    if r1 <= r0 or c1 <= c0:
        return set()
    rows = range(r0 // block_px, (r1 - 1) // block_px + 1)
    cols = range(c0 // block_px, (c1 - 1) // block_px + 1)
    return {(r, c) for r in rows for c in cols}


def assign_splits(
    windows: Sequence[Window],
    height: int,
    width: int,
    block_px: int,
    buffer_px: int,
    fractions: Mapping[str, float],
    seed: int,
) -> SplitAssignment:
    """Assign chips to splits by spatial blocks with a buffer (see the module docstring).

    Args:
        windows: chip windows on the stack's grid (pixels).
        height: stack height in pixels (buffers are clipped to the raster).
        width: stack width in pixels.
        block_px: block side in pixels.
        buffer_px: gap in pixels a kept chip keeps from every other split's blocks.
        fractions: share of blocks per split.
        seed: seed of the block shuffle.

    """
    centre_block = []
    for w in windows:
        rc = int(w.row_off + w.height // 2) // block_px, int(w.col_off + w.width // 2) // block_px
        centre_block.append(rc)
    blocks = sorted(set(centre_block))
    rng = rng_for(seed, "split-blocks")
    order = [blocks[i] for i in rng.permutation(len(blocks))]
    ordered = {k: fractions.get(k, 0.0) for k in SPLITS}
    counts = allocate(ordered, len(order), at_least_one=True)
    block_split: dict[tuple[int, int], str] = {}
    pos = 0
    for split in SPLITS:
        for b in order[pos:pos + counts[split]]:
            block_split[b] = split
        pos += counts[split]
    dealt = sorted(block_split)
    tree = cKDTree(np.array(dealt, dtype=np.float64)) if dealt else None

    def split_of(b: tuple[int, int]) -> str:
        if b not in block_split and tree is not None:
            # nearest dealt block; ties go to the first in (row, col) order (cKDTree returns the lowest index)
            dist, _ = tree.query(b)
            near = tree.query_ball_point(b, dist + 1e-9)
            block_split[b] = block_split[dealt[min(near)]]
        return block_split[b]

    out = SplitAssignment(blocks=block_split, chip_split={}, dealt=dealt)
    for i, w in enumerate(windows):
        split = block_split[centre_block[i]]
        r0 = max(int(w.row_off) - buffer_px, 0)
        c0 = max(int(w.col_off) - buffer_px, 0)
        r1 = min(int(w.row_off + w.height) + buffer_px, height)
        c1 = min(int(w.col_off + w.width) + buffer_px, width)
        touched = _blocks_of(r0, c0, r1, c1, block_px)
        if any(split_of(b) != split for b in touched):
            out.excluded.append(i)
        else:
            out.chip_split[i] = split
    return out


def windows_overlap(a: Window, b: Window, gap: int = 0) -> bool:
    """Whether two windows come closer than ``gap`` pixels (``gap=0``: whether they share a pixel)."""
    return not (
        a.col_off + a.width + gap <= b.col_off
        or b.col_off + b.width + gap <= a.col_off
        or a.row_off + a.height + gap <= b.row_off
        or b.row_off + b.height + gap <= a.row_off
    )
