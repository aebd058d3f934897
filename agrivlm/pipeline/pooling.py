"""Spatial pooling of per-frame patch features, in the manner of LLaVA-NeXT's ``get_2dPool``.

Unlike ``get_2dPool`` the grid need not be square: the caller passes ``(h, w)``. Every mode gives the
same output grid, :func:`pooled_grid` ``= (ceil(h / stride), ceil(w / stride))`` (avg/max pool with
``ceil_mode``, bilinear resize to that size), so the number of visual tokens per frame is known from
the config alone: the model and the processor both call :func:`pooled_grid`.

Pooled cell ``(i, j)`` covers patch rows ``[i*stride, min((i+1)*stride, h))`` and the same for
columns: its centre, in normalized chip coordinates, is what LAPE injection and any map overlay use.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

PoolMode = Literal["average", "max", "bilinear"]
POOL_MODES: tuple[str, ...] = ("average", "max", "bilinear")


def pooled_grid(h: int, w: int, stride: int) -> tuple[int, int]:
    """Output grid ``(h', w')`` of :func:`pool_2d` for an ``(h, w)`` patch grid: ``ceil(h/stride), ceil(w/stride)``."""
    if stride < 1:
        raise ValueError(f"pooling stride must be ≥ 1, got {stride}")
    return math.ceil(h / stride), math.ceil(w / stride)


def pool_2d(features: torch.Tensor, grid: tuple[int, int], stride: int, mode: PoolMode = "average") -> torch.Tensor:
    """Pool frame features on their patch grid.

    Args:
        features: ``(T, P, D)`` with ``P = h * w`` patches in row-major order.
        grid: ``(h, w)``, the patch grid (need not be square).
        stride: pooling factor; 1 returns the features unchanged.
        mode: ``"average"``, ``"max"`` or ``"bilinear"``.

    Returns:
        ``(T, h' * w', D)`` with ``(h', w') = pooled_grid(h, w, stride)``, row-major.
    """
    if mode not in POOL_MODES:
        raise ValueError(f"pooling mode must be one of {POOL_MODES}, got {mode!r}")
    t, p, d = features.shape
    h, w = grid
    if h * w != p:
        raise ValueError(f"{p} patches do not fill a {h}x{w} grid")
    if stride == 1:
        return features
    x = features.transpose(1, 2).reshape(t, d, h, w)
    out_h, out_w = pooled_grid(h, w, stride)
    if mode == "average":
        # count_include_pad=False: edge cells average only the patches they really cover
        x = F.avg_pool2d(x, stride, stride, ceil_mode=True, count_include_pad=False)
    elif mode == "max":
        x = F.max_pool2d(x, stride, stride, ceil_mode=True)
    else:
        x = F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=False)
    return x.reshape(t, d, out_h * out_w).transpose(1, 2)
