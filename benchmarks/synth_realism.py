"""How realistic and how fast are `agrivlm synth` scenes? Three checks, one run, figures in the README.

1. **Phenology recovery.** The recipes' own phenology extraction (``agrivlm.recipes.build.prepare`` with no
   labels: cloud-masked parcel means, gap fill, Savitzky–Golay, TIMESAT thresholds) runs on synthetic
   scenes of every region; its green-up, peak and senescence dates are compared with the generator's
   exact key dates (``truth/key_dates.csv``) per field and season: median and 90th-percentile |error| in
   days, and the share of true seasons the extraction found.
2. **Synthetic vs real.** ``synth_vs_real.png``: the embedded real sample's (Slovenia) cloud-masked NDVI
   per parcel by day of year, per class, beside a Central-European synthetic scene's; their parcel-size
   histograms.
3. **Speed and memory.** ``agrivlm synth`` in a child process: wall time and peak resident memory for
   25 km² and 100 km² of 5 bands over two years (``--quick``: 4 and 25 km²) — memory should not grow
   with the area (window-by-window writing).

Usage: ``python benchmarks/synth_realism.py [--quick] [--out benchmarks/results]`` → ``synth_realism.json`` and
``synth_vs_real.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from agrivlm.geo.dates import to_days
from agrivlm.recipes.build import prepare
from agrivlm.recipes.config import load_recipe
from agrivlm.synth import SceneSpec, write_scene

KEYS = ("green_up", "peak", "senescence")
CLASSES = ("cultivated land", "grassland", "forest")


def _phenology_recipe(path: Path, stack: Path, masks: Path, parcels: Path, id_column: str, class_column: str,
                      season_start: str = "01-01") -> Path:
    """A growth-stages recipe over one stack, every chip in train: what ``prepare`` needs to run the phenology."""
    path.write_text(f"""
name: realism_{path.stem}
seed: 0
source:
  stack: {stack}
  masks: {masks}
  parcels: {parcels}
  id_column: {id_column}
  class_column: {class_column}
chips: {{size: 32, stride: 32}}
split: {{block_px: 1000, buffer_px: 0, fractions: {{train: 1.0, val: 0.0, test: 0.0}}, seed: 0}}
phenology: {{classes: [cultivated land, grassland, forest], season_start: "{season_start}"}}
tasks:
  growth_stages: {{}}
