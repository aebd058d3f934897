"""``agrivlm synth``: write a synthetic scene (GeoTIFF stack, masks, parcels, exact truth)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from agrivlm.synth.regions import REGIONS
from agrivlm.synth.scene import BAND_SETS, SceneSpec, write_scene

#: The choices of --region and --bands (usage errors, exit 2); a test keeps them equal to REGIONS and BAND_SETS.
RegionChoice = Literal["central_europe", "pannonian", "corn_belt", "mato_grosso"]
BandSetChoice = Literal["ndvi", "s2"]


def synth(
    out: Annotated[Path, typer.Option("--out", "-o", help="Scene folder to write (stack/, cloud_mask/, truth/ …).")],
    area_km2: Annotated[float, typer.Option("--area-km2", help="Scene area in km² (a square).")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed: the same seed and options give byte-identical files.")] = 0,
    region: Annotated[RegionChoice, typer.Option(help=f"Region preset: {' | '.join(REGIONS)}.")] = "central_europe",
    bands: Annotated[BandSetChoice, typer.Option(
        help=f"Band set: {' | '.join(BAND_SETS)} (s2: B02 B03 B04 B08 B11).")] = "ndvi",
    start: Annotated[str, typer.Option(help="First acquisition day, YYYY-MM-DD.")] = "2021-01-01",
    end: Annotated[str, typer.Option(help="Last acquisition day, YYYY-MM-DD.")] = "2022-12-31",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing scene, once the new one is complete.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Write a synthetic agricultural scene exactly as a user's own data would arrive, with its exact truth."""
    from tqdm import tqdm

    spec = SceneSpec(region=region, area_km2=area_km2, seed=seed, bands=bands, start=start, end=end)
    bars: list[tqdm] = []  # made at the first window, so a refused run prints only its error line

    def step(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, unit="window·date", disable=not progress, desc=f"synth {region} seed {seed}"))
        bars[0].update(done - bars[0].n)

    try:
        summary = write_scene(out, spec, overwrite=overwrite, progress=step)
    finally:
        for bar in bars:
            bar.close()
    dates, names = summary["dates"], summary["band_names"]
    assert isinstance(dates, list) and isinstance(names, list)
    typer.echo(f"{out}: {len(dates)} dates {dates[0][:10]} → {dates[-1][:10]}, "
               f"{summary['width']}×{summary['height']} px {summary['crs']}, {summary['n_parcels']} parcels "
               f"({summary['n_fields']} fields), bands {' '.join(names)}")
