"""LAPE overhead: forward+backward step time of the same model with LAPE on vs off, measured alternately.

Both models are built from the same settings and seed; "off" makes the position tokens ordinary rows of
the LLM's vocabulary (no separate tables/heads, no NTP, no injection, hard targets), "on" is the full
LAPE path. Batches are real chips of the embedded Sentinel-2 sample (frames of several dates) with box
answers of real parcels. Steps alternate on/off/off/on/... so drift in machine load hits both equally;
each on step is paired with the off step beside it, and the median of the per-pair ratios is printed
(target ≤ 1.05) with the ratio of the medians and of the fastest steps. On a busy shared CPU use
``--threads 1`` (oversubscribed threads make single steps seconds slower at random) and more steps.

    python benchmarks/lape_overhead.py                 # "small" preset
    python benchmarks/lape_overhead.py --preset tiny --steps 40
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from agrivlm.geo import ChipStream, open_stack
from agrivlm.geo.chips import Edge
from agrivlm.lape.tokens import serialize_box
from agrivlm.model.builders import ModelSettings, build_model, load_model_settings
from agrivlm.sample import sample_cloud_mask_dir, sample_ndvi_dir

PRESETS: dict[str, dict[str, object]] = {
    # the embedded default
    "tiny": {},
    # a model whose proportions are closer to real ones (LLM width 512, SigLIP width 192)
    "small": {
        "vision.hidden_size": 192, "vision.intermediate_size": 768, "vision.num_layers": 4, "vision.num_heads": 4,
        "vision.patch_size": 8, "vision.image_size": 64,
        "llm.hidden_size": 512, "llm.intermediate_size": 1408, "llm.num_layers": 4, "llm.num_heads": 8,
        "llm.num_kv_heads": 2,
    },
}


def settings_for(preset: str, lape: bool) -> ModelSettings:
    overrides = dict(PRESETS[preset])
    overrides["lape.enabled"] = lape
    return load_model_settings(overrides=overrides)


def real_batch(processor, batch: int, frames: int, chip: int) -> dict[str, torch.Tensor]:
    stack = open_stack(sample_ndvi_dir(), masks=sample_cloud_mask_dir())
    chips = list(ChipStream(stack, chip_size=chip, stride=chip // 2, edge=Edge.SNAP))[:batch]
    items, answers, positions, times = [], [], [], []
    rng = np.random.default_rng(0)
    for c in chips:
        clear = (~c.nodata.any(axis=1) & ~c.mask).mean(axis=(1, 2))
        idx = np.sort(np.argsort(-clear, kind="stable")[:frames])
        x = c.data[idx]
        items.append((x - np.nanmean(x)) / (np.nanstd(x) + 1e-6))
        u1, v1 = rng.uniform(0, 0.5, 2)
        box = (float(u1), float(v1), float(u1 + 0.4), float(v1 + 0.4))
        answers.append(serialize_box(box))
        positions.append(list(box))
        times.append(c.time_axis.to_norm(c.times[idx]).tolist())
    prompts = ["<video> Box of the largest grassland parcel:"] * len(items)
    return dict(processor(prompts, images=items, answers=answers, positions=positions, frame_times=times))


def step(model, batch) -> float:
    t = time.perf_counter()
    out = model(**batch)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per model")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--chip", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    on, proc_on = build_model(settings_for(args.preset, True))
    off, proc_off = build_model(settings_for(args.preset, False))
    batch_on = real_batch(proc_on, args.batch, args.frames, args.chip)
    batch_off = real_batch(proc_off, args.batch, args.frames, args.chip)
    assert torch.equal(batch_on["input_ids"], batch_off["input_ids"]), "both models must see the same tokens"
    on.train()
    off.train()
    n_on = sum(p.numel() for p in on.parameters())
    n_off = sum(p.numel() for p in off.parameters())
    print(f"preset={args.preset} threads={torch.get_num_threads()} batch={args.batch} frames={args.frames} "
          f"chip={args.chip}px seq={batch_on['input_ids'].shape[1]} params on={n_on:,} off={n_off:,}")
    for _ in range(args.warmup):
        step(on, batch_on)
        step(off, batch_off)
    t_on: list[float] = []
    t_off: list[float] = []
    for i in range(args.steps):
        pair = [(on, batch_on, t_on), (off, batch_off, t_off)]
        if i % 2:
            pair.reverse()  # ABBA: alternate who goes first
        for model, batch, times in pair:
            times.append(step(model, batch))
    m_on, m_off = statistics.median(t_on), statistics.median(t_off)
    pair = statistics.median(a / b for a, b in zip(t_on, t_off, strict=True))
    print(f"forward+backward step, median: LAPE on {m_on * 1e3:.1f} ms, off {m_off * 1e3:.1f} ms; "
          f"fastest: on {min(t_on) * 1e3:.1f} ms, off {min(t_off) * 1e3:.1f} ms")
    print(f"ratio of medians {m_on / m_off:.3f}, of fastest steps {min(t_on) / min(t_off):.3f}")
    print(f"LAPE on/off step-time ratio (median of {len(t_on)} side-by-side pairs): {pair:.3f}  (target ≤ 1.05)")


if __name__ == "__main__":
    main()
