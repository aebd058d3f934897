"""A stage's ``final/`` folder: everything needed to use the checkpoint lives in its HF configs.

``config.json`` carries how the weights were made (``stage_info``,
:attr:`~agrivlm.model.configuration.AgriVLMConfig.stage_info`); ``processor_config.json`` carries the input
settings ``agrivlm infer`` and the explorer need (``inputs``: chip grid, frames, band preset and normalisation)
and the training data's band statistics the next stage reuses (``band_stats``). A ``save_pretrained`` →
``from_pretrained`` → ``save_pretrained`` round trip therefore keeps them, and the readers
(:func:`~agrivlm.pipeline.inputs.load_input_config`, :func:`~agrivlm.train.curriculum.read_stage_info`,
:func:`~agrivlm.train.curriculum.read_band_stats`) fall back to them.

The side files ``stage_info.json``, ``agrivlm_inputs.yaml`` and ``band_stats.json`` are still written, for
reading, but *from the saved configs* (:func:`write_side_files`): they cannot disagree with them, and a folder
that lost them gets the same bytes back from ``write_side_files(folder)``. So is the model card ``README.md``
(:func:`write_model_card`, :mod:`agrivlm.train.card`): base weights, data and its manifests, stage and steps,
time, final metrics, held-out scores when the stage info holds them, inputs, use and limits.

A stage that trained the LLM through LoRA hands :func:`save_final` peft's model (:mod:`agrivlm.train.lora`): its
adapter goes to ``adapter/`` in peft's format and the folder's weights are peft's ``merge_and_unload``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers.utils import PROCESSOR_NAME

from agrivlm.config import parse_config
from agrivlm.io import write_json
from agrivlm.model.configuration import saved_model_config
from agrivlm.model.modeling import AgriVLMForConditionalGeneration
from agrivlm.model.processing import AgriVLMProcessor
from agrivlm.pipeline.bands import BandStats
from agrivlm.pipeline.inputs import InputConfig, save_input_config, saved_processor_config
from agrivlm.train.card import MODEL_CARD, model_card
from agrivlm.train.config import resolve
from agrivlm.train.curriculum import BAND_STATS, STAGE_INFO
from agrivlm.train.data import _manifest
from agrivlm.train.lora import ADAPTER_DIR

if TYPE_CHECKING:
    from peft import PeftModel


def json_ready(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` as plain JSON (what ``stage_info.json`` always held: values JSON cannot hold become strings)."""
    return dict(json.loads(json.dumps(data, default=str)))


def save_final(
    folder: str | os.PathLike[str],
    model: AgriVLMForConditionalGeneration | PeftModel,
    processor: AgriVLMProcessor,
    inputs: InputConfig,
    stats: BandStats | None,
    info: dict[str, Any],
) -> Path:
    """Save a stage's model and processor into ``folder`` with everything that uses them in their configs.

    Args:
        folder: the (partial) final folder.
        model: the plain model, or peft's (a LoRA stage, :func:`~agrivlm.train.lora.adapter_model`): its adapter is
            saved to ``folder/adapter`` (``PeftModel.save_pretrained``) and the folder gets ``merge_and_unload()``.
            ``info`` becomes the plain model's ``config.stage_info``.
        processor: its processor; ``inputs`` and ``stats`` become its ``inputs`` and ``band_stats`` (and its
            ``chip_config`` follows ``inputs``' frames and bands).
        inputs: how ``agrivlm infer`` must prepare inputs for this model.
        stats: the training data's band normalisation, or None (per-chip normalisation).
        info: the stage's info (stage, init folder and digests, config, data, steps, final metrics).

    Returns:
        ``folder``, with the HF files, the side files and the model card written from them (:func:`write_side_files`,
        :func:`write_model_card`).
    """
    plain = model
    if not isinstance(model, AgriVLMForConditionalGeneration):  # peft's
        model.save_pretrained(str(Path(folder) / ADAPTER_DIR))
        plain = model.merge_and_unload()
    assert isinstance(plain, AgriVLMForConditionalGeneration)
    plain.config.stage_info = json_ready(info)
    processor.set_checkpoint_inputs(inputs.model_dump(mode="json"), stats)
    plain.save_pretrained(folder)
    processor.save_pretrained(folder)
    write_side_files(folder)
    write_model_card(folder)
    return Path(folder)


def write_model_card(folder: str | os.PathLike[str]) -> Path | None:
    """Write ``README.md``, the model card (:func:`~agrivlm.train.card.model_card`), from a folder's saved configs.

    A pure function of ``config.json`` and ``processor_config.json``: a folder re-saved elsewhere
    (``save_pretrained``) gets the same card back. Held-out scores appear when the stage info holds a ``heldout``
    dict (``{"set": {"metric": value}}``).

    Returns:
        The card, or None for a folder whose ``config.json`` holds no stage info (not made by ``agrivlm train``).
    """
    folder = Path(folder)
    config = saved_model_config(folder) or {}
    if config.get("stage_info") is None:
        return None
    path = folder / MODEL_CARD
    path.write_text(model_card(config, saved_processor_config(folder) or {}), encoding="utf-8")
    return path


def data_sources(roots: Sequence[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """What each data root (a recipe output) holds, from its ``manifest.json``: for the stage info and the card.

    Returns:
        One dict per root: ``root`` (absolute), ``recipe``, ``recipe_file``, ``recipe_sha256``, ``records_by_task``
        (``{"family/task": {"train": n, "val": n, "test": n}}``) and ``stack`` (dates and sources, as the manifest
        has them).

    Raises:
        ConfigError: a root without ``manifest.json`` (naming it and the command that makes one).
    """
    out = []
    for root in roots:
        path = resolve(root)
        manifest = _manifest(path)
        out.append({
            "root": str(path),
            "recipe": manifest.get("recipe"),
            "recipe_file": manifest.get("recipe_file"),
            "recipe_sha256": manifest.get("recipe_sha256"),
            "records_by_task": (manifest.get("counts") or {}).get("by_task", {}),
            "stack": manifest.get("stack"),
        })
    return out


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
        written.append(write_json(folder / STAGE_INFO, info, sort_keys=True, trailing_newline=False))
    saved = saved_processor_config(folder) or {}
    if saved.get("inputs") is not None:
        inputs = parse_config(InputConfig, saved["inputs"], f"{folder / PROCESSOR_NAME}: inputs")
        written.append(save_input_config(inputs, folder))
    if saved.get("band_stats") is not None:
        written.append(write_json(folder / BAND_STATS, saved["band_stats"], sort_keys=True, trailing_newline=False))
    return written
