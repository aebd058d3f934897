"""PNGs of a recipe run: parcel index curves with their derived stage dates, and the split map."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import geopandas as gpd  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.patches import Rectangle as MplRectangle  # noqa: E402
from rasterio.windows import Window  # noqa: E402

from agrivlm.geo.coords import GeoGrid  # noqa: E402
from agrivlm.geo.dates import from_days, to_days  # noqa: E402
from agrivlm.recipes.phenology import FieldPhenology  # noqa: E402

#: Stage colours (background bands).
STAGE_COLORS = {
    "dormant": "#d9d9d9", "green-up": "#a1d99b", "peak": "#31a354", "senescence": "#fdae6b", "harvested": "#c49c94",
}
SPLIT_COLORS = {"train": "#1f77b4", "val": "#ff7f0e", "test": "#2ca02c"}


def pick_parcels(phenology: dict[str, FieldPhenology], n: int) -> list[FieldPhenology]:
    """Up to ``n`` parcels with seasons: the largest of each class first, then the next largest."""
    ranked = sorted((fp for fp in phenology.values() if fp.seasons), key=lambda fp: (-fp.n_px, fp.field_id))
    chosen: list[FieldPhenology] = []
    for fp in ranked:
        if fp.cls not in {c.cls for c in chosen}:
            chosen.append(fp)
    chosen += [fp for fp in ranked if fp not in chosen]
    return chosen[:n]


def _month_ticks(first: float, last: float, every: int = 3) -> tuple[list[float], list[str]]:
    """Ticks on the first day of every ``every``-th month between two days (float days since 1970)."""
    start = np.datetime64(str(from_days(first))[:7], "M")
    end = np.datetime64(str(from_days(last))[:7], "M") + 1
    months = np.arange(start, end + 1, dtype="datetime64[M]")
    months = months[(months.astype(int) % every) == 0]
    pos = [float(to_days(m.astype("datetime64[D]"))) for m in months]
    return pos, [str(m) for m in months]


def plot_phenology(
    parcels: Sequence[FieldPhenology], path: Path, index_name: str = "NDVI", title: str = ""
) -> Path:
    """Curves of ``parcels`` with stage bands and SOS/POS/senescence/EOS lines; written to ``path``.

    The x axis is in days (ticks labelled by month): plain floats keep the plot fast.
    """
    n = max(len(parcels), 1)
    fig, axes = plt.subplots(n, 1, figsize=(11, 2.4 * n + 0.8), sharex=True, squeeze=False)
    for ax, fp in zip(axes[:, 0], parcels, strict=False):
        for s in fp.seasons:
            edges = [s.start, s.sos, s.peak_start, s.senescence, s.eos, s.end]
            stages = ["dormant", "green-up", "peak", "senescence", s.post_stage]
            for a, b, stage in zip(edges[:-1], edges[1:], stages, strict=True):
                a, b = min(max(a, s.start), s.end), min(max(b, s.start), s.end)
                if b > a:
                    ax.axvspan(a, b, color=STAGE_COLORS[stage], alpha=0.35, lw=0)
            for day, style, label in ((s.sos, "--", "SOS"), (s.pos, "-", "POS"), (s.senescence, ":", "senescence"),
                                      (s.eos, "-.", "EOS")):
                ax.axvline(day, color="k", ls=style, lw=0.8)
                ax.text(day, 0.98, label, transform=ax.get_xaxis_transform(), fontsize=6, rotation=90, va="top",
                        ha="right")
        masked = ~np.isfinite(fp.obs_values) & np.isfinite(fp.obs_unmasked)
        ax.plot(fp.obs_days[masked], fp.obs_unmasked[masked], "x", color="0.5", ms=4, label="cloud-masked (dropped)")
        ax.plot(fp.obs_days, fp.obs_values, "o", color="tab:blue", ms=3, label=f"clear {index_name}")
        ax.plot(fp.grid, fp.smooth, "-", color="tab:green", lw=1.5, label="gap-filled, Savitzky–Golay")
        ax.set_ylabel(index_name)
        ax.set_title(f"field {fp.field_id} ({fp.cls}, {fp.n_px} px)", fontsize=9, loc="left")
    if parcels:
        first = min(float(fp.obs_days.min()) for fp in parcels)
        last = max(float(fp.obs_days.max()) for fp in parcels)
        pos, labels = _month_ticks(first, last)
        axes[-1, 0].set_xticks(pos, labels, fontsize=7)
        axes[-1, 0].set_xlim(first - 10, last + 10)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    handles += [Patch(color=c, alpha=0.35, label=s) for s, c in STAGE_COLORS.items()]
    fig.legend(handles, labels + list(STAGE_COLORS), loc="upper right", fontsize=7, ncol=4)
    if title:
        fig.suptitle(title, fontsize=10, x=0.01, ha="left")
    fig.subplots_adjust(left=0.07, right=0.99, bottom=0.06, top=1 - 0.75 / (2.4 * n + 0.8), hspace=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return path


def plot_splits(
    grid: GeoGrid, windows: dict[str, Window], splits: dict[str, str], excluded: Sequence[Window],
    parcels: gpd.GeoDataFrame, path: Path,
) -> Path:
    """The chip grid coloured by split (excluded buffer chips hatched) over the parcel outlines."""
    fig, ax = plt.subplots(figsize=(6, 6))
    for geom in parcels.geometry:
        for part in getattr(geom, "geoms", [geom]):
            x, y = grid.crs_to_pixel(*np.asarray(part.exterior.coords).T)
            ax.plot(x, y, color="0.4", lw=0.6)
    for win in excluded:
        ax.add_patch(MplRectangle((win.col_off, win.row_off), win.width, win.height, fill=False, hatch="//",
                                  ec="0.6", lw=0.5))
    for cid, win in windows.items():
        color = SPLIT_COLORS[splits[cid]]
        ax.add_patch(MplRectangle((win.col_off, win.row_off), win.width, win.height, fc=color, alpha=0.15, ec=color))
    ax.set_xlim(0, grid.width)
    ax.set_ylim(grid.height, 0)
    ax.set_aspect("equal")
    ax.set_xlabel("column (px)")
    ax.set_ylabel("row (px)")
    ax.legend(handles=[Patch(color=c, alpha=0.4, label=s) for s, c in SPLIT_COLORS.items()]
              + [Patch(fill=False, hatch="//", label="excluded (buffer)")], fontsize=7, loc="lower right")
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.08, top=0.98)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)
    return path
