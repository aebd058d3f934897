"""Frame-level attention masks and their expansion to tokens.

Every mask is a boolean ``(N, N)`` torch tensor, row = query, column = key, **True = may attend**. A
frame always sees itself, so no row is empty (an all-False row gives NaN in softmax).

* :func:`causal_frame_mask` — frame ``i`` sees frames ``0 … i``.
* :func:`sliding_window_frame_mask` — frame ``i`` sees frames ``i − window + 1 … i``.
* :func:`fast_slow_frame_mask` — from the fast/slow labels of :class:`~agrivlm.pipeline.frames.Frames`,
  in any frame order: slow frames see every slow frame (the long context is bidirectional, as in the
  reconstruction notes); fast frames see every slow frame and the fast frames at or before them.
* :func:`expand_to_tokens` — frame level → token level, given the tokens of each frame (all tokens of a
  frame see each other); :func:`additive_mask` turns it into the 0 / −inf float mask attention layers add.
* :func:`draw_mask_png` — a picture of a mask (matplotlib ``Figure``, no pyplot state), written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from agrivlm.errors import PipelineError
from agrivlm.io import atomic_path


def _check_n(num_frames: int) -> None:
    if num_frames < 1:
        raise PipelineError(f"a frame mask needs at least one frame, got {num_frames}")


def causal_frame_mask(num_frames: int) -> torch.Tensor:
    """``(T, T)`` bool: frame ``i`` may attend to frames ``j ≤ i``."""
    _check_n(num_frames)
    return torch.ones(num_frames, num_frames, dtype=torch.bool).tril()


def sliding_window_frame_mask(num_frames: int, window: int) -> torch.Tensor:
    """``(T, T)`` bool: frame ``i`` may attend to frames ``i − window < j ≤ i`` (itself and ``window − 1`` before).

    ``window ≥ T`` is :func:`causal_frame_mask`; ``window = 1`` is the identity.
    """
    _check_n(num_frames)
    if window < 1:
        raise PipelineError(f"sliding window must be ≥ 1 frame, got {window}")
    i = torch.arange(num_frames)[:, None]
    j = torch.arange(num_frames)[None, :]
    return (j <= i) & (j > i - window)


def fast_slow_frame_mask(is_fast: Sequence[bool] | npt.ArrayLike | torch.Tensor) -> torch.Tensor:
    """``(T, T)`` bool for a merged fast/slow frame sequence (any order: concat or interleave).

    Args:
        is_fast: ``(T,)``, True for frames of the fast stream, in sequence order.

    Returns:
        ``mask[i, j]`` True if ``j`` is a slow frame, or both are fast and ``j ≤ i`` (position order).
        With ``concat`` order (slow first) this is the notes' block mask: slow↔slow all, fast→slow all,
        fast→fast lower-triangular, slow→fast none.

    """
    fast = torch.as_tensor(np.asarray(is_fast, dtype=bool))
    if fast.ndim != 1:
        raise PipelineError(f"is_fast must be (T,), got shape {tuple(fast.shape)}")
    _check_n(int(fast.numel()))
    slow_key = ~fast[None, :]
    both_fast = fast[:, None] & fast[None, :]
    return slow_key | (both_fast & causal_frame_mask(int(fast.numel())))


def expand_to_tokens(frame_mask: torch.Tensor, tokens_per_frame: int | Sequence[int]) -> torch.Tensor:
    """Frame-level ``(T, T)`` mask → token-level ``(N, N)``, ``N = Σ tokens_per_frame``.

    Token ``a`` of frame ``i`` may attend to token ``b`` of frame ``j`` iff ``frame_mask[i, j]``.

    Args:
        frame_mask: ``(T, T)`` bool.
        tokens_per_frame: one count for every frame, or ``(T,)`` counts (frames may differ, e.g. across
            scales).

    """
    if frame_mask.ndim != 2 or frame_mask.shape[0] != frame_mask.shape[1]:
        raise PipelineError(f"frame mask must be square (T, T), got {tuple(frame_mask.shape)}")
    t = frame_mask.shape[0]
    counts = torch.as_tensor([tokens_per_frame] * t if isinstance(tokens_per_frame, int) else list(tokens_per_frame))
    if counts.numel() != t:
        raise PipelineError(f"{counts.numel()} token counts for {t} frames")
    if (counts < 1).any():
        raise PipelineError(f"every frame needs at least one token, got {counts.tolist()}")
    return frame_mask.bool().repeat_interleave(counts, dim=0).repeat_interleave(counts, dim=1)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Boolean mask → float mask to add to attention scores: 0 where True, the dtype's minimum where False."""
    zero = torch.zeros((), dtype=dtype)
    return torch.where(mask.bool(), zero, torch.tensor(torch.finfo(dtype).min, dtype=dtype))


def draw_mask_png(
    mask: torch.Tensor | npt.ArrayLike,
    path: str | os.PathLike[str],
    title: str | None = None,
    frame_labels: Sequence[str] | None = None,
    tokens_per_frame: int | Sequence[int] | None = None,
) -> Path:
    """Draw a mask (rows = queries, columns = keys; dark = may attend) to a PNG, atomically.

    Args:
        mask: ``(N, N)`` bool.
        path: the PNG to write (folders are created).
        title: figure title.
        frame_labels: names of the frames (e.g. dates, "slow"/"fast"), on the axes.
        tokens_per_frame: for a token-level mask, the counts used to expand it: frame boundaries are drawn
            and ``frame_labels`` placed at frame centres.

    Returns:
        The written path.

    """
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    m = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask, dtype=bool)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise PipelineError(f"mask must be square (N, N), got {m.shape}")
    n = m.shape[0]
    if tokens_per_frame is None:
        counts = np.ones(n, dtype=np.int64)
    elif isinstance(tokens_per_frame, int):
        counts = np.full(n // max(tokens_per_frame, 1), tokens_per_frame, dtype=np.int64)
    else:
        counts = np.asarray(tokens_per_frame, dtype=np.int64)
    if counts.sum() != n:
        raise PipelineError(f"tokens_per_frame sum to {counts.sum()} but the mask is {n}x{n}")
    edges = np.concatenate([[0], np.cumsum(counts)])
    side = min(12.0, 3.0 + 0.25 * len(counts))
    fig = Figure(figsize=(side, side))
    ax = fig.subplots()
    ax.imshow(m, cmap="Greys", vmin=0, vmax=1, interpolation="nearest", extent=(0, n, n, 0))
    if tokens_per_frame is not None:
        for e in edges[1:-1]:
            ax.axhline(e, color="tab:red", lw=0.6)
            ax.axvline(e, color="tab:red", lw=0.6)
    if frame_labels is not None:
        if len(frame_labels) != len(counts):
            raise PipelineError(f"{len(frame_labels)} frame labels for {len(counts)} frames")
        centres = (edges[:-1] + edges[1:]) / 2.0
        ax.set_xticks(centres, list(frame_labels), rotation=90, fontsize=7)
        ax.set_yticks(centres, list(frame_labels), fontsize=7)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(title or f"attention mask {n}x{n} (dark = may attend)")
    fig.tight_layout()
    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return target
