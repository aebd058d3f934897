"""The whole path learns: real chips in, box tokens out, decoded boxes on real parcels.

The tiny model (SigLIP + Qwen2, LAPE on) is trained on a handful of real 32-px chips of the embedded
Sentinel-2 NDVI sample. The target of each chip is the box of its largest grassland parcel, clipped to
the chip's footprint and converted to normalized (u, v) with the one coordinate module
(``GeoGrid.crs_to_norm``). Overfitting is the point: it shows gradients reach every part (band adapter,
encoder, projector, LAPE tables/heads, LLM) and that generate() + sub-bin decoding give the boxes back.
"""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import torch

from agrivlm.geo import ChipStream, open_stack
from agrivlm.geo.chips import Edge
from agrivlm.lape.tokens import serialize_box
from agrivlm.model import build_model

PROMPT = "<image> Box of the largest grassland parcel:"
MAX_STEPS = 300


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """IoU of two normalized boxes (u1, v1, u2, v2); corners may come in either order."""
    a = (min(a[0], a[2]), min(a[1], a[3]), max(a[0], a[2]), max(a[1], a[3]))
    b = (min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3]))
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def chips_and_boxes(root: Path) -> tuple[list[np.ndarray], list[tuple[float, float, float, float]]]:
    """Non-overlapping 32-px chips holding ≥ 10 % grassland; one clear date; box of the largest grassland parcel."""
    stack = open_stack(root / "ndvi", masks=root / "cloud_mask")
    parcels = gpd.read_file(root / "parcels.gpkg")
    grass = parcels[parcels["LULC_NAME"] == "grassland"].to_crs(stack.grid.crs)
    chips = list(ChipStream(stack, chip_size=32, edge=Edge.DROP))
    clear = np.stack([(~c.nodata.any(axis=1) & ~c.mask).mean(axis=(1, 2)) for c in chips]).min(axis=0)
    date = int(np.argmax(clear))  # first date that is clear over every chip
    images, boxes = [], []
    for chip in chips:
        footprint = chip.grid.footprint()
        clipped = grass.geometry.intersection(footprint)
        share = clipped.area / footprint.area
        if share.max() < 0.1:
            continue
        shape = clipped[share.idxmax()]
        parts = getattr(shape, "geoms", [shape])
        xy = np.concatenate([np.asarray(p.exterior.coords) for p in parts])
        u, v = chip.grid.crs_to_norm(xy[:, 0], xy[:, 1])
        box = np.clip([u.min(), v.min(), u.max(), v.max()], 0.0, 1.0)
        boxes.append(tuple(float(x) for x in box))
        images.append(chip.data[date])  # (1, 32, 32)
    # NDVI varies little (std ≈ 0.08): standardise with the sample's own statistics, as a band preset would
    stacked = np.stack(images)
    mean, std = float(stacked.mean()), float(stacked.std())
    return [(im - mean) / std for im in images], boxes  # type: ignore[misc]


def test_tiny_model_learns_boxes_of_real_parcels(sample_root: Path) -> None:
    images, boxes = chips_and_boxes(sample_root)
    assert len(images) >= 4
    assert len({tuple(np.round(b, 2)) for b in boxes}) == len(boxes), "distinct targets: the model must look"
    torch.manual_seed(0)
    model, proc = build_model()
    train = proc([PROMPT] * len(images), images=images, answers=[serialize_box(b) for b in boxes],
                 positions=[list(b) for b in boxes])
    prompts = proc([PROMPT] * len(images), images=images, padding_side="left")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)

    def evaluate() -> list[float]:
        model.eval()
        with torch.no_grad():
            res = model.generate(**prompts, max_new_tokens=6, output_logits=True, return_dict_in_generate=True)
        new = res.sequences[:, prompts["input_ids"].shape[1]:]
        decoded = model.decode_positions(new, res.logits)
        model.train()
        return [iou(p.boxes[0], b) if len(p.boxes) == 1 else 0.0 for p, b in zip(decoded, boxes, strict=True)]

    model.train()
    first_loss, ious, step = None, [0.0], 0
    for step in range(1, MAX_STEPS + 1):
        out = model(**train)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first_loss = first_loss if first_loss is not None else float(out.loss.detach())
        if step >= 150 and step % 50 == 0:
            ious = evaluate()
            if min(ious) >= 0.8:
                break
    last = float(out.loss.detach())
    print(f"learned in {step} steps: loss {first_loss:.3f} → {last:.3f}, IoU {np.round(ious, 3).tolist()}")
    assert min(ious) >= 0.8, f"IoU per chip after {step} steps: {ious}"
    assert float(out.loss.detach()) < 0.5 * first_loss


