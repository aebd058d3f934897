"""LAPE parameters and the math on them: tables, heads, NTP, token_transfer, injection, smart init.

Per axis (``HEIGHT``, ``WIDTH``, ``TEMP``; see :mod:`agrivlm.lape.tokens`) there is an input table
``(N, D)`` — the embeddings of the position tokens fed to the LLM and of the positions added to visual
features — and an output head ``D → N`` whose rows score the position tokens, both separate from the
LLM's text vocabulary.

NTP (neighbouring token propagation, LLaVA-ST): every use of a table or head goes through
:func:`reparam` with the fixed matrix ``M[i, j] = 2^-|i-j|`` (:func:`ntp_matrix`): the forward value is
the weight ``W`` itself, the gradient that reaches ``W`` is ``G + Mᵀ G`` — each token's update spreads to
its neighbours, halving per bin.

All positions are normalized values in ``[0, 1]`` with bin-centre semantics (token ``i`` of ``N`` sits at
``(i + 0.5) / N``): see :func:`agrivlm.lape.tokens.bin_coordinate`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from agrivlm.lape.tokens import AXES, DEFAULT_NUM_SPATIAL, DEFAULT_NUM_TEMPORAL, Axis, LapeVocab

#: How the LAPE tables and heads start: ``llm_stats`` (:func:`smart_init_`), ``smooth`` (:func:`smooth_init_`),
#: ``number_text`` (:func:`number_text_init_`) or ``random`` (:func:`random_init_`, the smart init's ablation).
LapeInit = Literal["llm_stats", "smooth", "number_text", "random"]
LAPE_INITS: tuple[str, ...] = get_args(LapeInit)


# ---------------------------------------------------------------------------------------------------
# pure functions
# ---------------------------------------------------------------------------------------------------
@lru_cache(maxsize=32)
def _ntp_matrix_cached(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    idx = torch.arange(n, device=device, dtype=torch.float64)
    return torch.pow(2.0, -(idx[:, None] - idx[None, :]).abs()).to(dtype)


def ntp_matrix(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """The fixed NTP matrix ``(n, n)``: ``M[i, j] = 2^-|i - j|`` (symmetric, ones on the diagonal).

    Cached per ``(n, dtype, device)``; never a parameter, never saved.
    """
    return _ntp_matrix_cached(n, dtype, torch.device(device) if device is not None else torch.device("cpu"))


def reparam(weight: torch.Tensor, mat: torch.Tensor) -> torch.Tensor:
    """NTP reparameterisation ``W + M@W − (M@W).detach()``: value ``W``, gradient ``G + Mᵀ@G``.

    Args:
        weight: ``(N, D)`` a LAPE table or head weight.
        mat: ``(N, N)`` :func:`ntp_matrix`.

    Returns:
        ``(N, D)``, numerically equal to ``weight`` (the two ``M@W`` terms are the same tensor, so their
        difference is exactly zero).
    """
    spread = mat @ weight
    return weight + (spread - spread.detach())


class _NTPGradient(torch.autograd.Function):
    """Identity forward, ``G + Mᵀ@G`` backward: :func:`reparam`'s value and gradient without its forward matmul."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, mat: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(mat)
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (mat,) = ctx.saved_tensors
        return grad + mat.T @ grad, None


def ntp(weight: torch.Tensor, mat: torch.Tensor) -> torch.Tensor:
    """Fused NTP: the same value (``weight``) and gradient (``G + Mᵀ@G``) as :func:`reparam`, one matmul less.

    The model uses this; :func:`reparam` is the literal formula it is tested against.
    """
    return _NTPGradient.apply(weight, mat)  # type: ignore[no-any-return]


