"""Chips/frames + prompts → model inputs, in the manner of a HF ``ProcessorMixin``.

One visual item per ``<image>`` / ``<video>`` placeholder, in reading order across the batch: an image
is one frame ``(C, H, W)``, a frame sequence ``(T, C, H, W)``. The processor stacks them into
``pixel_values (N, T, C, H, W)`` (NaN = no data → 0), tokenizes the prompts and expands each placeholder
to exactly :func:`num_visual_tokens` copies of itself — the count the model's vision path produces.

The visual-token count lives in ONE function, :func:`visual_token_grid`, used by this processor and by
the model (and by whoever later adds frame sampling or AnyRes tiles): the encoder makes an
``(H/p, W/p)`` patch grid per frame and :func:`agrivlm.pipeline.pooling.pooled_grid` shrinks it by the
pooling stride.

Two entries:

* ``processor(text, images=...)``: float arrays already scaled as the model expects, one visual item per
  placeholder, all of one size.
* :meth:`AgriVLMProcessor.from_chips`: :class:`~agrivlm.geo.chips.Chip` objects straight from a stack. Per
  chip it samples frames (:func:`~agrivlm.pipeline.frames.sample_frames`, dates kept), scales the bands
  (:func:`~agrivlm.pipeline.bands.prepare_bands`), optionally cuts AnyRes tiles plus a thumbnail
  (:func:`~agrivlm.pipeline.anyres.anyres_tiles`) or resizes to several scales, fills no data, and returns
  the batch with the geography of every visual item (:class:`ChipBatch`). A chip's placeholder then
  stands for *all* its visual items (thumbnail and tiles, or every scale), each expanded to its own
  :func:`num_visual_tokens`; ``patch_positions`` gives the model the chip-normalized ``(u, v)`` of every
  visual token, so a tile's tokens carry the LAPE ``HEIGHT``/``WIDTH`` embeddings of where they lie on
  the chip (:func:`~agrivlm.pipeline.anyres.token_positions`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch
from affine import Affine
from rasterio.windows import Window
from transformers import BatchFeature, PreTrainedTokenizerBase, ProcessorMixin

from agrivlm.config import parse_config
from agrivlm.errors import ConfigError, PipelineError
from agrivlm.geo.chips import Chip
from agrivlm.geo.coords import FloatArray, GeoGrid
from agrivlm.lape.embedding import default_frame_times
from agrivlm.lape.tokens import DEFAULT_NUM_SPATIAL, DEFAULT_NUM_TEMPORAL, LapeVocab
from agrivlm.model.configuration import AgriVLMConfig
from agrivlm.model.tokenizer import TokenLayout, token_layout
from agrivlm.pipeline.anyres import anyres_tiles, token_positions
from agrivlm.pipeline.bands import BandStats, fill_nodata, prepare_bands
from agrivlm.pipeline.conversation import CHAT_TEMPLATE, Answer, answer_end_id, answer_segments
from agrivlm.pipeline.frames import (
    Frames,
    FrameSamplingConfig,
    frame_time_positions,
    rescale_grid,
    resize_frames,
    sample_frames,
)
from agrivlm.pipeline.inputs import (
    IGNORE_INDEX,
    PIXEL_CRS,
    AnyResConfig,
    BandConfig,
    ChipBatch,
    ChipGeography,
    ChipInputConfig,
    VisualItem,
    chip_config_with_inputs,
    frame_token_counts,
    navit_size,
    num_visual_tokens,
    visual_token_centres,
    visual_token_grid,
)
from agrivlm.pipeline.pooling import POOL_MODES, PoolMode
from agrivlm.remote_code import PROCESSOR_AUTO_MAP, write_remote_code


def _as_item(x: Any, index: int) -> npt.NDArray[np.float32]:
    arr = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise ValueError(f"visual item {index}: expected (C, H, W) or (T, C, H, W), got shape {arr.shape}")
    return arr


def _visual_arguments(
    images: Any,
    videos: Any,
    audio: Any,
    frame_times: Sequence[Sequence[float] | None] | None,
    video_dates: Sequence[Sequence[Any]] | None,
) -> tuple[Any, Sequence[Sequence[float] | None] | None]:
    """:meth:`AgriVLMProcessor.__call__`'s visual items in reading order and their frame times, however given.

    ``images`` or ``videos``, flat or grouped per sample; ``frame_times`` or ``video_dates``; no ``audio``.
    """
    if audio is not None:
        raise ValueError("agrivlm models take no audio")
    if videos is not None:
        if images is not None:
            raise ValueError("give the visual items as images= or as videos=, not both")
        images = videos
    if isinstance(images, (list, tuple)) and images and all(isinstance(x, (list, tuple)) for x in images):
        images = [item for group in images for item in group]  # grouped per sample → reading order
    if video_dates is not None:
        if frame_times is not None:
            raise ValueError("give frame_times= or video_dates=, not both")
        frame_times = [frame_time_positions(d, np.arange(len(d)))[1].tolist() for d in video_dates]
    return images, frame_times


def _json_copy(data: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A plain-JSON deep copy (tuples become lists, as they are once saved), or None."""
    return None if data is None else dict(json.loads(json.dumps(dict(data))))


