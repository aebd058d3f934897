"""``AgriVLMForConditionalGeneration``: band adapter → vision encoder → projector → pooling → LAPE → causal LM.

Data path for ``N`` visual items of ``T`` frames, ``C`` bands, ``H × W`` px, LLM width ``D``:

1. ``pixel_values (N, T, C, H, W)`` → band adapter (1×1 conv, ``C`` → the encoder's 3 channels) →
   vision encoder (SigLIP/CLIP vision from transformers; frames whose size differs from the encoder's
   ``image_size`` use the encoder's own ``interpolate_pos_encoding=True``) → patch features
   ``(N·T, h·w, Dv)`` with ``(h, w) = (H/p, W/p)`` (CLIP's CLS token dropped).
2. 2-layer MLP projector → ``(N·T, h·w, D)`` → :func:`~agrivlm.pipeline.pooling.pool_2d` →
   ``(N·T, h'·w', D)`` with ``(h', w') =`` :func:`~agrivlm.pipeline.inputs.visual_token_grid`.
3. LAPE injection (when on): ``+ spatial_injection_scale·(H[v] + W[u]) + temporal_injection_scale·T[t]`` at each
   pooled cell's centre and each frame's time. With ``patch_positions (N, h'·w', 2)`` (from
   :meth:`~agrivlm.model.processing.AgriVLMProcessor.from_chips`) each token's ``(u, v)`` is given instead:
   the chip position of an AnyRes tile's cells (:func:`inject_lape_at_positions`). Items of different sizes
   (multi-scale) come zero-padded with ``image_sizes (N, 2)``; each is cropped and encoded at its own size.
   With ``faster_video_stride`` ``k`` (LLaVA-NeXT-Video's faster stream) the frames between every ``k``-th are
   pooled at twice the stride, and each frame ends with a learned separator token.
4. The ``T·h'·w'`` visual tokens of each item replace its ``<image>``/``<video>`` placeholder tokens
   (count checked, then ``masked_scatter``, as in HF Llava).
5. The LLM runs on the embeddings. With LAPE on, ids ``≥ position_token_offset`` are position tokens:
   their input embeddings are rows of the LAPE tables, and their logits come from the LAPE heads, appended
   after the LLM's text logits — so the logits have ``len(tokenizer)`` columns and ``generate()`` emits
   position tokens like any other token.

Loss: cross-entropy over supervised tokens; a position-token label (a bin token, or an ``-OUTPUT``
placeholder with its value in ``position_values``) gets the soft target ``(1 − r, r)`` on the two bins
around its continuous value (:func:`~agrivlm.lape.tokens.position_interp`), and weight
``spatial_loss_weight`` / ``temporal_loss_weight``; the loss is ``Σ wᵢ·CEᵢ / Σ wᵢ``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import ModelOutput

from agrivlm.lape.embedding import LapeEmbeddings, cell_centres, default_frame_times, token_transfer
from agrivlm.lape.tokens import AXES, Axis, LapeVocab, ParsedPositions, parse_token_ids
from agrivlm.model.configuration import AgriVLMConfig
from agrivlm.pipeline.inputs import IGNORE_INDEX, num_visual_tokens, visual_token_grid
from agrivlm.pipeline.pooling import pool_2d


@dataclass
class AgriVLMOutput(ModelOutput):
    """Output of :meth:`AgriVLMForConditionalGeneration.forward`.

    Attributes:
        loss: scalar, ``Σ wᵢ·CEᵢ / Σ wᵢ`` over supervised tokens (with ``labels``).
        logits: ``(B, L, V)`` with ``V = len(tokenizer)`` (text logits, then the LAPE heads').
        cache: the LLM's KV cache (with ``use_cache``).
        hidden_states: the LLM's hidden states (with ``output_hidden_states``).
        attentions: the LLM's attentions (with ``output_attentions``).
        text_loss: mean CE over supervised text tokens (detached, for logging).
        position_loss: mean CE over supervised position tokens (detached, for logging).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    text_loss: torch.Tensor | None = None
    position_loss: torch.Tensor | None = None


def _packs(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices of ``lengths`` packed in order into runs of at most ``budget`` in total (a longer one alone)."""
    packs: list[list[int]] = []
    total = 0
    for i, n in enumerate(lengths):
        if not packs or total + n > budget:
            packs.append([])
            total = 0
        packs[-1].append(i)
        total += n
    return packs


def inject_lape_at_positions(
    lape: LapeEmbeddings,
    features: torch.Tensor,
    positions: torch.Tensor,
    frame_times: torch.Tensor,
    spatial_weight: float = 1.0,
    temporal_weight: float = 1.0,
    tables: dict[Axis, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Add LAPE positions to visual features at given per-token positions (AnyRes tiles, thumbnails, scales).

    The same sum as :meth:`~agrivlm.lape.embedding.LapeEmbeddings.inject`, with the grid's separable row/column
    centres replaced by each token's own ``(u, v)``; on a grid's cell centres the result is bit-for-bit the same.

    Args:
        lape: the model's LAPE embeddings.
        features: ``(N, T, P, D)`` projected, pooled features, cells row-major.
        positions: ``(N, P, 2)`` normalized chip ``(u, v)`` of each token (``u`` → ``WIDTH``, ``v`` → ``HEIGHT``),
            shared by the item's frames; float32 is used (as the grid centres are).
        frame_times: ``(N, T)`` normalized ``t`` of each frame.
        spatial_weight: scale of the height + width embeddings.
        temporal_weight: scale of the temporal embeddings.
        tables: the LAPE input tables of this forward, when already computed.

    Returns:
        ``(N, T, P, D)``: ``features + sw·(H[v] + W[u]) + tw·T[t]``, each term by :func:`token_transfer`.
    """
    n, t, p, _ = features.shape
    if tuple(positions.shape) != (n, p, 2):
        raise ValueError(f"patch_positions must be ({n}, {p}, 2): (u, v) of the {p} visual tokens per frame of each "
                         f"of {n} items, got {tuple(positions.shape)}; build inputs with AgriVLMProcessor.from_chips")
    if tuple(frame_times.shape) != (n, t):
        raise ValueError(f"frame_times must be ({n}, {t}) for {n} items of {t} frames, got {tuple(frame_times.shape)}")
    dev = features.device
    pos = positions.to(device=dev, dtype=torch.float32)
    if not bool(torch.isfinite(pos).all()):
        raise ValueError("patch_positions hold NaN/inf for real visual tokens; give every token its (u, v)")
    tables = tables if tables is not None else lape.input_tables_by_axis()
    height = token_transfer(tables[Axis.HEIGHT], pos[..., 1])  # (N, P, D)
    width = token_transfer(tables[Axis.WIDTH], pos[..., 0])  # (N, P, D)
    temporal = token_transfer(tables[Axis.TEMP], frame_times.to(dev))  # (N, T, D)
    spatial = height + width
    out = spatial_weight * spatial[:, None] + temporal_weight * temporal[:, :, None, :]
    return features + out.to(features.dtype)


class BandAdapter(nn.Conv2d):
    """Learnable 1×1 conv ``(N, num_bands, H, W) → (N, out_channels, H, W)`` in front of an RGB-pretrained encoder.

    Initialisation (:meth:`default_weight`, applied by the model's weight init): identity when
    ``num_bands == out_channels``; one band is copied to every channel (a grey image); otherwise each
    channel starts as the mean of the bands. Bias 0. (A ``Conv2d`` subclass, so the init sees its own
    parameters: state-dict keys ``band_adapter.weight`` / ``band_adapter.bias``.)
    """

    def __init__(self, num_bands: int, out_channels: int) -> None:
        super().__init__(num_bands, out_channels, kernel_size=1)
        self.num_bands = num_bands
        self.out_channels = out_channels

    def default_weight(self) -> torch.Tensor:
        """The initial ``(out_channels, num_bands, 1, 1)`` weight described above."""
        if self.num_bands == self.out_channels:
            w = torch.eye(self.num_bands)
        else:
            w = torch.full((self.out_channels, self.num_bands), 1.0 / self.num_bands)
        return w[:, :, None, None]


class Projector(nn.Module):
    """2-layer MLP ``(…, Dv) → (…, D)``: Linear → activation → Linear (LLaVA-1.5's projector).

    With ``norm="batch"`` the features are first standardised per channel over every visual token of the
    batch (``BatchNorm1d`` without affine parameters; running statistics in eval mode), see
    :attr:`~agrivlm.model.configuration.AgriVLMConfig.projector_norm`.
    """

    def __init__(self, vision_size: int, text_size: int, act: str = "gelu", norm: str = "none") -> None:
        super().__init__()
        if norm not in ("none", "batch"):
            raise ValueError(f"projector_norm must be none or batch, got {norm!r}")
        self.norm = nn.BatchNorm1d(vision_size, affine=False) if norm == "batch" else None
        self.linear_1 = nn.Linear(vision_size, text_size)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(text_size, text_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(…, Dv)`` → ``(…, D)``."""
        if self.norm is not None:
            x = self.norm(x.reshape(-1, x.shape[-1])).reshape(x.shape)
        return self.linear_2(self.act(self.linear_1(x)))  # type: ignore[no-any-return]


class AgriVLMPreTrainedModel(PreTrainedModel):
    """Weight init and HF plumbing shared by agrivlm models."""

    config: AgriVLMConfig
    config_class = AgriVLMConfig
    base_model_prefix = "agrivlm"
    main_input_name = "input_ids"
    input_modalities = ["image", "video", "text"]  # type: ignore[assignment]
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @classmethod
    def register_for_auto_class(cls, auto_class: Any = "AutoModel") -> None:
        """Nothing to do: the config's ``auto_map`` names the installed class.

        transformers' version would make every later ``save_pretrained`` copy this module into the folder: a second
        class, which the next load would use.
        """

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, BandAdapter):
            init.copy_(module.weight, module.default_weight().to(module.weight))
            if module.bias is not None:
                init.zeros_(module.bias)
            return
        faster = getattr(module, "faster_token", None)
        if isinstance(faster, nn.Parameter):  # as LLaVA-NeXT's faster_token: N(0, 1/D)
            init.normal_(faster, std=faster.shape[0] ** -0.5)
        super()._init_weights(module)


class AgriVLMForConditionalGeneration(AgriVLMPreTrainedModel, GenerationMixin):
    """The agrivlm VLM (see the module docstring for the data path, shapes and loss).

    Build it with :mod:`agrivlm.model.builders` (tiny default or local checkpoints, tokenizer included);
    ``AgriVLMForConditionalGeneration(config)`` alone gives random weights and needs the token ids in
    ``config``.
    """

    def __init__(self, config: AgriVLMConfig) -> None:
        super().__init__(config)
        vcfg, tcfg = config.vision_config, config.text_config
        self.band_adapter = BandAdapter(config.num_bands, vcfg.num_channels)  # type: ignore[union-attr]
        self.vision_tower = AutoModel.from_config(vcfg)
        self.projector = Projector(vcfg.hidden_size, tcfg.hidden_size, config.projector_hidden_act,  # type: ignore[union-attr]
                                   getattr(config, "projector_norm", "none"))
        self.language_model = AutoModelForCausalLM.from_config(tcfg)
        self.lape: LapeEmbeddings | None = None
        if config.enable_lape:
            self.lape = LapeEmbeddings(
                tcfg.hidden_size, config.num_spatial_tokens, config.num_temporal_tokens, config.lape_ntp  # type: ignore[union-attr]
            )
        # one config object per sub-model, shared, so resizing the LLM updates what save_pretrained writes
        self.config.vision_config = self.vision_tower.config
        self.config.text_config = self.language_model.config
        #: The separator ending each frame's tokens with the faster-video stream on (``config.faster_video_stride``).
        self.faster_token: nn.Parameter | None = None
        if config.faster_video_stride:
            self.faster_token = nn.Parameter(torch.zeros(tcfg.hidden_size))  # type: ignore[union-attr]
        #: In eval mode, encode a frame that repeats in the batch once (:meth:`_patch_features`); off only to
        #: measure what it saves (``benchmarks/infer_default.py``).
        self.share_repeated_frames = True
        self.post_init()

    # -- HF plumbing ---------------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        """The LLM's text-token embeddings (position tokens live in ``self.lape``)."""
        return self.language_model.get_input_embeddings()  # type: ignore[no-any-return]

    def set_input_embeddings(self, value: nn.Module) -> None:
        """Replace the LLM's text-token embeddings."""
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        """The LLM's text-token output head."""
        return self.language_model.get_output_embeddings()  # type: ignore[no-any-return]

    @property
    def vocab(self) -> LapeVocab:
        """The LAPE vocabulary of this model."""
        return LapeVocab(self.config.num_spatial_tokens, self.config.num_temporal_tokens)

    def resize_text_vocab(self, size: int) -> None:
        """Resize the LLM's text vocabulary (embeddings and head) to ``size`` rows and record it in the config."""
        self.language_model.resize_token_embeddings(size, mean_resizing=False)
        self.config.text_config.vocab_size = size  # type: ignore[union-attr]

    # -- vision path ---------------------------------------------------------------------------------
    def get_visual_features(
        self,
        pixel_values: torch.Tensor,
        frame_times: torch.Tensor | None = None,
        lape_tables: dict[Axis, torch.Tensor] | None = None,
        patch_positions: torch.Tensor | None = None,
        patch_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Visual tokens of each item.

        Args:
            pixel_values: ``(N, T, C, H, W)`` frames (``C = num_bands``; no NaN — the processor fills them).
            frame_times: ``(N, T)`` normalized time of each frame; default evenly spaced ``[0, 1]``.
            lape_tables: the LAPE input tables of this forward (computed once and shared with the text path).
            patch_positions: optional ``(N, h'·w', 2)`` chip ``(u, v)`` of each visual token of a frame
                (:func:`inject_lape_at_positions`); None: the centres of the item's own pooled grid, i.e. the
                item is the whole chip.
            patch_features: the items' frames already encoded and projected, ``(N·T, h·w, D)`` (:meth:`encode_packed`).

        Returns:
            ``(N, T·h'·w', D)`` projected, pooled, LAPE-injected visual tokens, frame by frame, cells
            row-major (``(h', w') = visual_token_grid(H, W, patch_size, pool_stride)``). With
            ``config.faster_video_stride`` ``k``: frame ``i`` gives its ``h' × w'`` tokens when ``i % k == 0``, else
            its tokens pooled twice as coarsely (each at the LAPE position of its cell's centre), then the learned
            separator :attr:`faster_token` — ``(N, sum(frame_token_counts(T, (h', w'), k)), D)``.
        """
        cfg = self.config
        if pixel_values.ndim != 5:
            raise ValueError(f"pixel_values must be (N, T, C, H, W), got shape {tuple(pixel_values.shape)}")
        n, t, c, height, width = pixel_values.shape
        if c != cfg.num_bands:
            raise ValueError(f"pixel_values have {c} bands but the model was built for num_bands={cfg.num_bands}")
        patch = int(cfg.vision_config.patch_size)  # type: ignore[union-attr]
        token_grid = visual_token_grid(height, width, patch, cfg.pool_stride)  # checks divisibility, names the fix
        h, w = height // patch, width // patch
        if patch_features is not None:
            feats, inverse = patch_features, None
        else:
            feats, inverse = self._patch_features(pixel_values.reshape(n * t, c, height, width), h, w)
        d = feats.shape[-1]
        frames = (feats, inverse, n, t)
        slow = self._pooled_frames(frames, (h, w), cfg.pool_stride, frame_times, lape_tables, patch_positions)
        stride = cfg.faster_video_stride
        if not stride:
            return slow.reshape(n, -1, d)
        assert self.faster_token is not None
        fast_pos = None
        if patch_positions is not None:  # the slow grid's (u, v) averaged over each 2 x 2 block of it
            fast_pos = pool_2d(patch_positions.float(), token_grid, 2)
        fast = self._pooled_frames(frames, (h, w), 2 * cfg.pool_stride, frame_times, lape_tables, fast_pos)
        sep = self.faster_token.to(slow.dtype).expand(n, 1, d)
        parts = [torch.cat([slow[:, i] if i % stride == 0 else fast[:, i], sep], dim=1) for i in range(t)]
        return torch.cat(parts, dim=1)

    def _pooled_frames(
        self,
        frames: tuple[torch.Tensor, torch.Tensor | None, int, int],
        grid: tuple[int, int],
        stride: int,
        frame_times: torch.Tensor | None,
        lape_tables: dict[Axis, torch.Tensor] | None,
        patch_positions: torch.Tensor | None,
    ) -> torch.Tensor:
        """Patch features pooled by ``stride`` and LAPE-injected: ``(N, T, h'·w', D)``.

        ``frames``: :meth:`_patch_features`' ``(features, inverse)`` and ``(N, T)``; distinct frames are pooled
        once, then spread to their copies. LAPE positions at ``patch_positions`` when given, else at the centres of
        the ``grid`` ``(h, w)`` of patches pooled by ``stride``; ``frame_times`` default to evenly spaced ``[0, 1]``.
        """
        feats, inverse, n, t = frames
        cfg = self.config
        pooled = pool_2d(feats, grid, stride, cfg.pool_mode)  # type: ignore[arg-type]
        if inverse is not None:
            pooled = pooled.index_select(0, inverse)
        pooled = pooled.reshape(n, t, pooled.shape[1], pooled.shape[2])
        if self.lape is None:
            return pooled
        if frame_times is None:
            frame_times = default_frame_times(t).to(pooled.device).expand(n, t)
        sw, tw = cfg.spatial_injection_scale, cfg.temporal_injection_scale
        if patch_positions is not None:
            return inject_lape_at_positions(self.lape, pooled, patch_positions, frame_times, sw, tw, lape_tables)
        return self.lape.inject(pooled, cell_centres(grid[0], stride, cfg.pool_mode),
                                cell_centres(grid[1], stride, cfg.pool_mode), frame_times, sw, tw, lape_tables)

    def _patch_features(self, frames: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Frames ``(N·T, C, H, W)`` → band adapter → vision encoder → projector, not pooled: ``(features, inverse)``.

        ``features`` ``(N·T, h·w, D)``, or ``(U, h·w, D)`` of the ``U`` distinct frames with ``inverse`` ``(N·T,)``
        the row of each frame (None when every frame is encoded). ``(h, w)`` is the patch grid, ``(H/p, W/p)``.
        """
        if self.share_repeated_frames and not self.training and frames.shape[0] > 1:
            # In eval mode every frame's features depend on that frame alone (the projector's batch norm uses
            # its running statistics), so a frame repeated in the batch is encoded once: `agrivlm infer`'s
            # point prompts ask 36 questions of one chip, whose frames are then identical 36 times (the fields
            # task on the default model, batch 32: 1.5 s of 5.4 s generating was this encoder, once per copy).
            flat = frames.reshape(frames.shape[0], -1)
            unique, inverse = torch.unique(flat, dim=0, return_inverse=True)
            if unique.shape[0] < frames.shape[0]:
                return self._encode_frames(unique.reshape(-1, *frames.shape[1:]), h, w), inverse
        return self._encode_frames(frames, h, w), None

    def _encode_frames(self, frames: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """:meth:`_patch_features` of every frame given (no de-duplication)."""
        cfg = self.config
        vcfg = cfg.vision_config
        height, width = frames.shape[-2], frames.shape[-1]
        x = frames.to(self.band_adapter.weight.dtype)
        x = self.band_adapter(x)
        size = vcfg.image_size  # type: ignore[union-attr]
        interpolate = (height, width) != (size, size)
        want_hidden = cfg.vision_feature_layer != -1
        out = self.vision_tower(pixel_values=x, interpolate_pos_encoding=interpolate, output_hidden_states=want_hidden)
        feats = out.last_hidden_state if not want_hidden else out.hidden_states[cfg.vision_feature_layer]
        if vcfg.model_type == "clip_vision_model":  # type: ignore[union-attr]
            feats = feats[:, 1:]
        if feats.shape[1] != h * w:
            raise ValueError(f"the vision encoder gave {feats.shape[1]} patches for a {h}x{w} grid")
        return self.projector(feats)  # type: ignore[no-any-return]

    def get_visual_features_by_size(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        frame_times: torch.Tensor | None = None,
        lape_tables: dict[Axis, torch.Tensor] | None = None,
        patch_positions: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Visual tokens of items of different sizes (multi-scale), each encoded at its own size.

        Args:
            pixel_values: ``(N, T, C, H_max, W_max)``, item ``i`` in ``[..., :H_i, :W_i]`` (zero-padded).
            image_sizes: ``(N, 2)`` ``(H_i, W_i)`` of each item.
            frame_times: ``(N, T)``.
            lape_tables: as in :meth:`get_visual_features`.
            patch_positions: optional ``(N, P_max, 2)``; item ``i`` uses its first ``P_i = h'_i·w'_i`` rows.

        Returns:
            ``N`` tensors ``(T·h'_i·w'_i, D)``, in item order. Items of one size go through the encoder together;
            with ``config.vision_packing`` every size shares packed sequences (:meth:`encode_packed`).
        """
        n = pixel_values.shape[0]
        if tuple(image_sizes.shape) != (n, 2):
            raise ValueError(f"image_sizes must be ({n}, 2) for {n} items, got {tuple(image_sizes.shape)}")
        sizes = [(int(h), int(w)) for h, w in image_sizes.tolist()]
        for i, (h, w) in enumerate(sizes):
            if not (0 < h <= pixel_values.shape[-2] and 0 < w <= pixel_values.shape[-1]):
                raise ValueError(f"image_sizes[{i}] = {(h, w)} does not fit pixel_values of "
                                 f"{pixel_values.shape[-2]}x{pixel_values.shape[-1]} px")
        patch = int(self.config.vision_config.patch_size)  # type: ignore[union-attr]
        out: list[torch.Tensor | None] = [None] * n
        groups = {size: [i for i, s in enumerate(sizes) if s == size] for size in dict.fromkeys(sizes)}
        packed = None
        if self.config.vision_packing:
            c = pixel_values.shape[2]
            packed = self.encode_packed([pixel_values[idx, :, :, : s[0], : s[1]].reshape(-1, c, s[0], s[1])
                                         for s, idx in groups.items()])
        for k, (size, idx) in enumerate(groups.items()):
            sel = torch.tensor(idx, device=pixel_values.device)
            pos = None
            if patch_positions is not None:
                per_frame = num_visual_tokens(1, size[0], size[1], patch, self.config.pool_stride)
                pos = patch_positions[sel.to(patch_positions.device), :per_frame]
            ft = None if frame_times is None else frame_times[sel.to(frame_times.device)]
            feats = self.get_visual_features(pixel_values[sel, :, :, : size[0], : size[1]], ft, lape_tables, pos,
                                             None if packed is None else packed[k])
            for j, i in enumerate(idx):
                out[i] = feats[j]
        return [f for f in out if f is not None]

    def encode_packed(self, frames: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Frames of several sizes through the vision encoder as packed sequences (NaViT's patch packing).

        Every frame's patches (with its own interpolated position embeddings) are laid end to end in sequences of
        at most ``config.vision_pack_tokens`` patches (a larger frame alone); a block-diagonal attention mask keeps
        each frame's patches attending only to each other, so each frame's features equal its own encoding.

        Args:
            frames: groups ``(F_g, C, H_g, W_g)`` of frames of one size each.

        Returns:
            Per group ``(F_g, (H_g/p)·(W_g/p), D)``: encoded, projected, not pooled (as :meth:`_patch_features`).
        """
        tower: Any = self.vision_tower
        size = int(self.config.vision_config.image_size)  # type: ignore[union-attr]
        seqs: list[torch.Tensor] = []
        for g in frames:
            x = self.band_adapter(g.to(self.band_adapter.weight.dtype))
            emb = tower.embeddings(x, interpolate_pos_encoding=tuple(g.shape[-2:]) != (size, size))
            seqs.extend(emb.unbind(0))
        encoded: list[torch.Tensor] = []
        for pack in _packs([s.shape[0] for s in seqs], int(self.config.vision_pack_tokens)):
            lengths = [seqs[i].shape[0] for i in pack]
            x = torch.cat([seqs[i] for i in pack])[None]
            owner = torch.repeat_interleave(torch.arange(len(pack), device=x.device),
                                            torch.tensor(lengths, device=x.device))
            mask = torch.zeros((1, 1, x.shape[1], x.shape[1]), dtype=x.dtype, device=x.device)
            mask.masked_fill_(owner[:, None] != owner[None, :], torch.finfo(x.dtype).min)
            hidden = tower.post_layernorm(tower.encoder(inputs_embeds=x, attention_mask=mask).last_hidden_state)
            encoded.extend(hidden[0].split(lengths))
        out, k = [], 0
        for g in frames:
            out.append(self.projector(torch.stack(encoded[k:k + g.shape[0]])))
            k += g.shape[0]
        return out

    # -- text path -----------------------------------------------------------------------------------
    def embed_tokens(
        self,
        input_ids: torch.Tensor,
        position_values: torch.Tensor | None = None,
        lape_tables: dict[Axis, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Input embeddings ``(B, L, D)`` of ``input_ids (B, L)``.

        With LAPE: ids ``≥ position_token_offset`` take their LAPE table row; an ``-INPUT``/``-OUTPUT``
        placeholder with a finite ``position_values[b, i]`` takes :func:`token_transfer` of its axis's
        table at that value (without a value it keeps its own text-vocabulary row).
        """
        embed = self.language_model.get_input_embeddings()
        if self.lape is None:
            return embed(input_ids)  # type: ignore[no-any-return]
        cfg = self.config
        offset = self._offset()
        tables = lape_tables if lape_tables is not None else self.lape.input_tables_by_axis()
        is_pos = input_ids >= offset
        emb = embed(input_ids.masked_fill(is_pos, 0))
        rows = self.lape.input_tables(tables).to(emb.dtype)
        pos_emb = rows[(input_ids - offset).clamp(0, rows.shape[0] - 1)]
        emb = torch.where(is_pos.unsqueeze(-1), pos_emb, emb)
        if position_values is None or cfg.lape_input_token_ids is None or cfg.lape_output_token_ids is None:
            return emb
        finite = torch.isfinite(position_values)
        for k, axis in enumerate(AXES):
            mask = ((input_ids == cfg.lape_input_token_ids[k]) | (input_ids == cfg.lape_output_token_ids[k])) & finite
            if bool(mask.any()):
                vals = position_values[mask]
                emb = emb.index_put((mask,), token_transfer(tables[axis], vals).to(emb.dtype))
        return emb

    def _offset(self) -> int:
        offset = self.config.position_token_offset
        if offset is None:
            raise ValueError("config.position_token_offset is not set; build the model with agrivlm.model.builders")
        return offset

    def merge_visual_tokens(self, input_ids: torch.Tensor, embeds: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """Put ``visual (N, S, D)`` into the ``<image>``/``<video>`` positions of ``embeds (B, L, D)``, in order.

        Raises:
            ValueError: the number of placeholder tokens differs from ``N·S``.
        """
        cfg = self.config
        ids = [i for i in (cfg.image_token_id, cfg.video_token_id) if i is not None]
        if not ids:
            raise ValueError(
                "config.image_token_id / video_token_id are not set; build the model with agrivlm.model.builders"
            )
        mask = torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))
        n_tokens, n_visual = int(mask.sum()), visual.shape[0] * visual.shape[1]
        if n_tokens != n_visual:
            raise ValueError(
                f"the prompts hold {n_tokens} <image>/<video> tokens but the {visual.shape[0]} visual items give "
                f"{n_visual} visual tokens ({visual.shape[1]} each); build inputs with AgriVLMProcessor"
            )
        return embeds.masked_scatter(mask.unsqueeze(-1), visual.to(embeds.dtype))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(…, D)`` → ``(…, V)``: the LLM head's text logits, then the LAPE heads' (NTP-reparameterised)."""
        head = self.language_model.get_output_embeddings()
        if self.lape is None:
            return head(hidden)  # type: ignore[no-any-return]
        lape_w = self.lape.output_weights().to(hidden.dtype)
        rows = hidden.shape[:-1].numel()
        if rows > hidden.shape[-1]:
            # many positions (training): one matmul against the stacked weight is cheaper than concatenating logits
            weight = torch.cat([head.weight, lape_w], dim=0)
            bias = None
            if head.bias is not None:
                bias = torch.cat([head.bias, head.bias.new_zeros(lape_w.shape[0])])
            return F.linear(hidden, weight, bias)
        return torch.cat([head(hidden), F.linear(hidden, lape_w)], dim=-1)

    # -- loss ----------------------------------------------------------------------------------------
    def compute_loss(
        self, logits: torch.Tensor, labels: torch.Tensor, position_values: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Weighted next-token CE with soft position targets.

        Args:
            logits: ``(B, L, V)``.
            labels: ``(B, L)`` token ids, ``-100`` where unsupervised (shifted inside: logits at ``i``
                predict ``labels[i + 1]``).
            position_values: ``(B, L)`` continuous normalized value of each position label (NaN where
                none: a bin label then targets its own bin centre).

        Returns:
            ``(loss, text_loss, position_loss)``; the last two are detached means (None when empty).
        """
        cfg = self.config
        tgt = labels[:, 1:]
        valid = tgt != IGNORE_INDEX
        lg = logits[:, :-1][valid].float()  # (K, V)
        t = tgt[valid]
        lse = torch.logsumexp(lg, dim=-1)
        if self.lape is None:
            ce = lse - lg.gather(1, t[:, None]).squeeze(1)
            loss = ce.mean() if ce.numel() else lg.sum() * 0.0
            return loss, ce.detach().mean() if ce.numel() else None, None
        offset = self._offset()
        axis_idx, bin_idx, in_bins = self._label_axes(t, offset)
        is_pos = axis_idx >= 0
        vals = (
            position_values[:, 1:][valid].to(torch.float64)
            if position_values is not None
            else torch.full(t.shape, float("nan"), dtype=torch.float64, device=t.device)
        )
        is_output_token = is_pos & ~in_bins
        if bool((is_output_token & ~torch.isfinite(vals)).any()):
            raise ValueError("an -OUTPUT label has no value in position_values; pass positions= to the processor")
        id_lo, id_hi, r = self._soft_targets(t, offset, axis_idx, bin_idx, vals, lg.dtype)
        target = (1 - r) * lg.gather(1, id_lo[:, None]).squeeze(1) + r * lg.gather(1, id_hi[:, None]).squeeze(1)
        ce = lse - target
        weights = torch.ones_like(ce)
        weights = torch.where(is_pos & (axis_idx < 2), torch.full_like(ce, cfg.spatial_loss_weight), weights)
        weights = torch.where(is_pos & (axis_idx == 2), torch.full_like(ce, cfg.temporal_loss_weight), weights)
        loss = (weights * ce).sum() / weights.sum() if ce.numel() else lg.sum() * 0.0
        text_loss = ce[~is_pos].detach().mean() if bool((~is_pos).any()) else None
        position_loss = ce[is_pos].detach().mean() if bool(is_pos.any()) else None
        return loss, text_loss, position_loss

    def _label_axes(self, t: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per label id of ``t (K,)``: its LAPE axis (0 height, 1 width, 2 temporal, -1 text), bin, and whether a bin.

        An ``-OUTPUT`` placeholder takes its axis (its bin is meaningless: its value comes from ``position_values``).
        """
        vocab = self.vocab
        ns = vocab.num_spatial
        rel = t - offset
        axis_idx = torch.full_like(t, -1)  # 0 height, 1 width, 2 temporal, -1 text
        in_bins = (rel >= 0) & (rel < vocab.num_position_tokens)
        bounds = torch.tensor([ns, 2 * ns], device=t.device)
        axis_idx = torch.where(in_bins, torch.bucketize(rel, bounds, right=True), axis_idx)
        bin_idx = rel - torch.tensor([0, ns, 2 * ns], device=t.device)[axis_idx.clamp(min=0)]
        out_ids = self.config.lape_output_token_ids or []
        for k, oid in enumerate(out_ids):
            axis_idx = torch.where(t == oid, torch.full_like(t, k), axis_idx)
        return axis_idx, bin_idx, in_bins

    def _soft_targets(
        self,
        t: torch.Tensor,
        offset: int,
        axis_idx: torch.Tensor,
        bin_idx: torch.Tensor,
        vals: torch.Tensor,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(id_lo, id_hi, r)``: a position label targets ``(1 − r)·id_lo + r·id_hi``, the bins around its value.

        The value is ``vals`` where finite, else its own bin's centre; a text label keeps its id with ``r = 0``.
        """
        vocab = self.vocab
        ns, nt = vocab.num_spatial, vocab.num_temporal
        is_pos = axis_idx >= 0
        n_axis = torch.tensor([ns, ns, nt], device=t.device)[axis_idx.clamp(min=0)].to(torch.float64)
        centre = (bin_idx.to(torch.float64) + 0.5) / n_axis
        value = torch.where(torch.isfinite(vals), vals, centre)
        c = (value * n_axis - 0.5).clamp(min=0.0)
        c = torch.minimum(c, n_axis - 1)
        lo = c.floor()
        hi = torch.minimum(lo + 1, n_axis - 1)
        r = torch.where(hi > lo, c - lo, torch.zeros_like(c)).to(dtype)
        base = offset + torch.tensor([0, ns, 2 * ns], device=t.device)[axis_idx.clamp(min=0)]
        id_lo = torch.where(is_pos, base + lo.long(), t)
        id_hi = torch.where(is_pos, base + hi.long(), t)
        r = torch.where(is_pos, r, torch.zeros_like(r))
        return id_lo, id_hi, r

    # -- forward -------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        position_values: torch.Tensor | None = None,
        frame_times: torch.Tensor | None = None,
        patch_positions: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> AgriVLMOutput:
        """Run the model.

        Args:
            input_ids: ``(B, L)`` from :class:`~agrivlm.model.processing.AgriVLMProcessor` (placeholders expanded).
            pixel_values: ``(N, T, C, H, W)``, one item per placeholder in reading order across the batch.
            attention_mask: ``(B, L)`` 1 for tokens, 0 for padding.
            position_ids: optional ``(B, L)`` LLM positions.
            cache: KV cache (generation).
            inputs_embeds: ``(B, L, D)`` instead of ``input_ids`` (visual tokens must already be in).
            labels: ``(B, L)`` targets, ``-100`` where unsupervised.
            position_values: ``(B, L)`` continuous values of LAPE tokens (NaN elsewhere).
            frame_times: ``(N, T)`` normalized time of each frame.
            patch_positions: optional ``(N, P, 2)`` chip ``(u, v)`` of each item's visual tokens per frame (AnyRes
                tiles, scales; see :meth:`get_visual_features`); None: each item is the whole chip.
            image_sizes: optional ``(N, 2)`` ``(H, W)`` of each item when items differ in size (zero-padded in
                ``pixel_values``); see :meth:`get_visual_features_by_size`.
            use_cache: return a KV cache.
            logits_to_keep: compute logits only for the last ``k`` positions (0 = all).
            **kwargs: passed to the LLM (e.g. ``output_hidden_states``).
        """
        inputs_embeds = self._inputs_embeds(
            input_ids, inputs_embeds, pixel_values, position_values, frame_times, patch_positions, image_sizes,
            None if labels is None else labels == -100,
        )
        outputs = self.language_model.base_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            use_cache=use_cache, **kwargs,
        )
        hidden = outputs.last_hidden_state
        logits = self.compute_logits(slice_logits_to_keep(hidden, logits_to_keep))
        loss = text_loss = position_loss = None
        if labels is not None:
            if logits.shape[1] != labels.shape[1]:
                raise ValueError("labels need logits at every position; call with logits_to_keep=0")
            loss, text_loss, position_loss = self.compute_loss(logits, labels, position_values)
        return AgriVLMOutput(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions, text_loss=text_loss, position_loss=position_loss,
        )

    def _inputs_embeds(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        position_values: torch.Tensor | None,
        frame_times: torch.Tensor | None,
        patch_positions: torch.Tensor | None,
        image_sizes: torch.Tensor | None,
        prompt_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:meth:`forward`'s LLM input: ``inputs_embeds`` as given, or ``input_ids`` embedded with the visual tokens.

        ``prompt_mask`` ``(B, L)``: the unsupervised tokens (None: every token, as in a prompt being generated from),
        the ones whose points :meth:`add_point_features` may take.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            assert input_ids is not None
            tables = self.lape.input_tables_by_axis() if self.lape is not None else None
            inputs_embeds = self.embed_tokens(input_ids, position_values, tables)
            if pixel_values is not None and image_sizes is not None:
                parts = self.get_visual_features_by_size(
                    pixel_values, image_sizes, frame_times, tables, patch_positions
                )
                inputs_embeds = self._merge_sized_items(input_ids, inputs_embeds, parts)
            elif pixel_values is not None:
                visual = self.get_visual_features(pixel_values, frame_times, tables, patch_positions)
                inputs_embeds = self.merge_visual_tokens(input_ids, inputs_embeds, visual)
                if self.config.point_features and self.lape is not None:
                    grid = visual_token_grid(pixel_values.shape[-2], pixel_values.shape[-1],
                                             int(self.config.vision_config.patch_size),  # type: ignore[union-attr]
                                             self.config.pool_stride)
                    values = position_values if position_values is not None else torch.full(
                        input_ids.shape, float("nan"), device=input_ids.device)
                    inputs_embeds = self.add_point_features(input_ids, inputs_embeds, visual, grid, values,
                                                            prompt_mask)
        elif pixel_values is not None:
            raise ValueError(
                "pixel_values need input_ids to find the placeholders; do not pass inputs_embeds with them"
            )
        return inputs_embeds

    def add_point_features(self, input_ids: torch.Tensor, embeds: torch.Tensor, visual: torch.Tensor,
                           grid: tuple[int, int], position_values: torch.Tensor, prompt_mask: torch.Tensor | None
                           ) -> torch.Tensor:
        """Add to each prompt point's height token the visual feature under the point (``config.point_features``).

        A point is a width token (a bin or ``<WIDTH-INPUT>``) right before a height token, both in ``prompt_mask``
        (the unsupervised tokens; every token when None), its ``(u, v)`` their ``position_values``. Its feature is
        its item's visual tokens ``visual (N, T·h'·w', D)`` averaged over the frames and sampled bilinearly at
        ``(u, v)`` on the ``grid`` ``(h', w')`` of token cells (Ferret's and GPT4RoI's region features, for a
        point). Items are the rows' ``<image>``/``<video>`` runs in order; a row without one is left alone.
        """
        cfg = self.config
        n, s, d = visual.shape
        gh, gw = grid
        if s % (gh * gw):
            raise ValueError(f"{s} visual tokens per item do not make whole {gh}x{gw} frames")
        ns = self.vocab.num_spatial
        rel = input_ids - self._offset()
        in_h, in_w = (cfg.lape_input_token_ids or [-1, -1, -1])[:2]  # AXES: height, width, time
        is_h = ((rel >= 0) & (rel < ns)) | (input_ids == in_h)
        is_w = ((rel >= ns) & (rel < 2 * ns)) | (input_ids == in_w)
        pair = is_w[:, :-1] & is_h[:, 1:]
        if prompt_mask is not None:
            pair &= prompt_mask[:, :-1] & prompt_mask[:, 1:]
        ids = torch.tensor([i for i in (cfg.image_token_id, cfg.video_token_id) if i is not None],
                           device=input_ids.device)
        per_row = torch.isin(input_ids, ids).sum(1) // s  # items per row
        pair &= (per_row > 0)[:, None]
        rows, cols = pair.nonzero(as_tuple=True)
        if rows.numel() == 0:
            return embeds
        # a bin token without a value stands at its bin's centre; a placeholder needs its value
        u = torch.where(torch.isfinite(position_values[rows, cols]), position_values[rows, cols],
                        (rel[rows, cols] - ns + 0.5) / ns)
        v = torch.where(torch.isfinite(position_values[rows, cols + 1]), position_values[rows, cols + 1],
                        (rel[rows, cols + 1] + 0.5) / ns)
        if not bool((u >= 0).all() & (v >= 0).all()):
            raise ValueError("config.point_features: a point's <WIDTH-INPUT>/<HEIGHT-INPUT> has no position value; "
                             "build inputs with AgriVLMProcessor")
        item = (torch.cumsum(per_row, 0) - per_row)[rows]  # the row's first item
        cells = visual.reshape(n, s // (gh * gw), gh, gw, d).mean(1).permute(0, 3, 1, 2)  # (N, D, h', w')
        where = torch.stack([2 * u - 1, 2 * v - 1], dim=-1).to(cells.dtype).view(-1, 1, 1, 2)
        feats = F.grid_sample(cells[item], where, mode="bilinear", padding_mode="border", align_corners=False)
        return embeds.index_put((rows, cols + 1), embeds[rows, cols + 1] + feats.view(-1, d).to(embeds.dtype))

    def _merge_sized_items(self, input_ids: torch.Tensor, embeds: torch.Tensor, parts: list[torch.Tensor]
                           ) -> torch.Tensor:
        """:meth:`merge_visual_tokens` of items of different sizes (``parts``: :meth:`get_visual_features_by_size`)."""
        ids = [i for i in (self.config.image_token_id, self.config.video_token_id) if i is not None]
        n_tokens = int(torch.isin(input_ids, torch.tensor(ids, device=input_ids.device)).sum())
        if n_tokens != sum(part.shape[0] for part in parts):
            raise ValueError(
                f"the prompts hold {n_tokens} <image>/<video> tokens but the {len(parts)} visual items of "
                f"image_sizes give {[part.shape[0] for part in parts]} visual tokens; build inputs with "
                "AgriVLMProcessor.from_chips"
            )
        return self.merge_visual_tokens(input_ids, embeds, torch.cat(parts)[None])

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """HF's preparation, plus: ``frame_times``, ``position_values``, ``patch_positions`` reach only the prefill."""
        first = bool(kwargs.get("is_first_iteration", False))
        inputs: dict[str, Any] = super().prepare_inputs_for_generation(*args, **kwargs)
        if not first and kwargs.get("use_cache", True):
            for key in ("frame_times", "position_values", "patch_positions", "image_sizes"):
                inputs.pop(key, None)
        values, ids = inputs.get("position_values"), inputs.get("input_ids")
        if values is not None and ids is not None and values.shape[1] < ids.shape[1]:
            # without the KV cache every step re-reads the whole sequence: generated tokens carry no value
            pad = values.new_full((values.shape[0], ids.shape[1] - values.shape[1]), float("nan"))
            inputs["position_values"] = torch.cat([values, pad], dim=1)
        return inputs

    # -- decoding ------------------------------------------------------------------------------------
    def decode_positions(
        self,
        sequences: torch.Tensor,
        logits: Sequence[torch.Tensor] | torch.Tensor | None = None,
        window: int | None = None,
        separator_ids: Sequence[int] = (),
    ) -> list[ParsedPositions]:
        """Generated ids → boxes / points / polygons / segments per sample, sub-bin precise from ``logits``.

        Args:
            sequences: ``(B, S)`` the *generated* ids (prompt removed).
            logits: the ``S`` per-step logits ``(B, V)`` of ``generate(..., output_logits=True,
                return_dict_in_generate=True)`` (``out.logits``), or a ``(B, S, V)`` tensor; None → bin centres.
            window: bins on each side of the argmax for the expectation (default ``config.decode_window``).
            separator_ids: the tokenizer's ids of :data:`~agrivlm.lape.tokens.POLYGON_SEP`
                (``tokenizer(POLYGON_SEP, add_special_tokens=False)["input_ids"]``); without them points
                joined by the separator stay points, not polygons.
        """
        window = self.config.decode_window if window is None else window
        stacked = None
        if logits is not None:
            stacked = logits if isinstance(logits, torch.Tensor) else torch.stack(list(logits), dim=1)
            stacked = stacked.detach().float().cpu()
        seqs = sequences.detach().cpu().numpy()
        out = []
        for b in range(seqs.shape[0]):
            lg = None if stacked is None else np.asarray(stacked[b].numpy())
            out.append(parse_token_ids(seqs[b], self._offset(), self.vocab, lg, window, separator_ids))
        return out

    def axis_of_token(self, token_id: int) -> tuple[Axis, int] | None:
        """``(axis, bin)`` of a position-token id, or None for any other id."""
        rel = token_id - self._offset()
        if 0 <= rel < self.vocab.num_position_tokens:
            return self.vocab.locate(rel)
        return None


# LLaVA-family models load with AutoModelForImageTextToText; AutoModelForCausalLM too, as for Gemma 3 (a prompt
# without pixel_values is plain text generation). No AutoModel: there is no head-less base model class to give.
AutoModelForImageTextToText.register(AgriVLMConfig, AgriVLMForConditionalGeneration)
AutoModelForCausalLM.register(AgriVLMConfig, AgriVLMForConditionalGeneration)
