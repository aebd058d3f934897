"""Chips/frames + prompts → model inputs, in the manner of a HF ``ProcessorMixin``.

One visual item per ``<image>`` / ``<video>`` placeholder, in reading order across the batch: an image
is one frame ``(C, H, W)``, a frame sequence ``(T, C, H, W)``. The processor stacks them into
``pixel_values (N, T, C, H, W)`` (NaN = no data → 0), tokenizes the prompts and expands each placeholder
to exactly :func:`num_visual_tokens` copies of itself — the count the model's vision path produces.

The visual-token count lives in ONE function, :func:`visual_token_grid`, used by this processor and by
the model (and by whoever later adds frame sampling or AnyRes tiles): the encoder makes an
``(H/p, W/p)`` patch grid per frame and :func:`agrivlm.pipeline.pooling.pooled_grid` shrinks it by the
pooling stride.

Band normalisation is not done here (``agrivlm/pipeline/bands.py``): inputs are float arrays already
scaled as the model expects.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch
from transformers import BatchFeature, PreTrainedTokenizerBase, ProcessorMixin

from agrivlm.lape.embedding import default_frame_times
from agrivlm.lape.tokens import LapeVocab
from agrivlm.pipeline.pooling import pooled_grid

if TYPE_CHECKING:  # the model package imports this module; import its tokenizer lazily
    from agrivlm.model.tokenizer import TokenLayout

#: Label value ignored by the loss (HF convention).
IGNORE_INDEX = -100


def visual_token_grid(height: int, width: int, patch_size: int, pool_stride: int) -> tuple[int, int]:
    """The grid ``(h', w')`` of visual tokens of one ``height × width`` px frame: the single source of the count.

    The vision encoder cuts the frame into ``(height / patch_size, width / patch_size)`` patches (both
    must divide exactly, so that the patch grid covers the frame and LAPE's normalized positions mean
    the same on the grid as on the chip); pooling with ``pool_stride`` gives
    ``pooled_grid(height / p, width / p, stride)`` = ``ceil`` of each side over the stride.

    Raises:
        ValueError: a side that is not a multiple of ``patch_size``, naming what to change.
    """
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"frames of {height}x{width} px are not a multiple of the vision encoder's patch size {patch_size}; "
            f"use a chip size that is (e.g. {max(patch_size, height - height % patch_size)}) or resize the frames"
        )
    return pooled_grid(height // patch_size, width // patch_size, pool_stride)


def num_visual_tokens(num_frames: int, height: int, width: int, patch_size: int, pool_stride: int) -> int:
    """Visual tokens of one item of ``num_frames`` frames of ``height × width`` px: ``T · h' · w'``."""
    h, w = visual_token_grid(height, width, patch_size, pool_stride)
    return num_frames * h * w


def _as_item(x: Any, index: int) -> npt.NDArray[np.float32]:
    arr = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise ValueError(f"visual item {index}: expected (C, H, W) or (T, C, H, W), got shape {arr.shape}")
    return arr


class AgriVLMProcessor(ProcessorMixin):
    """Tokenizer + visual-token expansion + pixel stacking for :class:`~agrivlm.model.AgriVLMForConditionalGeneration`.

    Saved and loaded with ``save_pretrained`` / ``from_pretrained`` (``processor_config.json`` plus the
    tokenizer files).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | None = None,
        patch_size: int = 4,
        pool_stride: int = 2,
        num_bands: int = 1,
        num_spatial_tokens: int = 150,
        num_temporal_tokens: int = 50,
        chat_template: str | None = None,
    ) -> None:
        #: Vision encoder patch size in px.
        self.patch_size = patch_size
        #: Spatial pooling stride on the patch grid.
        self.pool_stride = pool_stride
        #: Channels each frame must have.
        self.num_bands = num_bands
        self.num_spatial_tokens = num_spatial_tokens
        self.num_temporal_tokens = num_temporal_tokens
        super().__init__(tokenizer, chat_template=chat_template)

    @property
    def vocab(self) -> LapeVocab:
        """The LAPE vocabulary of this processor."""
        return LapeVocab(self.num_spatial_tokens, self.num_temporal_tokens)

    @property
    def layout(self) -> TokenLayout:
        """Ids of the placeholders, control and position tokens in the tokenizer."""
        from agrivlm.model.tokenizer import token_layout

        return token_layout(self.tokenizer, self.vocab)

    def _lape_token_mask(self, ids: npt.NDArray[np.int64], layout: TokenLayout) -> npt.NDArray[np.bool_]:
        controls = np.array(layout.input_token_ids + layout.output_token_ids)
        return (ids >= layout.position_token_offset) | np.isin(ids, controls)

    def __call__(  # type: ignore[override]
        self,
        text: str | Sequence[str],
        images: Any = None,
        answers: str | Sequence[str] | None = None,
        frame_times: Sequence[Sequence[float] | None] | None = None,
        positions: Sequence[Sequence[float] | None] | None = None,
        padding_side: str = "right",
        add_eos: bool = True,
        return_tensors: str = "pt",
    ) -> BatchFeature:
        """Build a batch.

        Args:
            text: prompts, one per sample, with ``<image>`` / ``<video>`` placeholders.
            images: one visual item per placeholder in reading order across the batch: a list of arrays
                ``(C, H, W)`` / ``(T, C, H, W)``, or one array ``(N, T, C, H, W)``. All items share
                ``T, C, H, W``. Floats; NaN (no data) becomes 0.
            answers: optional answers, one per sample, appended to the prompts (plus eos when
                ``add_eos``); only their tokens are supervised in ``labels``.
            frame_times: optional normalized time ``t`` of each frame, one sequence (or None) per item;
                default :func:`~agrivlm.lape.embedding.default_frame_times`.
            positions: optional continuous values of the LAPE tokens (position bins and ``-INPUT`` /
                ``-OUTPUT`` placeholders) of each sample, in text order (prompt then answer); they become
                ``position_values`` for sub-bin soft targets and interpolated input embeddings.
            padding_side: ``"right"`` for training, ``"left"`` for batched generation.
            add_eos: end each answer with the eos token.
            return_tensors: only ``"pt"``.

        Returns:
            ``BatchFeature`` with ``input_ids (B, L)``, ``attention_mask (B, L)``, and when given
            ``pixel_values (N, T, C, H, W)`` float32 and ``frame_times (N, T)``, ``labels (B, L)``
            (``-100`` off the answers), ``position_values (B, L)`` (NaN off the LAPE tokens).
        """
        if return_tensors != "pt":
            raise ValueError(f"return_tensors must be 'pt', got {return_tensors!r}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        texts = [text] if isinstance(text, str) else list(text)
        answer_list: list[str] | None = None
        if answers is not None:
            answer_list = [answers] if isinstance(answers, str) else list(answers)
            if len(answer_list) != len(texts):
                raise ValueError(f"{len(answer_list)} answers for {len(texts)} prompts")
        layout = self.layout
        placeholder_ids = {layout.image_token_id, layout.video_token_id}
        tok = self.tokenizer

        prompt_ids = [list(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
        n_items = sum(sum(i in placeholder_ids for i in ids) for ids in prompt_ids)
        items = self._stack_items(images, n_items)
        data: dict[str, Any] = {}
        per_item = 0
        if items is not None:
            n, t, c, h, w = items.shape
            per_item = num_visual_tokens(t, h, w, self.patch_size, self.pool_stride)
            data["pixel_values"] = torch.from_numpy(items)
            data["frame_times"] = self._frame_times(frame_times, n, t)

        # expand placeholders, append answers, build labels
        sequences: list[list[int]] = []
        labels: list[list[int]] = []
        item = 0
        for b, ids in enumerate(prompt_ids):
            seq: list[int] = []
            for i in ids:
                if i in placeholder_ids:
                    if i == layout.image_token_id and items is not None and items.shape[1] != 1:
                        raise ValueError(f"sample {b}: <image> stands for one frame but item {item} has "
                                         f"{items.shape[1]} frames; use <video>")
                    seq.extend([i] * per_item)
                    item += 1
                else:
                    seq.append(i)
            lab = [IGNORE_INDEX] * len(seq)
            if answer_list is not None:
                ans = list(tok(answer_list[b], add_special_tokens=False)["input_ids"])
                if any(i in placeholder_ids for i in ans):
                    raise ValueError(f"sample {b}: an answer cannot hold <image>/<video>")
                if add_eos:
                    ans.append(tok.eos_token_id)
                seq.extend(ans)
                lab.extend(ans)
            sequences.append(seq)
            labels.append(lab)

        # position values, per sample, in text order
        pos_rows: list[npt.NDArray[np.float32]] = []
        if positions is not None:
            if len(positions) != len(texts):
                raise ValueError(f"{len(positions)} position lists for {len(texts)} samples")
            for b, (seq, vals) in enumerate(zip(sequences, positions, strict=True)):
                arr = np.asarray(seq, dtype=np.int64)
                where = np.flatnonzero(self._lape_token_mask(arr, layout))
                row = np.full(len(seq), np.nan, dtype=np.float32)
                if vals is not None:
                    if len(vals) != len(where):
                        raise ValueError(f"sample {b}: {len(vals)} position values for {len(where)} LAPE tokens "
                                         "(position bins and -INPUT/-OUTPUT placeholders, prompt then answer)")
                    row[where] = np.asarray(vals, dtype=np.float32)
                pos_rows.append(row)

        # pad
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        length = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
        attention = torch.zeros((len(sequences), length), dtype=torch.long)
        label_t = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
        pos_t = torch.full((len(sequences), length), float("nan"))
        for b, seq in enumerate(sequences):
            sl = slice(length - len(seq), length) if padding_side == "left" else slice(0, len(seq))
            input_ids[b, sl] = torch.tensor(seq, dtype=torch.long)
            attention[b, sl] = 1
            label_t[b, sl] = torch.tensor(labels[b], dtype=torch.long)
            if pos_rows:
                pos_t[b, sl] = torch.from_numpy(pos_rows[b])
        data["input_ids"] = input_ids
        data["attention_mask"] = attention
        if answer_list is not None:
            data["labels"] = label_t
        if pos_rows:
            data["position_values"] = pos_t
        return BatchFeature(data=data)

    def _stack_items(self, images: Any, n_items: int) -> npt.NDArray[np.float32] | None:
        if images is None:
            if n_items:
                raise ValueError(f"the prompts hold {n_items} <image>/<video> placeholders but no images were given")
            return None
        if isinstance(images, (np.ndarray, torch.Tensor)) and np.ndim(images) == 5:
            raw = [images[i] for i in range(len(images))]
        else:
            raw = list(images)
        if len(raw) != n_items:
            raise ValueError(
                f"{len(raw)} visual items for {n_items} <image>/<video> placeholders; give one per placeholder"
            )
        arrs = [_as_item(x, i) for i, x in enumerate(raw)]
        shape = arrs[0].shape
        for i, a in enumerate(arrs):
            if a.shape != shape:
                raise ValueError(f"visual item {i} has shape {a.shape} (T, C, H, W) but item 0 has {shape}; "
                                 "items of one batch must share frames, bands and size")
        if shape[1] != self.num_bands:
            raise ValueError(f"visual items have {shape[1]} bands but the model takes num_bands={self.num_bands}")
        visual_token_grid(shape[2], shape[3], self.patch_size, self.pool_stride)  # checks the size
        stacked = np.stack(arrs)
        return np.nan_to_num(stacked, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)

    @staticmethod
    def _frame_times(frame_times: Sequence[Sequence[float] | None] | None, n: int, t: int) -> torch.Tensor:
        out = default_frame_times(t).repeat(n, 1)
        if frame_times is None:
            return out
        if len(frame_times) != n:
            raise ValueError(f"{len(frame_times)} frame_times for {n} visual items")
        for i, ft in enumerate(frame_times):
            if ft is None:
                continue
            row = torch.as_tensor(np.asarray(ft, dtype=np.float32))
            if row.shape != (t,):
                raise ValueError(f"frame_times[{i}] has {row.numel()} values for {t} frames")
            if not bool(torch.isfinite(row).all()) or bool((row < 0).any()) or bool((row > 1).any()):
                raise ValueError(f"frame_times[{i}] must be normalized times in [0, 1], got {row.tolist()}")
            out[i] = row
        return out

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        """``tokenizer.batch_decode``; keep ``skip_special_tokens=False`` to see position tokens."""
        return self.tokenizer.batch_decode(*args, **kwargs)  # type: ignore[no-any-return]

    def decode(self, *args: Any, **kwargs: Any) -> str:
        """``tokenizer.decode``; keep ``skip_special_tokens=False`` to see position tokens."""
        return self.tokenizer.decode(*args, **kwargs)  # type: ignore[no-any-return]


def _register_auto_processor() -> None:
    """Let ``AutoProcessor.from_pretrained`` find this processor for agrivlm folders."""
    from transformers import AutoProcessor

    from agrivlm.model.configuration import AgriVLMConfig

    AutoProcessor.register(AgriVLMConfig, AgriVLMProcessor)