def _rectangle_images(rng: np.random.Generator, n: int) -> tuple[list[np.ndarray], list[tuple[float, ...]]]:
    """Noisy 32-px frames, each with one brighter rectangle (a field) at a random place and size, and its box."""
    images, boxes = [], []
    for _ in range(n):
        u1, v1 = rng.uniform(0.0, 0.6, 2)
        w, h = rng.uniform(0.25, 0.4, 2)
        b = (float(u1), float(v1), float(min(u1 + w, 1.0)), float(min(v1 + h, 1.0)))
        im = rng.normal(0.3, 0.05, (1, 1, 32, 32)).astype(np.float32)
        im[:, :, int(b[1] * 32):int(b[3] * 32), int(b[0] * 32):int(b[2] * 32)] += 0.4
        images.append(np.clip(im, 0.0, 1.0))
        boxes.append(b)
    return images, boxes


def test_tiny_model_finds_a_field_in_images_it_never_saw() -> None:
    """Fresh images every step, scored on 64 others: the model must read the image, not remember answers.

    This is the test that the vision path carries what the LM needs: with ``projector_norm: none`` (the first
    default checkpoint's setting) the same run reached IoU > 0.5 on 6 % of the held-out images after 2,000 steps
    (mean IoU 0.13); with ``batch`` (``configs/model/tiny.yaml``) on 59 % (mean IoU 0.54). With the packages a
    fresh install resolved on 2026-12-03 (the same code, torch pinned) the same 2,000 steps gave 33 % (mean IoU
    0.38), and 2,600 steps 77 % (mean IoU 0.60): the run goes on to 3,000 steps, stopping at the first check past
    half the images.
    """
    torch.manual_seed(0)
    model, proc = build_model()
    assert model.config.projector_norm == "batch"
    rng = np.random.default_rng(0)
    test_images, test_boxes = _rectangle_images(np.random.default_rng(123), 64)
    prompt = "<image> Box of the field:"
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    mean_box = tuple(np.mean(_rectangle_images(np.random.default_rng(7), 512)[1], axis=0))
    baseline = np.mean([iou(mean_box, b) for b in test_boxes])
    ious: list[float] = []
    for step in range(1, 3001):  # stops at the first check with IoU > 0.5 on half the images
        images, boxes = _rectangle_images(rng, 8)
        batch = proc([prompt] * 8, images=images, answers=[serialize_box(b) for b in boxes],
                     positions=[list(b) for b in boxes])
        model.train()
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= 1400 and step % 200 == 0:
            model.eval()
            prompts = proc([prompt] * len(test_images), images=test_images, padding_side="left")
            with torch.no_grad():
                res = model.generate(**prompts, max_new_tokens=6, output_logits=True, return_dict_in_generate=True)
            decoded = model.decode_positions(res.sequences[:, prompts["input_ids"].shape[1]:], res.logits)
            ious = [iou(p.boxes[0], b) if len(p.boxes) == 1 else 0.0 for p, b in zip(decoded, test_boxes, strict=True)]
            if np.mean(np.array(ious) > 0.5) >= 0.5:
                break
    hit = float(np.mean(np.array(ious) > 0.5))
    print(f"held-out after {step} steps: IoU > 0.5 on {hit:.2f}, mean IoU {np.mean(ious):.2f} "
          f"(mean box {baseline:.2f})")
    assert hit >= 0.3 and np.mean(ious) >= 2 * baseline, (hit, np.mean(ious), baseline)