""")
    return path


def _recipe(scene: Path, folder: Path, season_start: str) -> Path:
    return _phenology_recipe(folder / f"{scene.name}.yaml", scene / "stack", scene / "cloud_mask",
                             scene / "parcels.gpkg", "field_id", "class", season_start)


def phenology_recovery(scenes: list[Path], work: Path) -> dict[str, object]:
    """Errors (days) of the recipes' extraction against the generator's key dates, per region and overall."""
    rows = []
    for scene in scenes:
        meta = json.loads((scene / "scene.json").read_text())
        recipe = _recipe(scene, work, meta["season_start"])
        prep = prepare(load_recipe(recipe), recipe.parent, progress=False)
        truth = pd.read_csv(scene / "truth" / "key_dates.csv", dtype=str, keep_default_na=False)
        truth = truth[~truth.season.str.contains("-")]  # the main season of each window (what TIMESAT finds)
        for t in truth.itertuples(index=False):
            fp = prep.phenology.get(t.field_id)
            season = None if fp is None else next((s for s in fp.seasons if s.label == t.season), None)
            row = {"region": meta["spec"]["region"], "field_id": t.field_id, "season": t.season, "crop": t.crop,
                   "found": season is not None}
            if season is not None:
                derived = {"green_up": season.sos, "peak": season.pos, "senescence": season.senescence}
                for k in KEYS:
                    row[k] = abs(float(derived[k]) - float(to_days(np.datetime64(getattr(t, k)))))
            rows.append(row)
    frame = pd.DataFrame(rows)

    def stats(f: pd.DataFrame) -> dict[str, object]:
        out: dict[str, object] = {"seasons": len(f), "found": round(float(f.found.mean()), 3)}
        for k in KEYS:
            e = f.loc[f.found, k].dropna()
            out[k] = {"median_days": round(float(e.median()), 1), "p90_days": round(float(e.quantile(0.9)), 1)}
        return out

    perennial = frame.crop.isin(["grassland", "forest", "fallow"])
    return {"all": stats(frame), **{r: stats(g) for r, g in frame.groupby("region")},
            # grassland's truth season is the growth before the first cut; TIMESAT's is the year's highest
            # regrowth to the autumn decline, so the two differ by definition: shown apart
            "arable crops": stats(frame[~perennial]), "grassland, forest, fallow": stats(frame[perennial]),
            **{f"crop {c}": stats(g) for c, g in frame.groupby("crop")}}


def _curves(prep: object, by_doy: bool = True) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    out: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {c: [] for c in CLASSES}
    for fp in prep.phenology.values():  # type: ignore[attr-defined]
        if fp.cls in out:
            days = fp.obs_days
            doy = (np.asarray(days) - to_days(np.datetime64("1970-01-01"))) % 365.25
            out[fp.cls].append((doy if by_doy else days, fp.obs_values))
    return out


def synth_vs_real(scene: Path, work: Path, png: Path) -> dict[str, object]:
    """The plot of real vs synthetic curves and parcel sizes; returns the parcel-size medians."""
    import geopandas as gpd
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from agrivlm.sample import SAMPLE_ROOT

    real_recipe = _phenology_recipe(work / "real.yaml", SAMPLE_ROOT / "ndvi", SAMPLE_ROOT / "cloud_mask",
                                    SAMPLE_ROOT / "parcels.gpkg", "index", "LULC_NAME")
    real = prepare(load_recipe(real_recipe), work, progress=False)
    syn = prepare(load_recipe(_recipe(scene, work, "01-01")), work, progress=False)
    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    for row, (name, prep) in enumerate((("real: Slovenia sample", real), ("synthetic: central_europe", syn))):
        curves = _curves(prep)
        for col, cls in enumerate(CLASSES):
            ax = axes[row, col]
            allx, ally = [], []
            for x, y in curves[cls][:60]:
                ok = np.isfinite(y)
                ax.plot(x[ok], y[ok], ".", ms=2, alpha=0.25, color="tab:green")
                allx.append(x[ok])
                ally.append(y[ok])
            if allx:
                x, y = np.concatenate(allx), np.concatenate(ally)
                bins = np.arange(0, 370, 15)
                idx = np.digitize(x, bins)
                med = [np.median(y[idx == i]) if (idx == i).sum() > 3 else np.nan for i in range(1, len(bins))]
                ax.plot(bins[:-1] + 7.5, med, "k-", lw=2, label="median")
            ax.set_title(f"{name}\n{cls} ({len(curves[cls])} parcels)", fontsize=9)
            ax.set_ylim(-0.1, 1.0)
            ax.set_xlabel("day of year")
            ax.set_ylabel("NDVI (cloud-masked parcel mean)")
    real_parcels = gpd.read_file(SAMPLE_ROOT / "parcels.gpkg")
    syn_parcels = gpd.read_file(scene / "parcels.gpkg")
    fields = ["cultivated land", "grassland"]
    sizes = {
        "real (Slovenia sample)": real_parcels[real_parcels.LULC_NAME.isin(fields)].area / 1e4,
        "synthetic central_europe": syn_parcels[syn_parcels["class"].isin(fields)].area / 1e4,
    }
    bins = np.logspace(-2, 2, 30)
    for row, (name, ha) in enumerate(sizes.items()):
        ax = axes[row, 3]
        ax.hist(ha, bins=bins, color="tab:blue" if row == 0 else "tab:orange")
        ax.set_xscale("log")
        ax.set_title(f"{name}: field size, median {np.median(ha):.2f} ha (n={len(ha)})", fontsize=9)
        ax.set_xlabel("ha")
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    return {k: round(float(np.median(v)), 3) for k, v in sizes.items()}


def speed(areas: list[float], work: Path) -> list[dict[str, object]]:
    """Wall time and peak memory of ``agrivlm synth --bands s2`` in a child process per area."""
    out = []
    for area in areas:
        target = work / f"speed_{area:g}"
        code = (
            "import resource, time, json, sys\n"
            "from agrivlm.synth import SceneSpec, write_scene\n"
            "t = time.perf_counter()\n"
            f"s = write_scene({str(target)!r}, SceneSpec(area_km2={area}, seed=0, bands='s2'))\n"
            "print(json.dumps({'seconds': time.perf_counter() - t, 'dates': len(s['dates']),"
            " 'px': s['width'] * s['height'], 'parcels': s['n_parcels'],"
            " 'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n"
        )
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        rec = json.loads(res.stdout.strip().splitlines()[-1])
        size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
        rec.update(area_km2=area, bands=5, output_mb=round(size / 1e6, 1),
                   seconds=round(rec["seconds"], 1), peak_rss_mb=round(rec["peak_rss_mb"], 1))
        print(f"  {area:g} km²: {rec['dates']} dates × 5 bands, {rec['parcels']} parcels → {rec['seconds']} s, "
              f"peak RSS {rec['peak_rss_mb']} MB, {rec['output_mb']} MB written")
        out.append(rec)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer and smaller scenes")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        scenes = []
        area = 1.0 if args.quick else 4.0
        for region in ("central_europe", "pannonian", "corn_belt", "mato_grosso"):
            for seed in range(1 if args.quick else 2):
                scene = work / f"{region}_{seed}"
                north = ("2021-01-01", "2022-12-31")
                start, end = ("2021-06-01", "2023-07-31") if region == "mato_grosso" else north
                write_scene(scene, SceneSpec(region=region, area_km2=area, seed=100 + seed, start=start, end=end))
                scenes.append(scene)
        print("1. phenology recovery (recipes' extraction vs the generator's key dates, |error| in days)")
        recovery = phenology_recovery(scenes, work)
        for name, s in recovery.items():
            cells = "  ".join(f"{k} {s[k]['median_days']}/{s[k]['p90_days']}" for k in KEYS)  # type: ignore[index]
            print(f"  {name:26s} seasons {s['seasons']:4d} found {s['found']:.2f}  median/p90: {cells}")  # type: ignore[index]
        print("2. synthetic vs real")
        sizes = synth_vs_real(scenes[0], work, args.out / "synth_vs_real.png")
        print(f"  median field size (ha): {sizes}  → {args.out / 'synth_vs_real.png'}")
        print("3. speed and memory of agrivlm synth --bands s2 (two years)")
        runs = speed([4.0, 25.0] if args.quick else [25.0, 100.0], work)
    result = {"quick": args.quick, "phenology_recovery": recovery, "median_field_ha": sizes, "speed": runs,
              "seconds": round(time.perf_counter() - t0, 1)}
    (args.out / "synth_realism.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"→ {args.out / 'synth_realism.json'} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
