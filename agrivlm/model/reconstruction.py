"""Autoregressive next-frame reconstruction: an auxiliary loss that makes the LLM's visual states predictive in time.

After the reconstruction notes (LLaVA-NeXT → lmms-engine): a **frozen copy of the vision encoder**
(the teacher, :class:`FrozenTeacher`) encodes every frame into target features; a small **parallel
predictor** (:class:`NextFramePredictor`, a transformer encoder) reads, for frames ``0 … T−2``, the LLM's
hidden states at that frame's visual tokens together with the teacher's features of that frame, under a
frame-level mask from :mod:`agrivlm.pipeline.masks` (causal over a window of ``num_hist`` frames, or the
fast/slow mask), and predicts the teacher features of frames ``1 … T−1``. The loss is their MSE; the
trainer adds ``loss_weight · MSE`` to the language-model loss (``total = main + weight · aux``).

Shapes, for ``N`` items of ``T`` frames on a pooled grid of ``h' × w' = P`` cells (the grid of the
model's visual tokens, :func:`~agrivlm.pipeline.inputs.visual_token_grid`):

* teacher features ``(N, T, P, Dv)`` — band adapter (a copy, frozen at the stage's start) → vision
  encoder → the model's pooling (no projector: targets live in the encoder's space);
* LLM hidden states at the visual tokens ``(N, T, P, D)``;
* prediction and target ``(N, T−1, P, Dv)``.

Gradients reach the model only through the LLM hidden states (the teacher is frozen, its features are
targets and inputs without gradient). The teacher is not a submodule of the predictor: it is rebuilt
from the stage's starting weights (so it is never trained or saved), and when the stage does not train
the vision encoder it shares the model's frozen encoder instead of copying it (identical weights, no
second copy in memory); the band adapter, which every stage trains, is always copied.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from agrivlm.pipeline.masks import expand_to_tokens, fast_slow_frame_mask, sliding_window_frame_mask
from agrivlm.pipeline.pooling import pool_2d

if TYPE_CHECKING:
    from agrivlm.model.modeling import AgriVLMForConditionalGeneration


def frame_mask(
    num_frames: int, num_hist: int = 0, is_fast: Sequence[bool] | torch.Tensor | None = None
) -> torch.Tensor:
    """``(T, T)`` bool, True = may attend: fast/slow mask when ``is_fast`` is given, else causal over ``num_hist``.

    ``num_hist = 0`` means every earlier frame (plain causal); ``num_hist = k`` lets a frame see itself and
    the ``k − 1`` frames before it.
    """
    if is_fast is not None:
        return fast_slow_frame_mask(is_fast)
    return sliding_window_frame_mask(num_frames, num_hist if num_hist > 0 else num_frames)


def sincos_table(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """``(K,)`` positions → ``(K, dim)`` sinusoidal embeddings (``dim`` even; the transformer paper's frequencies)."""
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=positions.device) / half)
    ang = positions.float()[:, None] * freq[None, :]
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=1)


