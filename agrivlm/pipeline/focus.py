"""Questions that point into the image: growth questions see their field, point questions see their point.

**Growth focus.** A growth-stage question points to its field by the box of the field's visible part in the chip. With
``growth_focus: box`` the model sees only the pixels inside that box (the others become no data, NaN, which the
processor turns into 0), in training (:class:`agrivlm.train.data.RecordDataset`) and in ``agrivlm infer``
(:class:`agrivlm.infer.prepare.ChipPreparer`) alike, so reading the field's NDVI over time does not first
need finding it among its neighbours. Applied after normalisation: the normalisation statistics do not change.

**Point marker.** A question that gives a point ("Outline the field at <point>.") writes it as position tokens,
which the model must match to the visual tokens injected with the same LAPE rows before it can look there. With
``point_marker: square`` the point is also drawn into every frame (:func:`mark_point`, the visual prompt of
ViP-LLaVA: markers drawn on the pixels): the pixels of a small square around it are shifted by
:data:`MARKER_OFFSET`, out of the normalized ``[0, 1]`` range, so the encoder sees where the question points
while the values stay readable (``x + 2``); no data there becomes the offset itself. In training
(:class:`agrivlm.train.data.RecordDataset`, the first point of a question) and in ``agrivlm infer``'s point
prompts alike; saved with the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt

#: ``none``: growth questions see the whole chip; ``box``: only their field's box.
GrowthFocus = Literal["none", "box"]
#: ``none``: a question's point is in its words only; ``square``: also drawn into the frames (:func:`mark_point`).
PointMarker = Literal["none", "square"]
#: What a marked pixel adds to its normalized value (``[0, 1]`` → ``[2, 3]``; no data → 2).
MARKER_OFFSET = 2.0
#: Half the marker's side in pixels: a 3 × 3 square (recipes never draw points within 1 px of a parcel's edge).
MARKER_HALF_PX = 1


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


def point_pixel(point: Sequence[float], height: int, width: int) -> tuple[int, int]:
    """``(row, col)`` of the pixel holding a normalized point ``(u, v)`` (clamped into the image)."""
    u, v = (float(p) for p in point)
    return min(max(math.floor(v * height), 0), height - 1), min(max(math.floor(u * width), 0), width - 1)


def mark_point(pixels: npt.NDArray[np.float32], point: Sequence[float],
               half_px: int = MARKER_HALF_PX) -> npt.NDArray[np.float32]:
    """A copy of normalized ``pixels`` ``(T, C, H, W)`` with the point's square marked in every frame and band.

    The square has side ``2·half_px + 1`` pixels around :func:`point_pixel` (cut at the image's edge); its values
    are shifted by :data:`MARKER_OFFSET`, no data there becomes the offset.
    """
    h, w = pixels.shape[-2:]
    r, c = point_pixel(point, h, w)
    r0, r1, c0, c1 = max(r - half_px, 0), min(r + half_px + 1, h), max(c - half_px, 0), min(c + half_px + 1, w)
    out = pixels.copy()
    block = out[..., r0:r1, c0:c1]
    out[..., r0:r1, c0:c1] = np.where(np.isnan(block), np.float32(MARKER_OFFSET), block + np.float32(MARKER_OFFSET))
    return out
