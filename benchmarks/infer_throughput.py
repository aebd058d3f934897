"""`agrivlm infer` throughput: chips/s at several batch sizes, measured side by side in one run.

The same checkpoint (the tiny model as built, saved once; its random weights answer with junk that runs to
``--max-new-tokens``, so every batch size generates the same number of tokens) runs ``--task fields`` over
the embedded Sentinel-2 sample (36 overlapping 32-px chips with stride 16, 8 clear frames each). Batch sizes
alternate over ``--reps`` rounds so that drift in machine load hits all of them; per batch size it prints
the median chips/s of the chip loop (reading, frames, bands, encoding, generation, journal), the share of
that time the model was generating (near 1: chip reading and preparation are hidden behind the model by
the prefetch thread), and the speed-up over the first batch size.

    python benchmarks/infer_throughput.py                        # batch sizes 1 and 8
    python benchmarks/infer_throughput.py --batch-sizes 1,4,8,16 --reps 3 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from agrivlm.infer.batch import run_inference
from agrivlm.infer.config import BandConfig, InputConfig, default_frames, save_input_config
from agrivlm.infer.generate import Predictor
from agrivlm.model import build_model
from agrivlm.sample import sample_cloud_mask_dir, sample_ndvi_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-frames", type=int, default=8)
    parser.add_argument("--stride", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/infer_throughput.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        model, processor = build_model()
        model.save_pretrained(ckpt)
        processor.save_pretrained(ckpt)
        config = InputConfig(stride=args.stride, min_frames=1,
                             frames=default_frames().model_copy(update={"max_frames": args.max_frames}),
                             bands=BandConfig(preset="ndvi", low=[-0.2], high=[1.0]))
        save_input_config(config, ckpt)
        predictor = Predictor.load(ckpt, device=args.device, max_new_tokens=args.max_new_tokens)
        runs: dict[int, list[dict[str, float]]] = {b: [] for b in sizes}
        for rep in range(args.reps):
            for b in sizes if rep % 2 == 0 else reversed(sizes):
                out = Path(tmp) / f"run_{b}_{rep}" / "pred.gpkg"
                report = run_inference([str(sample_ndvi_dir())], ckpt, out, masks=[str(sample_cloud_mask_dir())],
                                       batch_size=b, max_new_tokens=args.max_new_tokens, progress=False,
                                       predictor=predictor)
                runs[b].append({"chips": report.processed, "seconds": report.seconds,
                                "chips_per_s": report.chips_per_second,
                                "model_share": report.model_seconds / report.seconds})
    base = statistics.median(r["chips_per_s"] for r in runs[sizes[0]])
    result = {"device": str(predictor.device), "threads": torch.get_num_threads(),
              "max_new_tokens": args.max_new_tokens, "max_frames": args.max_frames,
              "chips": runs[sizes[0]][0]["chips"], "batch_sizes": {}}
    print(f"{result['chips']} chips, {args.max_frames} frames, {args.max_new_tokens} new tokens each, "
          f"{result['threads']} torch thread(s), {result['device']}")
    for b in sizes:
        rate = statistics.median(r["chips_per_s"] for r in runs[b])
        share = statistics.median(r["model_share"] for r in runs[b])
        result["batch_sizes"][b] = {"chips_per_s": rate, "model_share": share, "speedup": rate / base, "runs": runs[b]}
        print(f"batch {b:3d}: {rate:7.2f} chips/s  model busy {share:5.1%} of the loop  x{rate / base:.2f} "
              f"vs batch {sizes[0]}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
