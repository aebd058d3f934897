"""A tiny checkpoint that really outlines fields on the embedded sample, trained once per test session.

The tiny model (SigLIP + Qwen2, LAPE on) is overfitted, as in ``test_model_learning.py``, on the 32-px chips of
the stride-32 grid of the real Sentinel-2 NDVI sample. Its inputs are made by the inference code itself
(:class:`agrivlm.infer.prepare.ChipPreparer`: frames, band normalisation, the recipes' ``outline_fields``
question), so training and inference see the same prompts and pixels. The target of a chip is the recipes'
answer format for its largest field (cultivated land or grassland, clipped to the chip, box through
``GeoGrid.crs_to_norm`` via ``norm_box``): ``"1 field: grassland <box>."`` — or, for :func:`polygon_checkpoint`,
its outline (``norm_ring``, 8 vertices at most): ``"1 field: grassland <polygon>."``. A few growth-stage questions
about real fields, answered with the recipes' derived stages, are mixed in so that growth answers are stage words.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import torch

from agrivlm.geo import ChipStream, open_stack
from agrivlm.geo.coords import norm_box
from agrivlm.infer.generate import Question
from agrivlm.infer.prepare import ChipPreparer, FieldLayer
from agrivlm.lape.tokens import LapeVocab, serialize_box, serialize_polygon
from agrivlm.model import build_model
from agrivlm.pipeline.bands import BandStats
from agrivlm.pipeline.inputs import BandConfig, InputConfig, default_frames, save_input_config
from agrivlm.recipes.build import prepare
from agrivlm.recipes.config import load_recipe
from agrivlm.recipes.context import norm_ring
from agrivlm.recipes.phenology import stage_table
from agrivlm.resources import recipes_dir
from agrivlm.sample import SAMPLE_ROOT
from agrivlm.tasks.questions import OUTLINE_FIELDS_QUESTIONS

#: The checkpoint's input settings: 32-px chips (stride 32), 2 clear frames, NDVI with a fixed range.
INPUTS = InputConfig(
    chip_size=32, stride=32, frames=default_frames().model_copy(update={"max_frames": 2}), min_frames=2,
    bands=BandConfig(preset="ndvi", low=[-0.2], high=[1.0]),
)
FIELD_CLASSES = ("cultivated land", "grassland")
STEPS = 100
#: Steps for the outline checkpoint: 8 vertices are 16 position tokens to tell apart per chip, not 4 (at 100
#: steps the model writes one chip's outline for every chip; at 400 it gives most chips their own).
POLYGON_STEPS = 400
#: Growth-stage questions (about real fields, answered with the recipes' derived stages) mixed into training.
GROWTH_QUESTIONS = 8
RECIPES = recipes_dir()
#: Band statistics of the saved test folders (NDVI, the fixed range of ``INPUTS``).
STATS = BandStats(np.array([-0.2]), np.array([1.0]), (2.0, 98.0))


def save_moved_tiny(folder: Path, info: dict[str, Any]) -> Path:
    """A tiny model whose weights are moved off their init (so a load that silently re-initialises shows),
    saved into ``folder`` with ``agrivlm.train.final.save_final`` as a trained stage's ``final/`` would be."""
    from agrivlm.train.final import save_final

    model, proc = build_model()
    with torch.no_grad():
        model.band_adapter.weight.mul_(1.5)
        width = model.lape.width_input.weight  # type: ignore[union-attr]
        width.add_(torch.randn_like(width))
    save_final(folder, model, proc, INPUTS, STATS, info)
    return folder


@lru_cache(maxsize=1)
def stage_truth() -> pd.DataFrame:
    """The recipes' growth-stage table of the sample (``field_id, date, stage``; what ``recipe build`` writes)."""
    cfg = load_recipe(RECIPES / "growth_stages.yaml")
    prep = prepare(cfg, RECIPES, progress=False)
    return stage_table(prep.state.truth, prep.state.factory.times)


def field_layer() -> FieldLayer:
    """The sample's parcels as the fields of ``--task growth`` (ids: ``index``, as the recipes use)."""
    return FieldLayer.read(SAMPLE_ROOT / "parcels.gpkg", "index", "LULC_NAME")


