"""Growth questions that see their field: pixels outside the field's box become no data.

A growth-stage question points to its field by the box of the field's visible part in the chip. With
``growth_focus: box`` the model sees only the pixels inside that box (the others become no data, NaN, which the
processor turns into 0), in training (:class:`agrivlm.train.data.RecordDataset`) and in ``agrivlm infer``
(:class:`agrivlm.infer.prepare.ChipPreparer`) alike, so reading the field's NDVI over time does not first
need finding it among its neighbours. Applied after normalisation: the normalisation statistics do not change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt

#: ``none``: growth questions see the whole chip; ``box``: only their field's box.
GrowthFocus = Literal["none", "box"]


def box_pixels(box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
    """``(row0, row1, col0, col1)`` (end exclusive) of the pixels a normalized box ``(u1, v1, u2, v2)`` covers.

    Boxes of the recipes lie on pixel edges; a box edge inside a pixel takes that pixel in. At least one pixel.
    """
    u1, v1, u2, v2 = (float(b) for b in box)
    c0 = min(max(math.floor(min(u1, u2) * width + 1e-6), 0), width - 1)
    r0 = min(max(math.floor(min(v1, v2) * height + 1e-6), 0), height - 1)
    c1 = max(min(math.ceil(max(u1, u2) * width - 1e-6), width), c0 + 1)
    r1 = max(min(math.ceil(max(v1, v2) * height - 1e-6), height), r0 + 1)
    return r0, r1, c0, c1


def focus_on_box(pixels: npt.NDArray[np.float32], box: Sequence[float]) -> npt.NDArray[np.float32]:
    """A copy of ``pixels`` ``(T, C, H, W)`` with every pixel outside ``box`` set to NaN (no data)."""
    h, w = pixels.shape[-2:]
    r0, r1, c0, c1 = box_pixels(box, h, w)
    out = np.full_like(pixels, np.nan)
    out[..., r0:r1, c0:c1] = pixels[..., r0:r1, c0:c1]
    return out