@dataclass(frozen=True)
class _PreparedChip:
    pixels: list[torch.Tensor]  # per item (T, C, h, w), filled
    positions: list[FloatArray]  # per item (h'·w', 2) chip (u, v)
    items: list[VisualItem]
    frames: Frames
    grid_shape: tuple[int, int] | None
    stats: BandStats | None


class AgriVLMProcessor(ProcessorMixin):
    """Tokenizer + visual-token expansion + pixel stacking for :class:`~agrivlm.model.AgriVLMForConditionalGeneration`.

    Saved and loaded with ``save_pretrained`` / ``from_pretrained`` (``processor_config.json``, the tokenizer
    files and ``chat_template.jinja``), including ``pool_mode``, the chip settings (``chip_config``) and what a
    trained checkpoint needs to be used: its input settings (``inputs``, the source of ``agrivlm_inputs.yaml``)
    and the band statistics of its training data (``band_stats``), so no save/load/save round trip loses them.
    ``processor_config.json`` carries an ``auto_map`` and the folder a re-export module
    (:mod:`agrivlm.remote_code`): ``AutoProcessor.from_pretrained(path, trust_remote_code=True)`` works without
    ``import agrivlm``.

    The chat template (:data:`~agrivlm.pipeline.conversation.CHAT_TEMPLATE`, also set on the tokenizer) writes
    the conversation format of training: ``processor.apply_chat_template(messages, add_generation_prompt=True)``.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | None = None,
        patch_size: int = 4,
        pool_stride: int = 2,
        num_bands: int = 1,
        num_spatial_tokens: int = DEFAULT_NUM_SPATIAL,
        num_temporal_tokens: int = DEFAULT_NUM_TEMPORAL,
        chat_template: str | None = None,
        pool_mode: str = "average",
        chip_config: dict[str, Any] | ChipInputConfig | None = None,
        inputs: dict[str, Any] | None = None,
        band_stats: dict[str, Any] | None = None,
        faster_video_stride: int = 0,
    ) -> None:
        #: Vision encoder patch size in px.
        self.patch_size = patch_size
        #: Spatial pooling stride on the patch grid.
        self.pool_stride = pool_stride
        #: Channels each frame must have.
        self.num_bands = num_bands
        self.num_spatial_tokens = num_spatial_tokens
        self.num_temporal_tokens = num_temporal_tokens
        if pool_mode not in POOL_MODES:
            raise ValueError(f"pool_mode must be one of {POOL_MODES} (the model's config.pool_mode), got {pool_mode!r}")
        #: The model's pooling mode (where the pooled cells' centres are, for ``patch_positions``).
        self.pool_mode = pool_mode
        if faster_video_stride < 0:
            raise ValueError(f"faster_video_stride must be ≥ 0 (the model's config.faster_video_stride), got "
                             f"{faster_video_stride}")
        #: The model's faster-video stride (0 off): how many tokens each frame gets (:func:`frame_token_counts`).
        self.faster_video_stride = faster_video_stride
        cfg = chip_config if isinstance(chip_config, ChipInputConfig) else parse_config(
            ChipInputConfig, chip_config or {}, "processor chip_config")
        #: Default settings of :meth:`from_chips`, JSON-ready (saved in ``processor_config.json``); with
        #: :attr:`inputs`, its ``sampling`` and ``bands`` are theirs (:func:`chip_config_with_inputs`).
        self.chip_config: dict[str, Any] = cfg.model_dump(mode="json")
        #: The checkpoint's input settings, :class:`agrivlm.pipeline.inputs.InputConfig` as JSON (chip grid, frames,
        #: bands, prompts), or None; ``agrivlm infer`` reads them when the folder has no ``agrivlm_inputs.yaml``.
        self.inputs: dict[str, Any] | None = None
        #: :meth:`BandStats.to_dict` of the training data's band normalisation (carried from stage to stage), or None.
        self.band_stats: dict[str, Any] | None = None
        self.set_checkpoint_inputs(inputs, band_stats)
        if inputs is not None and chip_config is not None and self.chip_settings != cfg:
            raise ConfigError(
                "processor chip_config: its sampling/bands disagree with inputs.frames/inputs.bands (the "
                "checkpoint's input settings, which they follow); remove chip_config.sampling and chip_config.bands "
                "or make them agree"
            )
        super().__init__(tokenizer, chat_template=chat_template if chat_template is not None else CHAT_TEMPLATE)
        if tokenizer is not None:  # tokenizer.apply_chat_template gives the same strings
            tokenizer.chat_template = self.chat_template
        #: The ``auto_map`` of ``processor_config.json`` (:data:`agrivlm.remote_code.PROCESSOR_AUTO_MAP`).
        self.auto_map = dict(PROCESSOR_AUTO_MAP)

    def set_checkpoint_inputs(
        self, inputs: Mapping[str, Any] | None, band_stats: BandStats | Mapping[str, Any] | None
    ) -> None:
        """Carry a trained checkpoint's input settings and band statistics (saved in ``processor_config.json``).

        Args:
            inputs: :class:`agrivlm.pipeline.inputs.InputConfig` as JSON (``model_dump(mode="json")``), or None; its
                ``frames`` and ``bands`` become :attr:`chip_config`'s ``sampling`` and ``bands``.
            band_stats: the training data's band normalisation, or None.

        Raises:
            ConfigError: band statistics without ``low``/``high`` or with values that are not numbers, or
                ``inputs`` whose frames or bands are not valid settings.
        """
        stats = band_stats.to_dict() if isinstance(band_stats, BandStats) else _json_copy(band_stats)
        if stats is not None:
            try:
                BandStats.from_dict(stats)
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                raise ConfigError(f"processor band_stats: {stats} are not band statistics ({exc!r}); give "
                                  "{'low': [...], 'high': [...], 'percentiles': [lo, hi]} (BandStats.to_dict)") from exc
        if inputs is not None:
            self.chip_config = chip_config_with_inputs(self.chip_settings, inputs).model_dump(mode="json")
        self.inputs = _json_copy(inputs)
        self.band_stats = stats

    def save_pretrained(self, save_directory: str | os.PathLike[str], push_to_hub: bool = False, **kwargs: Any) -> Any:
        """Save as transformers does, plus the re-export module the ``auto_map`` names.

        transformers writes ``processor_config.json`` (with the ``auto_map``), the tokenizer files and
        ``chat_template.jinja``.
        """
        out = super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        write_remote_code(save_directory)
        return out

    @classmethod
    def register_for_auto_class(cls, auto_class: Any = "AutoProcessor") -> None:
        """Nothing to do: :attr:`auto_map` names the installed class.

        transformers' version would make every later ``save_pretrained`` copy this module into the folder.
        """

    @property
    def chip_settings(self) -> ChipInputConfig:
        """:attr:`chip_config` as a :class:`ChipInputConfig`."""
        return ChipInputConfig.model_validate(self.chip_config)

    @property
    def vocab(self) -> LapeVocab:
        """The LAPE vocabulary of this processor."""
        return LapeVocab(self.num_spatial_tokens, self.num_temporal_tokens)

    @property
    def layout(self) -> TokenLayout:
        """Ids of the placeholders, control and position tokens in the tokenizer."""
        return token_layout(self.tokenizer, self.vocab)

    def _lape_token_mask(self, ids: npt.NDArray[np.int64], layout: TokenLayout) -> npt.NDArray[np.bool_]:
        controls = np.array(layout.input_token_ids + layout.output_token_ids)
        return (ids >= layout.position_token_offset) | np.isin(ids, controls)

    def __call__(  # type: ignore[override]
        self,
        text: str | Sequence[str],
        images: Any = None,
        answers: str | Sequence[Answer] | None = None,
        frame_times: Sequence[Sequence[float] | None] | None = None,
        positions: Sequence[Sequence[float] | None] | None = None,
        padding_side: str = "right",
        add_eos: bool = True,
        return_tensors: str | None = "pt",
        videos: Any = None,
        video_dates: Sequence[Sequence[Any]] | None = None,
        audio: Any = None,
    ) -> BatchFeature:
        """Build a batch.

        Args:
            text: prompts, one per sample, with ``<image>`` / ``<video>`` placeholders.
            images: one visual item per placeholder in reading order across the batch: a list of arrays
                ``(C, H, W)`` / ``(T, C, H, W)``, or one array ``(N, T, C, H, W)``. All items share
                ``T, C, H, W``. Floats; NaN (no data) becomes 0.
            answers: optional answers, one per sample, appended to the prompts (plus eos when
                ``add_eos``); only their tokens are supervised in ``labels``. A sample's answer may be a
                multi-turn conversation's segments (:data:`~agrivlm.pipeline.conversation.Answer`:
                ``[answer_1, continuation_2, answer_2, …]``): every answer supervised and ended by eos, the
                continuations (the next user turns) appended unsupervised.
            frame_times: optional normalized time ``t`` of each frame, one sequence (or None) per item;
                default :func:`~agrivlm.lape.embedding.default_frame_times`.
            positions: optional continuous values of the LAPE tokens (position bins and ``-INPUT`` /
                ``-OUTPUT`` placeholders) of each sample, in text order (prompt then answer); they become
                ``position_values`` for sub-bin soft targets and interpolated input embeddings.
            padding_side: ``"right"`` for training, ``"left"`` for batched generation.
            add_eos: end each answer with the eos token.
            return_tensors: ``"pt"`` (torch tensors) or ``"np"`` (numpy arrays).
            videos: the visual items as videos (LLaVA-NeXT-Video's argument): each ``(T, C, H, W)``, the same
                as ``images``; give one of the two.
            video_dates: optional acquisition dates of each item's frames (anything ``numpy.datetime64``
                reads, ``(T,)`` per item, ascending): their ``frame_times`` on the calendar years they fall in,
                the rule of training and ``agrivlm infer`` (:func:`~agrivlm.pipeline.frames.frame_time_positions`);
                not together with ``frame_times``.
            audio: not taken (``apply_chat_template(tokenize=True)`` passes it; anything but None is an error).

        ``images`` and ``videos`` may also come grouped per sample (a list of per-sample lists, as
        ``apply_chat_template(..., tokenize=True)`` passes the videos of the messages): they are read in order.

        Returns:
            ``BatchFeature`` with ``input_ids (B, L)``, ``attention_mask (B, L)``, and when given
            ``pixel_values (N, T, C, H, W)`` float32 and ``frame_times (N, T)``, ``labels (B, L)``
            (``-100`` off the answers), ``position_values (B, L)`` (NaN off the LAPE tokens).
        """
        images, frame_times = _visual_arguments(images, videos, audio, frame_times, video_dates)
        return_tensors = return_tensors or "pt"
        texts, answer_list, prompt_ids = self._prepare_text(text, answers, padding_side, return_tensors)
        data, expand, frames = self._pixel_data(images, frame_times, prompt_ids)
        data.update(self._encode_text(texts, prompt_ids, answer_list, positions, expand, frames, "item",
                                      padding_side, add_eos))
        if return_tensors == "np":
            data = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in data.items()}
        return BatchFeature(data=data)

    def _pixel_data(
        self, images: Any, frame_times: Sequence[Sequence[float] | None] | None, prompt_ids: list[list[int]]
    ) -> tuple[dict[str, Any], list[int], list[int]]:
        """:meth:`__call__`'s ``pixel_values`` and ``frame_times`` (none without images), and the expansion.

        Per placeholder its token count and its frame count (what :meth:`_encode_text` expands it by).
        """
        layout = self.layout
        placeholder_ids = {layout.image_token_id, layout.video_token_id}
        n_items = sum(sum(i in placeholder_ids for i in ids) for ids in prompt_ids)
        items = self._stack_items(images, n_items)
        data: dict[str, Any] = {}
        expand: list[int] = []
        frames: list[int] = []
        if items is not None:
            n, t, c, h, w = items.shape
            per_item = num_visual_tokens(t, h, w, self.patch_size, self.pool_stride, self.faster_video_stride)
            data["pixel_values"] = torch.from_numpy(items)
            data["frame_times"] = self._frame_times(frame_times, n, t)
            expand, frames = [per_item] * n, [t] * n
        return data, expand, frames

    # -- text ------------------------------------------------------------------------------------------
    def _prepare_text(
        self, text: str | Sequence[str], answers: str | Sequence[Answer] | None, padding_side: str, return_tensors: str
    ) -> tuple[list[str], list[Answer] | None, list[list[int]]]:
        if return_tensors not in ("pt", "np"):
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        texts = [text] if isinstance(text, str) else list(text)
        answer_list: list[Answer] | None = None
        if answers is not None:
            answer_list = [answers] if isinstance(answers, str) else list(answers)
            if len(answer_list) != len(texts):
                raise ValueError(f"{len(answer_list)} answers for {len(texts)} prompts")
        prompt_ids = [list(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        return texts, answer_list, prompt_ids

    def _encode_text(
        self,
        texts: list[str],
        prompt_ids: list[list[int]],
        answer_list: list[Answer] | None,
        positions: Sequence[Sequence[float] | None] | None,
        expand: list[int],
        frames: list[int],
        noun: str,
        padding_side: str,
        add_eos: bool,
    ) -> dict[str, torch.Tensor]:
        """Expand placeholder ``k`` (reading order) to ``expand[k]`` tokens, append answers, labels, values, pad."""
        layout = self.layout
        sequences, labels = self._expand_and_answer(prompt_ids, answer_list, expand, frames, noun, add_eos, layout)
        pos_rows = self._position_rows(texts, sequences, positions, layout)
        return self._pad(sequences, labels, pos_rows, answer_list is not None, padding_side)

    def _expand_and_answer(
        self,
        prompt_ids: list[list[int]],
        answer_list: list[Answer] | None,
        expand: list[int],
        frames: list[int],
        noun: str,
        add_eos: bool,
        layout: TokenLayout,
    ) -> tuple[list[list[int]], list[list[int]]]:
        """Per sample its ids (placeholders expanded, answers appended) and labels (``-100`` off the answers)."""
        placeholder_ids = {layout.image_token_id, layout.video_token_id}
        tok = self.tokenizer
        sequences: list[list[int]] = []
        labels: list[list[int]] = []
        k = 0
        for b, ids in enumerate(prompt_ids):
            seq: list[int] = []
            for i in ids:
                if i in placeholder_ids:
                    if i == layout.image_token_id and frames[k] != 1:
                        raise ValueError(f"sample {b}: <image> stands for one frame but {noun} {k} has "
                                         f"{frames[k]} frames; use <video>")
                    seq.extend([i] * expand[k])
                    k += 1
                else:
                    seq.append(i)
            lab = [IGNORE_INDEX] * len(seq)
            if answer_list is not None:
                for text, supervised in answer_segments(answer_list[b]):
                    ans = list(tok(text, add_special_tokens=False)["input_ids"])
                    if any(i in placeholder_ids for i in ans):
                        raise ValueError(f"sample {b}: an answer cannot hold <image>/<video>")
                    if supervised and add_eos:
                        ans.append(answer_end_id(tok))  # the token generation stops on
                    seq.extend(ans)
                    lab.extend(ans if supervised else [IGNORE_INDEX] * len(ans))
            sequences.append(seq)
            labels.append(lab)
        return sequences, labels

    def _position_rows(
        self,
        texts: list[str],
        sequences: list[list[int]],
        positions: Sequence[Sequence[float] | None] | None,
        layout: TokenLayout,
    ) -> list[npt.NDArray[np.float32]]:
        """Per sample the values of its LAPE tokens at their places, NaN elsewhere (none without ``positions``)."""
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
        return pos_rows

    def _pad(
        self,
        sequences: list[list[int]],
        labels: list[list[int]],
        pos_rows: list[npt.NDArray[np.float32]],
        with_labels: bool,
        padding_side: str,
    ) -> dict[str, torch.Tensor]:
        """The padded ``input_ids``, ``attention_mask`` and, when given, ``labels`` and ``position_values``."""
        # pad
        tok = self.tokenizer
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
        data: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention}
        if with_labels:
            data["labels"] = label_t
        if pos_rows:
            data["position_values"] = pos_t
        return data

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

    # -- chips -----------------------------------------------------------------------------------------
    def from_chips(
        self, chips: Chip | Sequence[Chip], prompts: str | Sequence[str],
        answers: str | Sequence[Answer] | None = None, *, config: ChipInputConfig | None = None,
        sampling: FrameSamplingConfig | None = None, bands: BandConfig | str | None = None,
        stats: BandStats | None = None, anyres: AnyResConfig | None = None, scales: Sequence[float] | None = None,
        frame_indices: Sequence[Sequence[int] | None] | None = None,
        positions: Sequence[Sequence[float] | None] | None = None, padding_side: str = "right", add_eos: bool = True,
    ) -> ChipBatch:
        """Build a batch from chips: frames sampled, bands scaled, tiles or scales cut, geography kept.

        One chip per ``<image>`` / ``<video>`` placeholder, in reading order across the prompts (as
        ``images`` in :meth:`__call__`). Each chip becomes one visual item (plain), one per scale
        (``scales``), or a thumbnail plus ``rows × cols`` tiles (``anyres``); its placeholder expands to the
        tokens of all its items, in that order, each item :func:`num_visual_tokens` long. Positions in
        ``answers``/``positions`` are the chip's own normalized ``(u, v)`` and ``t`` on the season windows (from
        January 1) of the dates its frames are drawn from (:attr:`ChipGeography.time_axis`, as the recipes'
        records' ``time_range``), whatever the layout.

        Args:
            chips: chips from a :class:`~agrivlm.geo.chips.ChipStream` (``data (T_all, C, h, w)``; ``Chip.as_float``).
            prompts: one per sample, with the placeholders.
            answers: optional answers, one per sample (supervised, as in :meth:`__call__`).
            config: settings for this call instead of the processor's :attr:`chip_settings` (pass a whole
                config to switch a section *off*); the next five override single sections, None keeps them.
            sampling: frame sampler (:class:`~agrivlm.pipeline.frames.FrameSamplingConfig`).
            bands: band scaling, a :class:`BandConfig` or just a preset key (per-chip percentiles).
            stats: fixed, dataset-wide normalisation (needs a band preset).
            anyres: AnyRes tiling (:class:`AnyResConfig`).
            scales: multi-scale factors, e.g. ``(1.0, 0.75, 0.5)``.
            frame_indices: optional, per chip, the indices into ``chip.times`` to use as frames (e.g. a
                record's ``chip.frame_indices``) instead of the sampler, ``t`` on the season windows (from
                January 1) the given frames fall in (a record's ``time_range``); None entries use the sampler.
            positions: continuous values of each sample's LAPE tokens, as in :meth:`__call__`.
            padding_side: ``"right"`` for training, ``"left"`` for batched generation.
            add_eos: end each answer with the eos token.

        Returns:
            :class:`ChipBatch`: ``batch`` holds ``pixel_values (N, T, C, H, W)`` float32 (no NaN),
            ``frame_times (N, T)`` (each chip's frames on its :attr:`ChipGeography.time_axis`),
            ``patch_positions (N, P, 2)`` float32 chip ``(u, v)`` of each item's ``P = h'·w'`` visual tokens per
            frame, ``input_ids``, ``attention_mask`` (and ``labels``, ``position_values`` as in :meth:`__call__`).
            When items differ in size (``scales``), ``pixel_values`` are zero-padded to the largest,
            ``image_sizes (N, 2)`` gives each item's ``(H, W)`` and ``patch_positions`` rows are NaN past each
            item's ``P``.

        Raises:
            PipelineError: a chip without usable frames, a band count that does not fit the preset, chips
                that give different numbers of frames, a size that is not a multiple of the patch size.
        """
        cfg = self._chip_config(config, sampling, bands, stats, anyres, scales)
        chip_list = [c.as_float() for c in ([chips] if isinstance(chips, Chip) else chips)]  # native chips too
        texts, answer_list, prompt_ids = self._prepare_text(prompts, answers, padding_side, "pt")
        owner = self._chip_owners(prompt_ids, chip_list, frame_indices)
        prepared = [self._prepare_chip(chip, cfg, None if frame_indices is None else frame_indices[c])
                    for c, chip in enumerate(chip_list)]
        t = self._shared_frame_count(chip_list, prepared)
        data, geos, items, expand = self._chip_items(chip_list, prepared, owner, t)
        data.update(self._encode_text(texts, prompt_ids, answer_list, positions, expand, [t] * len(chip_list),
                                      "chip", padding_side, add_eos))
        return ChipBatch(batch=BatchFeature(data=data), chips=tuple(geos), items=tuple(items))

    def _chip_owners(self, prompt_ids: list[list[int]], chip_list: list[Chip],
                     frame_indices: Sequence[Sequence[int] | None] | None) -> list[int]:
        """The sample of each placeholder in reading order: one chip (and ``frame_indices`` entry) each."""
        layout = self.layout
        placeholder_ids = {layout.image_token_id, layout.video_token_id}
        owner = [b for b, ids in enumerate(prompt_ids) for i in ids if i in placeholder_ids]
        if not chip_list:
            raise PipelineError("from_chips needs at least one chip; use processor(text) for prompts without images")
        if len(owner) != len(chip_list):
            raise PipelineError(f"{len(chip_list)} chips for {len(owner)} <image>/<video> placeholders in the prompts; "
                                "give one chip per placeholder (put <video> in each prompt)")
        if frame_indices is not None and len(frame_indices) != len(chip_list):
            raise PipelineError(f"{len(frame_indices)} frame_indices entries for {len(chip_list)} chips")
        return owner

    def _shared_frame_count(self, chip_list: list[Chip], prepared: list[_PreparedChip]) -> int:
        """The number of frames every chip of the batch gives (checked, with the channels the model takes)."""
        n_frames = {len(p.frames) for p in prepared}
        if len(n_frames) > 1:
            counts = ", ".join(f"{c.chip_id}: {len(p.frames)}" for c, p in zip(chip_list, prepared, strict=True))
            raise PipelineError(f"chips of one batch must give the same number of frames, got {counts}; batch chips "
                                "with enough usable dates together, or lower sampling.max_frames")
        t = n_frames.pop()
        bands_out = {int(px.shape[1]) for p in prepared for px in p.pixels}
        if bands_out != {self.num_bands}:
            raise PipelineError(f"the chips give {sorted(bands_out)} channels but the model takes "
                                f"num_bands={self.num_bands}; set bands.preset/composite (or the model's num_bands)")
        return t

    def _chip_items(self, chip_list: list[Chip], prepared: list[_PreparedChip], owner: list[int], t: int
                    ) -> tuple[dict[str, Any], list[ChipGeography], list[VisualItem], list[int]]:
        """The chips' item tensors and ``frame_times``, geography, visual items and placeholder token counts."""
        data = self._item_tensors([px for p in prepared for px in p.pixels],
                                  [pos for p in prepared for pos in p.positions], t)
        geos: list[ChipGeography] = []
        items: list[VisualItem] = []
        frame_rows: list[FloatArray] = []
        expand: list[int] = []
        for c, (chip, prep) in enumerate(zip(chip_list, prepared, strict=True)):
            fr = prep.frames
            axis, ft = fr.time_axis, fr.t
            first = len(items)
            items.extend(dataclasses.replace(it, chip=c) for it in prep.items)
            frame_rows.extend([ft] * len(prep.items))
            expand.append(self.item_tokens(t, prep.items))
            geos.append(ChipGeography(
                chip_id=chip.chip_id, sample=owner[c], grid=chip.grid, time_axis=axis, frame_dates=fr.times,
                frame_indices=fr.indices, frame_t=ft, items=tuple(range(first, len(items))),
                grid_shape=prep.grid_shape, stats=prep.stats))
        data["frame_times"] = torch.from_numpy(np.stack(frame_rows).astype(np.float32))
        return data, geos, items, expand

    def item_tokens(self, num_frames: int, items: Sequence[VisualItem]) -> int:
        """Visual tokens of ``items`` of ``num_frames`` frames each: what their placeholder expands to."""
        return sum(sum(frame_token_counts(num_frames, it.token_grid, self.faster_video_stride)) for it in items)

    def _item_tensors(self, pixels: Sequence[torch.Tensor], positions: Sequence[FloatArray], t: int
                      ) -> dict[str, Any]:
        """The items' ``pixel_values``, ``patch_positions`` and (sizes differing) ``image_sizes``.

        Pixels are zero-padded to the largest item, positions NaN past each item's tokens.
        """
        sizes = [(int(px.shape[-2]), int(px.shape[-1])) for px in pixels]
        max_h, max_w = max(h for h, _ in sizes), max(w for _, w in sizes)
        pv = torch.zeros((len(pixels), t, self.num_bands, max_h, max_w), dtype=torch.float32)
        for k, px in enumerate(pixels):
            pv[k, :, :, : px.shape[-2], : px.shape[-1]] = px
        p_max = max(pos.shape[0] for pos in positions)
        pp = torch.full((len(pixels), p_max, 2), float("nan"), dtype=torch.float32)
        for k, pos in enumerate(positions):
            pp[k, : pos.shape[0]] = torch.from_numpy(pos.astype(np.float32))
        data: dict[str, Any] = {"pixel_values": pv, "patch_positions": pp}
        if len(set(sizes)) > 1:
            data["image_sizes"] = torch.tensor(sizes, dtype=torch.long)
        return data

    def from_frames(
        self,
        text: str | Sequence[str],
        frames: Sequence[Any],
        layout: ChipInputConfig | None,
        *,
        answers: str | Sequence[Answer] | None = None,
        frame_times: Sequence[Sequence[float] | None] | None = None,
        positions: Sequence[Sequence[float] | None] | None = None,
        padding_side: str = "right",
        add_eos: bool = True,
    ) -> BatchFeature:
        """:meth:`__call__` with each placeholder's frames cut into ``layout``'s items (AnyRes or multi-scale).

        ``layout`` None (:func:`item_layout` of no tiles and no scales): :meth:`__call__` itself, one item each.

        What training (``data.anyres`` / ``data.scales``) and ``agrivlm infer`` (the checkpoint's saved
        ``anyres`` / ``scales``) feed the model: ``frames`` are one ``(T, C, H, W)`` array per placeholder, already
        scaled (NaN = no data), as ``images`` of :meth:`__call__`; each becomes the thumbnail and tiles of
        ``layout.anyres`` or one item per ``layout.scales`` factor (:meth:`layout_items`), its placeholder
        expanded to all their tokens, with ``patch_positions`` (every token's ``(u, v)`` on the frames) and
        ``image_sizes`` when items differ in size — the layout :meth:`from_chips` gives a chip.

        Raises:
            ValueError: a frame count or band count that differs between items, or too few/many frames arrays.
            PipelineError: a size that is not a multiple of the patch size.
        """
        if layout is None:
            return self(text, images=frames, answers=answers, frame_times=frame_times, positions=positions,
                        padding_side=padding_side, add_eos=add_eos)
        texts, answer_list, prompt_ids = self._prepare_text(text, answers, padding_side, "pt")
        layout_ids = self.layout
        n_items = sum(sum(i in (layout_ids.image_token_id, layout_ids.video_token_id) for i in ids)
                      for ids in prompt_ids)
        if len(frames) != n_items:
            raise ValueError(f"{len(frames)} frame stacks for {n_items} <image>/<video> placeholders")
        stacks = [torch.from_numpy(_as_item(x, i)) for i, x in enumerate(frames)]
        if len({tuple(x.shape[:2]) for x in stacks}) > 1:
            raise ValueError("the frame stacks of one batch must share frames and bands")
        t, c = int(stacks[0].shape[0]), int(stacks[0].shape[1])
        if c != self.num_bands:
            raise ValueError(f"visual items have {c} bands but the model takes num_bands={self.num_bands}")
        times = self._frame_times(frame_times, len(stacks), t)
        pixels, pos, rows, expand = [], [], [], []
        for k, x in enumerate(stacks):
            h, w = int(x.shape[-2]), int(x.shape[-1])
            # the frames' own pixel frame: the items' (u, v) are fractions of it, as a record's positions are
            grid = GeoGrid(Affine.identity(), PIXEL_CRS, w, h)
            px, pp, items, _ = self.layout_items(x, grid, layout, f"visual item {k}")
            pixels += px
            pos += pp
            rows += [times[k]] * len(px)
            expand.append(self.item_tokens(t, items))
        data = self._item_tensors(pixels, pos, t)
        data["frame_times"] = torch.stack(rows)
        data.update(self._encode_text(texts, prompt_ids, answer_list, positions, expand, [t] * len(stacks), "item",
                                      padding_side, add_eos))
        return BatchFeature(data=data)

    def _chip_config(
        self,
        config: ChipInputConfig | None,
        sampling: FrameSamplingConfig | None,
        bands: BandConfig | str | None,
        stats: BandStats | None,
        anyres: AnyResConfig | None,
        scales: Sequence[float] | None,
    ) -> ChipInputConfig:
        cfg = config if config is not None else self.chip_settings
        update: dict[str, Any] = {}
        if sampling is not None:
            update["sampling"] = sampling
        if bands is not None:
            update["bands"] = BandConfig(preset=bands) if isinstance(bands, str) else bands
        if stats is not None:
            base = update.get("bands", cfg.bands)
            if base is None:
                raise PipelineError("stats need a band preset: pass bands='<preset>' (or set chip_config.bands)")
            update["bands"] = base.model_copy(update={"low": stats.low.tolist(), "high": stats.high.tolist(),
                                                      "percentiles": stats.percentiles})
        if anyres is not None:
            update["anyres"] = anyres
        if scales is not None:
            update["scales"] = [float(s) for s in scales]
        if not update:
            return cfg
        return ChipInputConfig.model_validate({**cfg.model_dump(), **update})

    def _frames(self, chip: Chip, sampling: FrameSamplingConfig, indices: Sequence[int] | None) -> Frames:
        if indices is None:
            return sample_frames(chip, sampling)
        idx = np.asarray(indices, dtype=np.int64)
        n = len(chip.times)
        if idx.ndim != 1 or idx.size == 0 or idx.min() < 0 or idx.max() >= n or np.any(np.diff(idx) <= 0):
            raise PipelineError(f"chip {chip.chip_id}: frame_indices {idx.tolist()} must be increasing indices "
                                f"into its {n} dates (0…{n - 1})")
        files = [chip.files[i] for i in idx] if len(chip.files) == n else list(chip.files)
        sub = dataclasses.replace(chip, times=chip.times[idx], data=chip.data[idx], nodata=chip.nodata[idx],
                                  mask=chip.mask[idx], files=files)
        keep_all = sampling.model_copy(update={"sampler": "uniform", "uniform_by": "index",
                                               "max_frames": int(idx.size)})
        fr = sample_frames(sub, keep_all)  # t on the season windows of the given frames (a record's time_range)
        return dataclasses.replace(fr, indices=idx[fr.indices])

    def _prepare_chip(self, chip: Chip, cfg: ChipInputConfig, indices: Sequence[int] | None) -> _PreparedChip:
        frames = self._frames(chip, cfg.sampling, indices)
        values = frames.pixels
        used: BandStats | None = None
        if cfg.bands is not None:
            assert cfg.bands.preset is not None  # ChipInputConfig's rule
            values, used = prepare_bands(values, cfg.bands.preset, composite_name=cfg.bands.composite,
                                         times=frames.times, stats=cfg.bands.stats(),
                                         percentiles=cfg.bands.percentiles, source=f"chip {chip.chip_id}")
        x = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
        filled, out_pos, out_items, grid_shape = self.layout_items(x, chip.grid, cfg, f"chip {chip.chip_id}")
        return _PreparedChip(filled, out_pos, out_items, frames, grid_shape, used)

    def _resized(self, x: torch.Tensor, grid: GeoGrid, cfg: ChipInputConfig) -> tuple[torch.Tensor, GeoGrid]:
        """Frames and grid resized to ``cfg.size`` (square) or within ``cfg.max_patches`` (NaViT); else as given."""
        if cfg.size is None and cfg.max_patches is None:
            return x, grid
        h0, w0 = int(x.shape[-2]), int(x.shape[-1])
        budget = cfg.max_patches or 1
        h, w = (cfg.size, cfg.size) if cfg.size is not None else navit_size(h0, w0, self.patch_size, budget)
        return resize_frames(x, (h, w), cfg.resize_mode), rescale_grid(grid, h, w)

    def layout_items(self, x: torch.Tensor, chip_grid: GeoGrid, cfg: ChipInputConfig, name: str = "item"
                     ) -> tuple[list[torch.Tensor], list[FloatArray], list[VisualItem], tuple[int, int] | None]:
        """Frames ``(T, C, H, W)`` on ``chip_grid`` → the visual items of ``cfg``'s layout, no data filled.

        Plain: the frames (resized to ``cfg.size``); ``anyres``: thumbnail + tiles; ``scales``: one item per
        scale. Returns per item its pixels ``(T, C, h, w)``, its tokens' chip ``(u, v)`` ``(h'·w', 2)``, its
        :class:`VisualItem` (``chip`` 0), and the AnyRes tile grid ``(rows, cols)`` (None otherwise).

        Raises:
            PipelineError: a size that is not a multiple of the patch size (naming ``name``).
        """
        grid = chip_grid
        whole = Window(0, 0, chip_grid.width, chip_grid.height)
        p, stride = self.patch_size, self.pool_stride
        mode = cast(PoolMode, self.pool_mode)
        x, grid = self._resized(x, grid, cfg)
        out_px: list[torch.Tensor] = []
        out_pos: list[FloatArray] = []
        out_items: list[VisualItem] = []
        grid_shape: tuple[int, int] | None = None

        def grid_of(h: int, w: int, what: str) -> tuple[int, int]:
            try:
                return visual_token_grid(h, w, p, stride)
            except ValueError as exc:
                raise PipelineError(f"{name}: {what}: {exc}") from None

        if cfg.anyres is not None:
            size = cfg.anyres.tile_size
            token_grid = grid_of(size, size, "anyres.tile_size")
            tiles = anyres_tiles(x, grid, size, cfg.anyres.max_tiles, cfg.anyres.min_tiles, cfg.resize_mode)
            grid_shape = tiles.grid_shape
            for k, tile in enumerate(tiles.tiles):
                if tile.is_thumbnail and not cfg.anyres.thumbnail:
                    continue
                u, v = token_positions(tiles, k, (size // p, size // p), stride, mode)
                out_px.append(tiles.pixels[k])
                out_pos.append(np.stack([u, v], axis=1))
                out_items.append(VisualItem(chip=0, kind="thumbnail" if tile.is_thumbnail else "tile", grid=tile.grid,
                                            chip_grid=chip_grid, window=tile.window, token_grid=token_grid, tile=tile))
        elif cfg.scales is not None:
            h0, w0 = int(x.shape[-2]), int(x.shape[-1])
            for s in cfg.scales:
                h, w = (max(p, int(np.floor(side * s / p + 0.5)) * p) for side in (h0, w0))
                out_px.append(resize_frames(x, (h, w), cfg.resize_mode))
                out_pos.append(visual_token_centres(h, w, p, stride, mode))
                out_items.append(VisualItem(chip=0, kind="scale", grid=rescale_grid(grid, h, w), chip_grid=chip_grid,
                                            window=whole, token_grid=grid_of(h, w, f"scale {s}"), scale=float(s)))
        else:
            h, w = int(x.shape[-2]), int(x.shape[-1])
            token_grid = grid_of(h, w, "set chip_config.size, scales or anyres to resize it")
            out_px.append(x)
            out_pos.append(visual_token_centres(h, w, p, stride, mode))
            out_items.append(VisualItem(chip=0, kind="chip", grid=grid, chip_grid=chip_grid, window=whole,
                                        token_grid=token_grid))
        filled = [torch.from_numpy(fill_nodata(px.numpy(), cfg.fill_value)[0]) for px in out_px]
        return filled, out_pos, out_items, grid_shape

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        """``tokenizer.batch_decode``; keep ``skip_special_tokens=False`` to see position tokens."""
        return self.tokenizer.batch_decode(*args, **kwargs)  # type: ignore[no-any-return]

    def decode(self, *args: Any, **kwargs: Any) -> str:
        """``tokenizer.decode``; keep ``skip_special_tokens=False`` to see position tokens."""
        return self.tokenizer.decode(*args, **kwargs)  # type: ignore[no-any-return]




def register_auto_processor() -> None:
    """Let ``AutoProcessor.from_pretrained`` find this processor for agrivlm folders."""
    from transformers import AutoProcessor

    AutoProcessor.register(AgriVLMConfig, AgriVLMProcessor)