@lru_cache(maxsize=2)
def training_set(outline_as: str = "box") -> tuple[list[Question], list[str], list[list[float]], list[str]]:
    """``(questions, answers, answer positions, chip ids)``: every field chip of the grid, then stage questions.

    Fields: the chips of the stride-32 grid with ≥ 10 % cultivated land or grassland, answered with the box of
    the largest one. Growth: the first :data:`GROWTH_QUESTIONS` stage questions the growth preparer asks about
    the first of those chips, answered with the recipes' derived stage on that day.
    """
    config = INPUTS
    stack = open_stack(SAMPLE_ROOT / "ndvi", masks=SAMPLE_ROOT / "cloud_mask")
    parcels = gpd.read_file(SAMPLE_ROOT / "parcels.gpkg").to_crs(stack.crs.to_wkt())
    fields = parcels[parcels["LULC_NAME"].isin(FIELD_CLASSES)]
    vocab = LapeVocab()
    preparer = ChipPreparer(config, "fields", vocab)
    growth = ChipPreparer(config, "growth", vocab, fields=field_layer().to_crs(stack.crs))
    truth = stage_truth().set_index(["field_id", "date"])["stage"]
    questions: list[Question] = []
    answers: list[str] = []
    positions: list[list[float]] = []
    chip_ids: list[str] = []
    growth_chip = None
    for chip in ChipStream(stack, chip_size=config.chip_size, stride=config.stride):
        footprint = chip.grid.footprint()
        clipped = fields.geometry.intersection(footprint)
        share = clipped.area / footprint.area
        if share.max() < 0.1:
            continue
        growth_chip = growth_chip or chip
        best = share.idxmax()
        questions.append(preparer.prepare(chip).questions[0])
        if outline_as == "polygon":  # the recipes' outline of the field's visible part (outline_vertices = 8)
            ring = norm_ring(chip.grid, clipped[best], 8, float(abs(chip.grid.transform.determinant)) ** 0.5)
            answers.append(f"1 field: {fields.loc[best, 'LULC_NAME']} {serialize_polygon(ring, vocab)}.")
            positions.append([x for point in ring for x in point])
        else:
            box = norm_box(chip.grid, clipped[best])
            answers.append(f"1 field: {fields.loc[best, 'LULC_NAME']} {serialize_box(box, vocab)}.")
            positions.append(list(box))
        chip_ids.append(chip.chip_id)
    assert growth_chip is not None
    asked = [q for q in growth.prepare(growth_chip).questions if (q.meta["field_id"], q.meta["date"]) in truth.index]
    for q in asked[:GROWTH_QUESTIONS]:
        questions.append(q)
        answers.append(str(truth.loc[(q.meta["field_id"], q.meta["date"])]))
        positions.append(list(q.positions))
        chip_ids.append(growth_chip.chip_id)
    return questions, answers, positions, chip_ids


def train(folder: Path, outline_as: str = "box", steps: int = STEPS) -> dict[str, float]:
    """Overfit the tiny model on :func:`training_set` and save it (with its input settings) into ``folder``."""
    questions, answers, positions, _ = training_set(outline_as)
    assert OUTLINE_FIELDS_QUESTIONS[0] in questions[0].prompt
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model, proc = build_model()
        batch = proc([q.prompt for q in questions], images=[q.visual.pixels for q in questions], answers=answers,
                     frame_times=[q.visual.frame_times for q in questions], positions=positions)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        model.train()
        losses = []
        for _ in range(steps):
            loss = model(**batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        model.eval()
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    save_input_config(INPUTS, folder)
    return {"first_loss": losses[0], "last_loss": losses[-1], "samples": len(questions)}


@lru_cache(maxsize=1)
def trained_checkpoint() -> tuple[Path, dict[str, float]]:
    """The trained checkpoint folder (trained once per test process; removed at exit)."""
    folder = Path(tempfile.mkdtemp(prefix="agrivlm-infer-ckpt-"))
    atexit.register(shutil.rmtree, folder, True)
    stats = train(folder)
    return folder, stats


@lru_cache(maxsize=1)
def polygon_checkpoint() -> tuple[Path, dict[str, float]]:
    """A checkpoint trained as :func:`trained_checkpoint`, its fields answered as outlines (``outline_as: polygon``)."""
    folder = Path(tempfile.mkdtemp(prefix="agrivlm-infer-polygon-ckpt-"))
    atexit.register(shutil.rmtree, folder, True)
    stats = train(folder, "polygon", POLYGON_STEPS)
    return folder, stats


@lru_cache(maxsize=1)
def untrained_checkpoint() -> Path:
    """The tiny model as built (random weights: its answers are junk), saved with the same input settings."""
    folder = Path(tempfile.mkdtemp(prefix="agrivlm-infer-untrained-"))
    atexit.register(shutil.rmtree, folder, True)
    model, proc = build_model()
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    save_input_config(INPUTS, folder)
    return folder


def boxes_iou(a: tuple, b: tuple) -> float:
    """IoU of two normalized boxes ``(u1, v1, u2, v2)``."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