def token_transfer(table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The embedding at continuous normalized positions, interpolated between the two neighbouring tokens.

    Position ``x`` sits at bin coordinate ``c = clip(x * N - 0.5, 0, N - 1)``; the result is
    ``(1 - r) * table[floor(c)] + r * table[floor(c) + 1]`` with ``r = c - floor(c)``. At a bin centre
    it is that token's row exactly.

    Args:
        table: ``(N, D)`` embeddings of one axis.
        positions: ``(...)`` normalized values in ``[0, 1]`` (clamped).

    Returns:
        ``(..., D)`` in ``table``'s dtype; differentiable in ``table`` (and in ``positions`` inside bins).
    """
    n = table.shape[0]
    c = (positions.to(torch.float64) * n - 0.5).clamp(0.0, n - 1)
    lo = c.floor().long().clamp(max=n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    r = (c - lo.to(c.dtype)).unsqueeze(-1).to(table.dtype)
    return table[lo] * (1 - r) + table[hi] * r


def axis_centres(num_patches: int, stride: int, mode: str = "average") -> npt.NDArray[np.float64]:
    """Normalized centres ``(n_cells,)`` of the cells :func:`agrivlm.pipeline.pooling.pool_2d` makes on one axis.

    ``num_patches`` patches span ``[0, 1]`` of the chip. Average/max pooling with ``ceil_mode`` makes
    cells ``[i*stride, min((i+1)*stride, num_patches))`` (the last may be partial), centred at
    ``(start + end) / 2 / num_patches``; bilinear resizing to ``ceil(num_patches / stride)`` cells puts
    cell ``i`` at ``(i + 0.5) / n_cells``. With ``stride == 1`` the centres are the patches' centres. The one
    definition of where a visual token sits: the model's LAPE injection (:func:`cell_centres`) and the
    processor's token positions (:func:`agrivlm.pipeline.anyres.grid_centres`) both read it.
    """
    n_cells = -(-num_patches // stride)
    i = np.arange(n_cells, dtype=np.float64)
    if mode == "bilinear" and stride > 1:
        return (i + 0.5) / n_cells
    start = i * stride
    end = np.minimum((i + 1) * stride, num_patches)
    return (start + end) / 2 / num_patches


def cell_centres(num_patches: int, stride: int, mode: str = "average") -> torch.Tensor:
    """:func:`axis_centres` as a float32 tensor (the model's grid of injected positions)."""
    return torch.from_numpy(axis_centres(num_patches, stride, mode)).to(torch.float32)


def default_frame_times(num_frames: int) -> torch.Tensor:
    """Normalized times ``(T,)`` of evenly spaced frames: ``linspace(0, 1, T)`` (``[0.]`` for one frame).

    The same convention as :class:`agrivlm.geo.coords.TimeAxis` (first frame 0, last 1).
    """
    if num_frames < 1:
        raise ValueError(f"need at least one frame, got {num_frames}")
    if num_frames == 1:
        return torch.zeros(1)
    return torch.linspace(0.0, 1.0, num_frames)


# ---------------------------------------------------------------------------------------------------
# the module
# ---------------------------------------------------------------------------------------------------
class LapeEmbeddings(nn.Module):
    """Input tables and output heads of the three axes, with NTP.

    State-dict names: ``{height,width,temporal}_input.weight`` ``(N, D)`` and
    ``{height,width,temporal}_output.weight`` ``(N, D)`` (``nn.Linear(D, N)`` without bias).
    """

    def __init__(self, hidden_size: int, num_spatial: int = DEFAULT_NUM_SPATIAL,
                 num_temporal: int = DEFAULT_NUM_TEMPORAL, ntp: bool = True) -> None:
        super().__init__()
        self.vocab = LapeVocab(num_spatial, num_temporal)
        self.hidden_size = hidden_size
        self.ntp = ntp
        self.height_input = nn.Embedding(num_spatial, hidden_size)
        self.width_input = nn.Embedding(num_spatial, hidden_size)
        self.temporal_input = nn.Embedding(num_temporal, hidden_size)
        self.height_output = nn.Linear(hidden_size, num_spatial, bias=False)
        self.width_output = nn.Linear(hidden_size, num_spatial, bias=False)
        self.temporal_output = nn.Linear(hidden_size, num_temporal, bias=False)

    def _raw(self, axis: Axis, output: bool) -> torch.Tensor:
        name = {Axis.HEIGHT: "height", Axis.WIDTH: "width", Axis.TEMP: "temporal"}[axis]
        module = getattr(self, f"{name}_{'output' if output else 'input'}")
        return module.weight  # type: ignore[no-any-return]

    def _maybe_reparam(self, w: torch.Tensor) -> torch.Tensor:
        if not self.ntp:
            return w
        return ntp(w, ntp_matrix(w.shape[0], w.dtype, w.device))

    def input_table(self, axis: Axis | str) -> torch.Tensor:
        """``(N, D)`` input embeddings of ``axis`` (NTP-reparameterised)."""
        return self._maybe_reparam(self._raw(Axis(axis), output=False))

    def output_weight(self, axis: Axis | str) -> torch.Tensor:
        """``(N, D)`` output-head rows of ``axis`` (NTP-reparameterised): logits are ``hidden @ weightᵀ``."""
        return self._maybe_reparam(self._raw(Axis(axis), output=True))

    def input_tables_by_axis(self) -> dict[Axis, torch.Tensor]:
        """``{axis: (N, D)}`` every input table (NTP-reparameterised): compute once per forward, pass around."""
        return {a: self.input_table(a) for a in AXES}

    def input_tables(self, tables: dict[Axis, torch.Tensor] | None = None) -> torch.Tensor:
        """``(P, D)`` all input tables stacked in the vocabulary's layout (``HEIGHT``, ``WIDTH``, ``TEMP``)."""
        tables = tables if tables is not None else self.input_tables_by_axis()
        return torch.cat([tables[a] for a in AXES], dim=0)

    def output_weights(self) -> torch.Tensor:
        """``(P, D)`` all output-head rows in the vocabulary's layout."""
        return torch.cat([self.output_weight(a) for a in AXES], dim=0)

    def inject(
        self,
        features: torch.Tensor,
        row_centres: torch.Tensor,
        col_centres: torch.Tensor,
        frame_times: torch.Tensor,
        spatial_weight: float = 1.0,
        temporal_weight: float = 1.0,
        tables: dict[Axis, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Add LAPE positions to visual features on their (pooled) grid.

        Args:
            features: ``(N, T, h*w, D)`` projected, pooled features of ``N`` visual items of ``T`` frames,
                cells row-major.
            row_centres: ``(h,)`` normalized ``v`` of each grid row's centre (:func:`cell_centres`).
            col_centres: ``(w,)`` normalized ``u`` of each grid column's centre.
            frame_times: ``(N, T)`` normalized ``t`` of each frame (:func:`default_frame_times`).
            spatial_weight: scale of the height + width embeddings (``spatial_injection_scale``).
            temporal_weight: scale of the temporal embeddings (``temporal_injection_scale``).
            tables: :meth:`input_tables_by_axis` when already computed in this forward.

        Returns:
            ``(N, T, h*w, D)``: ``features + sw·(H[v_i] + W[u_j]) + tw·T[t_k]`` with each term
            interpolated by :func:`token_transfer`.
        """
        n, t, hw, d = features.shape
        h, w = row_centres.numel(), col_centres.numel()
        if h * w != hw:
            raise ValueError(f"{hw} visual tokens per frame do not fill a {h}x{w} grid")
        if tuple(frame_times.shape) != (n, t):
            raise ValueError(
                f"frame_times must be ({n}, {t}) for {n} items of {t} frames, got {tuple(frame_times.shape)}"
            )
        dev = features.device
        tables = tables if tables is not None else self.input_tables_by_axis()
        height = token_transfer(tables[Axis.HEIGHT], row_centres.to(dev))  # (h, D)
        width = token_transfer(tables[Axis.WIDTH], col_centres.to(dev))  # (w, D)
        temporal = token_transfer(tables[Axis.TEMP], frame_times.to(dev))  # (N, T, D)
        spatial = (height[:, None, :] + width[None, :, :]).reshape(hw, d)
        pos = spatial_weight * spatial[None, None] + temporal_weight * temporal[:, :, None, :]
        return features + pos.to(features.dtype)


# ---------------------------------------------------------------------------------------------------
# initialisation
# ---------------------------------------------------------------------------------------------------
def _same_storage(a: torch.Tensor, b: torch.Tensor | None) -> bool:
    return b is not None and a.data_ptr() == b.data_ptr() and a.shape == b.shape


@torch.no_grad()
def smart_init_(
    lape: LapeEmbeddings,
    input_embeddings: torch.Tensor,
    output_embeddings: torch.Tensor | None = None,
    std_ratio: float = 0.1,
    generator: torch.Generator | None = None,
) -> None:
    """Draw the LAPE tables from ``Normal(mean, std_ratio · std)`` of the LLM's input-embedding weights.

    Heads: drawn the same way from the statistics of the LLM's output embeddings (``lm_head``), so
    position-token logits start on the same scale relative to the text logits; when the LLM ties its
    output to its input embeddings (or ``output_embeddings`` is None) each head starts as a copy of its
    input table, as a tied LLM would have it. ``mean`` and ``std`` are scalars over the whole matrix.
    """
    _stats_init_(lape, input_embeddings, output_embeddings, std_ratio,
                 lambda shape, mean, std: torch.normal(mean, std, size=shape, generator=generator))


#: Rows of a LAPE table or head from the embeddings' scalar statistics: ``(shape, mean, std) → tensor``.
_Draw = Callable[[torch.Size, float, float], torch.Tensor]


def _stats_init_(lape: LapeEmbeddings, input_embeddings: torch.Tensor, output_embeddings: torch.Tensor | None,
                 std_ratio: float, draw: _Draw) -> None:
    """Tables from ``draw`` at the input embeddings' mean and ``std_ratio`` × std; heads from the output ones'.

    Tables of every axis first, then heads (copies of the tables when the LLM is tied or ``output_embeddings`` is
    None): the order in which :func:`smart_init_` has always drawn them.
    """
    if std_ratio <= 0:
        raise ValueError(f"std_ratio must be > 0, got {std_ratio}")
    src = input_embeddings.detach().float()
    mean, std = float(src.mean()), float(src.std())
    tied = output_embeddings is None or _same_storage(input_embeddings, output_embeddings)
    for axis in AXES:
        table = lape._raw(axis, output=False)
        table.copy_(draw(table.shape, mean, std_ratio * std).to(table))
    if tied:
        for axis in AXES:
            lape._raw(axis, output=True).copy_(lape._raw(axis, output=False))
        return
    assert output_embeddings is not None
    out = output_embeddings.detach().float()
    o_mean, o_std = float(out.mean()), float(out.std())
    for axis in AXES:
        head = lape._raw(axis, output=True)
        head.copy_(draw(head.shape, o_mean, std_ratio * o_std).to(head))


def smooth_rows(n: int, dim: int, generator: torch.Generator | None = None, min_cycles: float = 0.25,
                max_cycles: float | None = None) -> torch.Tensor:
    """``(n, dim)`` rows of unit variance per entry that vary smoothly with the bin index (random Fourier features).

    Column ``d`` is ``√2 · cos(2π f_d (i + 0.5) / n + φ_d)``, frequencies ``f_d`` log-uniform in
    ``[min_cycles, max_cycles]`` cycles over the axis (default ``max_cycles = n / 8``: a period of at least 8 bins)
    and phases uniform. The cosine similarity of two rows then depends on their distance alone and falls from
    1 at distance 0 over a few bins (the kernel ``mean_d cos(2π f_d Δ / n)``), so a position is like its
    neighbours from the first step, as NTP's gradient spreading only makes them over training.
    """
    top = max_cycles if max_cycles is not None else max(n / 8.0, min_cycles * 2)
    u = torch.rand(dim, generator=generator, dtype=torch.float64)
    freq = torch.exp(math.log(min_cycles) + u * (math.log(top) - math.log(min_cycles)))
    phase = torch.rand(dim, generator=generator, dtype=torch.float64) * 2 * math.pi
    centres = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return (math.sqrt(2.0) * torch.cos(2 * math.pi * centres[:, None] * freq[None, :] + phase[None, :])).float()


@torch.no_grad()
def smooth_init_(
    lape: LapeEmbeddings,
    input_embeddings: torch.Tensor,
    output_embeddings: torch.Tensor | None = None,
    std_ratio: float = 0.1,
    generator: torch.Generator | None = None,
) -> None:
    """The smart init's statistics with rows that vary smoothly along each axis (``lape.init: smooth``).

    Each table is ``mean + std_ratio · std · smooth_rows(N, D)`` with the scalar mean and std of the LLM's
    input embeddings, as :func:`smart_init_`, but neighbouring bins start alike (:func:`smooth_rows`) instead
    of independent. That matters twice: a point or box a question gives (an input row) starts like the
    visual tokens injected near it (the same table, :func:`token_transfer` at the cell centres), so attention
    can find the field under a point from the first step; and a head whose rows are smooth scores the
    neighbours of its argmax high, as the position loss rewards. Heads use the LLM's output statistics
    (a copy of the table when the LLM is tied), each table and head its own draw.
    """
    _stats_init_(lape, input_embeddings, output_embeddings, std_ratio,
                 lambda shape, mean, std: mean + std * smooth_rows(shape[0], shape[1], generator))


@torch.no_grad()
def random_init_(lape: LapeEmbeddings, std: float = 0.02, generator: torch.Generator | None = None) -> None:
    """Draw the LAPE tables and heads from ``Normal(0, std)``, as an LLM draws new vocabulary rows.

    The ablation of :func:`smart_init_` (``lape.init: random``): the same shapes, no statistics of the LLM.
    """
    if std <= 0:
        raise ValueError(f"std must be > 0, got {std}")
    for axis in AXES:
        for output in (False, True):
            raw = lape._raw(axis, output=output)
            raw.copy_(torch.normal(0.0, std, size=raw.shape, generator=generator).to(raw))


def _number_rows(weight: torch.Tensor, ids_per_bin: Sequence[Sequence[int]]) -> torch.Tensor:
    rows = []
    for ids in ids_per_bin:
        if not ids:
            raise ValueError("a number string produced no tokens")
        place = torch.tensor([10.0 ** -k for k in range(len(ids))])
        place = place / place.sum()
        rows.append((weight[list(ids)].float() * place[:, None]).sum(0))
    return torch.stack(rows)


@torch.no_grad()
def number_text_init_(
    lape: LapeEmbeddings,
    input_embeddings: torch.Tensor,
    encode: Callable[[str], list[int]],
    output_embeddings: torch.Tensor | None = None,
    noise_ratio: float = 0.1,
    generator: torch.Generator | None = None,
) -> None:
    """Initialise each bin from the LLM's text embeddings of its index written in decimal.

    Row ``i`` of an axis is the place-weighted mean (weights ``10^-k`` for the ``k``-th token, normalized,
    so ``"12"`` ≠ ``"21"`` when digits are separate tokens) of the embeddings of ``encode(str(i))``, plus
    ``Normal(0, noise_ratio · std)`` noise. Heads take the same tokens' rows of ``output_embeddings`` (or a
    copy of the tables when the LLM is tied).

    Args:
        lape: the module to initialise in place.
        input_embeddings: ``(V, D)`` the LLM's input embeddings.
        encode: text → token ids of the LLM's tokenizer (no special tokens).
        output_embeddings: ``(V, D)`` the LLM's output embeddings, or None when tied.
        noise_ratio: noise std as a fraction of the embeddings' std.
        generator: random generator for the noise.
    """
    std = float(input_embeddings.detach().float().std())
    tied = output_embeddings is None or _same_storage(input_embeddings, output_embeddings)
    for axis in AXES:
        ids = [encode(str(i)) for i in range(lape.vocab.size(axis))]
        table = lape._raw(axis, output=False)
        rows = _number_rows(input_embeddings.detach(), ids)
        rows += torch.normal(0.0, noise_ratio * std, size=rows.shape, generator=generator)
        table.copy_(rows.to(table))
        head = lape._raw(axis, output=True)
        if tied:
            head.copy_(table)
        else:
            assert output_embeddings is not None
            head.copy_(_number_rows(output_embeddings.detach(), ids).to(head))
