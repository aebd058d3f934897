"""A stage's ``final/`` folder: everything needed to use the checkpoint lives in its HF configs.

``config.json`` carries how the weights were made (``stage_info``,
:attr:`~agrivlm.model.configuration.AgriVLMConfig.stage_info`); ``processor_config.json`` carries the input
settings ``agrivlm infer`` and the explorer need (``inputs``: chip grid, frames, band preset and normalisation)
and the training data's band statistics the next stage reuses (``band_stats``). A ``save_pretrained`` →
``from_pretrained`` → ``save_pretrained`` round trip therefore keeps them, and the readers
(:func:`~agrivlm.infer.config.load_input_config`, :func:`~agrivlm.train.curriculum.read_stage_info`,
:func:`~agrivlm.train.curriculum.read_band_stats`) fall back to them.

The side files ``stage_info.json``, ``agrivlm_inputs.yaml`` and ``band_stats.json`` are still written, for
reading, but *from the saved configs* (:func:`write_side_files`): they cannot disagree with them, and a folder
that lost them gets the same bytes back from ``write_side_files(folder)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from transformers.utils import PROCESSOR_NAME

from agrivlm.config import parse_config
from agrivlm.infer.config import InputConfig, save_input_config
from agrivlm.model.configuration import saved_model_config
from agrivlm.model.modeling import AgriVLMForConditionalGeneration
from agrivlm.pipeline.bands import BandStats
from agrivlm.pipeline.processor import AgriVLMProcessor, saved_processor_config
from agrivlm.train.curriculum import BAND_STATS, STAGE_INFO


def json_ready(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` as plain JSON (what ``stage_info.json`` always held: values JSON cannot hold become strings)."""
    return dict(json.loads(json.dumps(data, default=str)))


def save_final(
    folder: str | os.PathLike[str],
    model: AgriVLMForConditionalGeneration,
    processor: AgriVLMProcessor,
    inputs: InputConfig,
    stats: BandStats | None,
    info: dict[str, Any],
) -> Path:
    """Save a stage's model and processor into ``folder`` with everything that uses them in their configs.

    Args:
        folder: the (partial) final folder.
        model: the plain (LoRA merged) model; ``info`` becomes its ``config.stage_info``.
        processor: its processor; ``inputs`` and ``stats`` become its ``inputs`` and ``band_stats`` (and its
            ``chip_config`` follows ``inputs``' frames and bands).
        inputs: how ``agrivlm infer`` must prepare inputs for this model.
        stats: the training data's band normalisation, or None (per-chip normalisation).
        info: the stage's info (stage, init folder and digests, config, data, steps, final metrics).

    Returns:
        ``folder``, with the HF files and the side files written from them (:func:`write_side_files`).
    """
    model.config.stage_info = json_ready(info)
    processor.set_checkpoint_inputs(inputs.model_dump(mode="json"), stats)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    write_side_files(folder)
    return Path(folder)


def write_side_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Write ``stage_info.json``, ``agrivlm_inputs.yaml`` and ``band_stats.json`` from a folder's saved configs.

    Each is written only when its config holds it (a folder saved outside ``agrivlm train`` may hold none).

    Returns:
        The files written.

    Raises:
        ConfigError: ``config.json`` is not a JSON object, or the processor's ``inputs`` are not valid input
            settings (naming the file and key).
    """
    folder = Path(folder)
    written: list[Path] = []
    info = (saved_model_config(folder) or {}).get("stage_info")
    if info is not None:
        written.append(_write_json(folder / STAGE_INFO, info))
    saved = saved_processor_config(folder) or {}
    if saved.get("inputs") is not None:
        inputs = parse_config(InputConfig, saved["inputs"], f"{folder / PROCESSOR_NAME}: inputs")
        written.append(save_input_config(inputs, folder))
    if saved.get("band_stats") is not None:
        written.append(_write_json(folder / BAND_STATS, saved["band_stats"]))
    return written


def _write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str), encoding="utf-8")
    return path