def grid_embedding(h: int, w: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """``(h·w, dim)`` fixed 2-D sinusoidal embedding of a row-major grid (half the channels rows, half columns)."""
    quarter = dim // 2
    rows = sincos_table(torch.arange(h, device=device), quarter)
    cols = sincos_table(torch.arange(w, device=device), dim - quarter)
    return torch.cat([rows[:, None, :].expand(h, w, -1), cols[None, :, :].expand(h, w, -1)], dim=-1).reshape(h * w, dim)


class FrozenTeacher(nn.Module):
    """Frozen band adapter + vision encoder + pooling: frames → target features ``(N, T, P, Dv)``."""

    def __init__(self, model: AgriVLMForConditionalGeneration, share_vision: bool) -> None:
        """Copy the band adapter (and the vision encoder unless ``share_vision``) of an AgriVLM ``model``."""
        super().__init__()
        cfg = model.config
        vcfg: Any = cfg.vision_config
        self.band_adapter: nn.Conv2d = copy.deepcopy(model.band_adapter)
        self.vision_tower: nn.Module = model.vision_tower if share_vision else copy.deepcopy(model.vision_tower)
        self.patch_size = int(vcfg.patch_size)
        self.image_size = int(vcfg.image_size)
        self.is_clip = vcfg.model_type == "clip_vision_model"
        self.feature_layer = int(cfg.vision_feature_layer)
        self.pool_stride, self.pool_mode = int(cfg.pool_stride), str(cfg.pool_mode)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenTeacher:
        """Always in eval mode (no dropout in the targets)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """``(N, T, C, H, W)`` → ``((N, T, P, Dv) features, (h', w') grid)``."""
        n, t, c, height, width = pixel_values.shape
        x = self.band_adapter(pixel_values.reshape(n * t, c, height, width).to(self.band_adapter.weight.dtype))
        interpolate = (height, width) != (self.image_size, self.image_size)
        want_hidden = self.feature_layer != -1
        out = self.vision_tower(pixel_values=x, interpolate_pos_encoding=interpolate, output_hidden_states=want_hidden)
        feats = out.last_hidden_state if not want_hidden else out.hidden_states[self.feature_layer]
        if self.is_clip:
            feats = feats[:, 1:]
        h, w = height // self.patch_size, width // self.patch_size
        pooled = pool_2d(feats, (h, w), self.pool_stride, self.pool_mode)  # type: ignore[arg-type]
        hp = -(-h // self.pool_stride)
        wp = pooled.shape[1] // hp
        return pooled.reshape(n, t, hp * wp, pooled.shape[-1]).detach(), (hp, wp)


@dataclass
class ReconstructionOutput:
    """What :meth:`NextFramePredictor.loss` returns.

    Attributes:
        loss: scalar MSE between prediction and target.
        prediction: ``(N, T−1, P, Dv)``.
        target: ``(N, T−1, P, Dv)`` (layer-normalised when ``normalize_targets``).
    """

    loss: torch.Tensor
    prediction: torch.Tensor
    target: torch.Tensor


class NextFramePredictor(nn.Module):
    """Parallel next-frame predictor: a transformer encoder over the tokens of frames ``0 … T−2``.

    Token ``(k, p)`` = ``W_v · teacher[k, p] + W_h · hidden[k, p] + grid_pos[p] + frame_pos[k]``; attention
    between frames follows :func:`frame_mask` (all tokens of a frame see each other); the output head maps
    token ``(k, p)`` to the prediction of ``teacher[k + 1, p]``.
    """

    def __init__(
        self,
        vision_dim: int,
        llm_dim: int,
        embedding_dim: int = 128,
        num_layers: int = 3,
        num_heads: int = 8,
        num_hist: int = 3,
        normalize_targets: bool = True,
        pool_strides: Sequence[int] = (1,),
    ) -> None:
        super().__init__()
        self.embedding_dim, self.num_hist, self.normalize_targets = embedding_dim, num_hist, normalize_targets
        if not pool_strides or any(int(s) < 1 for s in pool_strides):
            raise ValueError(f"pool_strides must be ≥ 1 each, got {list(pool_strides)}")
        #: Multi-scale pooling of the loss (the notes' ``enable_multiscale_pooling``): the MSE is averaged over
        #: the token grid average-pooled by each stride (1: the grid itself), so coarse structure counts too.
        self.pool_strides = tuple(int(s) for s in pool_strides)
        self.visual_in = nn.Linear(vision_dim, embedding_dim)
        self.hidden_in = nn.Linear(llm_dim, embedding_dim)
        layer = nn.TransformerEncoderLayer(
            embedding_dim, num_heads, dim_feedforward=4 * embedding_dim, dropout=0.0, activation="gelu",
            batch_first=True, norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(embedding_dim)
        self.head = nn.Linear(embedding_dim, vision_dim)

    def forward(
        self,
        teacher: torch.Tensor,
        hidden: torch.Tensor,
        grid: tuple[int, int],
        is_fast: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predictions ``(N, T−1, P, Dv)`` of frames ``1 … T−1``.

        Args:
            teacher: ``(N, T, P, Dv)`` teacher features.
            hidden: ``(N, T, P, D)`` LLM hidden states at the visual tokens.
            grid: ``(h', w')`` with ``h'·w' = P``.
            is_fast: optional ``(N, T)`` (or ``(T,)``, shared) fast-frame flags: the fast/slow mask of each item.
        """
        n, t, p, _ = teacher.shape
        if t < 2:
            raise ValueError("next-frame reconstruction needs at least 2 frames")
        if hidden.shape[:3] != (n, t, p):
            raise ValueError(
                f"hidden states {tuple(hidden.shape)} do not match teacher features {tuple(teacher.shape)}"
            )
        dev = teacher.device
        x = self.visual_in(teacher[:, :-1].to(self.visual_in.weight.dtype)) + self.hidden_in(
            hidden[:, :-1].to(self.hidden_in.weight.dtype)
        )
        pos = grid_embedding(grid[0], grid[1], self.embedding_dim, dev)[None, None]
        frame_pos = sincos_table(torch.arange(t - 1, device=dev), self.embedding_dim)[None, :, None]
        x = x + (pos + frame_pos).to(x.dtype)
        y = self.blocks(x.reshape(n, (t - 1) * p, -1), mask=self._attention_mask(n, t, p, is_fast).to(dev))
        return self.head(self.norm(y)).reshape(n, t - 1, p, -1)  # type: ignore[no-any-return]

    def _attention_mask(self, n: int, t: int, p: int, is_fast: torch.Tensor | None) -> torch.Tensor:
        """PyTorch's boolean mask (True = may NOT attend): ``(L, L)`` shared, or ``(N·heads, L, L)`` per item."""
        if is_fast is None:
            return ~expand_to_tokens(frame_mask(t - 1, self.num_hist), p)
        flags = is_fast.detach().cpu().bool()
        flags = flags.expand(n, t) if flags.ndim == 1 else flags
        if bool((flags == flags[:1]).all()):
            return ~expand_to_tokens(frame_mask(t - 1, is_fast=flags[0, :-1]), p)
        per_item = torch.stack([~expand_to_tokens(frame_mask(t - 1, is_fast=f[:-1]), p) for f in flags])
        heads = self.blocks.layers[0].self_attn.num_heads
        return per_item.repeat_interleave(heads, dim=0)

    def loss(
        self,
        teacher: torch.Tensor,
        hidden: torch.Tensor,
        grid: tuple[int, int],
        is_fast: torch.Tensor | None = None,
    ) -> ReconstructionOutput:
        """MSE between the predictions and the teacher features of frames ``1 … T−1``.

        With several ``pool_strides``: the mean of the MSEs of both, average-pooled on the ``grid`` by each stride.
        """
        pred = self.forward(teacher, hidden, grid, is_fast)
        target = teacher[:, 1:].to(pred.dtype)
        if self.normalize_targets:
            target = F.layer_norm(target, target.shape[-1:])
        n, t1, p, d = pred.shape
        losses = []
        for stride in self.pool_strides:
            a = pool_2d(pred.float().reshape(n * t1, p, d), grid, stride)
            b = pool_2d(target.float().reshape(n * t1, p, d), grid, stride)
            losses.append(F.mse_loss(a, b))
        return ReconstructionOutput(torch.stack(losses).mean(), pred, target)


def visual_hidden_states(
    hidden: torch.Tensor, input_ids: torch.Tensor, placeholder_ids: Sequence[int], num_items: int, num_frames: int
) -> torch.Tensor:
    """The LLM hidden states at the visual tokens: ``(B, L, D)`` → ``(N, T, P, D)`` in reading order.

    Raises:
        ValueError: the placeholder count is not ``N · T · P`` for a whole ``P``.
    """
    mask = torch.isin(input_ids, torch.tensor(list(placeholder_ids), device=input_ids.device))
    states = hidden[mask]  # (N·T·P, D), row-major over the batch = item order
    per = num_items * num_frames
    if per == 0 or states.shape[0] % per:
        raise ValueError(f"{states.shape[0]} visual tokens do not split into {num_items} items of {num_frames} frames")
    return states.reshape(num_items, num_frames, states.shape[0] // per, hidden.shape[-1])
