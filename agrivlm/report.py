"""Figures and the HTML report of a quickstart run (or any run with the same artifacts).

The report is one HTML file with inline CSS, no script and no external resource, that shows the PNGs
written beside it (relative links), so the folder can be zipped, mailed or opened offline.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import geopandas as gpd  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from rasterio.features import rasterize  # noqa: E402
from rasterio.windows import Window  # noqa: E402

from agrivlm.geo.stack import Stack  # noqa: E402
from agrivlm.io import atomic_path  # noqa: E402
from agrivlm.schema import GROWTH_STAGES  # noqa: E402

#: Stage colours shared by every figure.
STAGE_COLORS = {
    "dormant": "#bdbdbd", "green-up": "#a1d99b", "peak": "#238b45", "senescence": "#fd8d3c", "harvested": "#8c6d31",
}


def _save(fig: Any, path: Path, dpi: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, metadata={"Software": None})
    plt.close(fig)
    return path


def clear_fraction_per_date(stack: Stack) -> np.ndarray:
    """``(T,)`` fraction of pixels with data and no cloud on each date (reads the stack once, by date)."""
    window = Window(0, 0, stack.grid.width, stack.grid.height)
    out = np.empty(len(stack.steps), dtype=np.float64)
    for i in range(len(stack.steps)):
        _, nodata, mask = stack.read_window(window, steps=[i])
        out[i] = float((~nodata[0].any(axis=0) & ~mask[0]).mean())
    return out


def plot_stack_overview(stack: Stack, path: Path) -> Path:
    """The stack's dates as a timeline of clear-sky fractions, with its footprint in the title."""
    clear = clear_fraction_per_date(stack)
    times = stack.times.astype("datetime64[D]").astype(object)
    fig, ax = plt.subplots(figsize=(11, 2.6))
    ax.bar(times, clear, width=4, color=["tab:green" if c > 0.9 else "tab:orange" if c > 0.3 else "tab:red"
                                         for c in clear])
    cloudy = clear == 0
    ax.plot(np.array(times)[cloudy], np.zeros(int(cloudy.sum())), "x", color="tab:red", label="fully cloudy")
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel("clear fraction")
    lon, lat = stack.grid.norm_to_lonlat(0.5, 0.5)
    minx, miny, maxx, maxy = stack.grid.bounds
    ax.set_title(
        f"{len(times)} dates {times[0]} → {times[-1]} · {stack.crs.to_string()} · "
        f"{(maxx - minx) / 1000:.2f} × {(maxy - miny) / 1000:.2f} km around {float(lat):.4f}°N {float(lon):.4f}°E",
        fontsize=9, loc="left",
    )
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_fields_map(
    stack: Stack,
    frame: int,
    truth: gpd.GeoDataFrame,
    pred: gpd.GeoDataFrame | None,
    path: Path,
    title: str = "",
) -> Path:
    """Predicted (magenta) vs true (cyan) field boundaries over one date of the stack's first band."""
    window = Window(0, 0, stack.grid.width, stack.grid.height)
    data, _, mask = stack.read_window(window, steps=[frame])
    img = np.ma.masked_invalid(data[0, 0])
    minx, miny, maxx, maxy = stack.grid.bounds
    fig, ax = plt.subplots(figsize=(7.2, 7))
    shown = ax.imshow(img, cmap="YlGn", extent=(minx, maxx, miny, maxy), vmin=np.nanpercentile(img.filled(np.nan), 2),
                      vmax=np.nanpercentile(img.filled(np.nan), 98), interpolation="nearest")
    if mask[0].any():
        ax.imshow(np.ma.masked_where(~mask[0], mask[0]), cmap="Greys", alpha=0.35, extent=(minx, maxx, miny, maxy))
    fig.colorbar(shown, ax=ax, shrink=0.7, label=stack.band_names[0])
    truth.to_crs(stack.crs).boundary.plot(ax=ax, color="cyan", linewidth=1.2)
    handles = [Line2D([], [], color="cyan", label=f"true fields ({len(truth)})")]
    if pred is not None and len(pred):
        pred.to_crs(stack.crs).boundary.plot(ax=ax, color="magenta", linewidth=1.2, linestyle="--")
        handles.append(Line2D([], [], color="magenta", ls="--", label=f"predicted ({len(pred)})"))
    ax.set_xlim(minx, maxx)
    ax.set_ylim(miny, maxy)
    ax.ticklabel_format(useOffset=False, style="plain")
    ax.set_xlabel(f"x ({stack.crs.to_string()}, m)")
    ax.set_ylabel("y (m)")
    ax.legend(handles=handles, loc="lower left", fontsize=8, framealpha=0.9)
    ax.set_title(title or f"{stack.band_names[0]} on {str(stack.times[frame])[:10]}", fontsize=9, loc="left")
    fig.tight_layout()
    return _save(fig, path)


def field_curve(stack: Stack, geometry: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the first band inside ``geometry`` on each date, over clear pixels: ``(times, values)``."""
    window = Window(0, 0, stack.grid.width, stack.grid.height)
    inside = rasterize([(geometry, 1)], out_shape=(stack.grid.height, stack.grid.width),
                       transform=stack.transform, fill=0, all_touched=False).astype(bool)
    data, nodata, mask = stack.read_window(window)
    ok = inside[None] & ~nodata[:, 0] & ~mask
    sums = np.where(ok, data[:, 0], 0.0).sum(axis=(1, 2))
    counts = ok.sum(axis=(1, 2))
    values = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return stack.times, values


def plot_stage_curves(
    stack: Stack,
    fields: gpd.GeoDataFrame,
    id_column: str,
    reference: pd.DataFrame,
    predicted: pd.DataFrame | None,
    path: Path,
    max_fields: int = 4,
) -> Path:
    """NDVI curves of a few fields with reference (●, top row) and predicted (▲, second row) stages per date.

    ``reference`` / ``predicted`` are stage tables (``field_id, date, stage``).
    """
    ids = [i for i in reference["field_id"].astype(str).unique() if i in set(fields[id_column].astype(str))]
    ids = ids[:max_fields]
    n = max(len(ids), 1)
    fig, axes = plt.subplots(n, 1, figsize=(11, 2.3 * n + 0.6), sharex=True, squeeze=False)
    geoms = dict(zip(fields[id_column].astype(str), fields.to_crs(stack.crs).geometry, strict=True))
    for ax, fid in zip(axes[:, 0], ids, strict=False):
        times, values = field_curve(stack, geoms[fid])
        days = times.astype("datetime64[D]").astype(object)
        ok = np.isfinite(values)
        ax.plot(np.array(days)[ok], values[ok], "o-", ms=3, lw=1, color="tab:blue", label="clear mean")
        for row, (table, marker, label) in enumerate(((reference, "o", "reference"), (predicted, "^", "predicted"))):
            if table is None:
                continue
            sub = table[table["field_id"].astype(str) == fid]
            for stage in GROWTH_STAGES:
                pts = sub[sub["stage"] == stage]
                if len(pts):
                    ax.plot(pd.to_datetime(pts["date"]).dt.date, np.full(len(pts), 1.02 + 0.06 * row), marker,
                            color=STAGE_COLORS[stage], ms=5, transform=ax.get_xaxis_transform(), clip_on=False)
            ax.text(1.002, 1.02 + 0.06 * row, label, transform=ax.transAxes, fontsize=7, va="center")
        ax.set_ylabel(stack.band_names[0])
        ax.set_title(f"field {fid}", fontsize=8, loc="left", pad=18)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], marker="o", ls="", color=c, label=s) for s, c in STAGE_COLORS.items()]
    fig.legend(handles=handles, loc="upper right", fontsize=7, ncol=5)
    fig.tight_layout(rect=(0, 0, 0.97, 0.96))
    return _save(fig, path)


@dataclass
class Section:
    """One section of the report: a heading, paragraphs, figures (relative PNG paths), tables, commands."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.6em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
img{max-width:100%;border:1px solid #eee}figure{margin:1em 0}figcaption{font-size:.85em;color:#555}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}td,th{border:1px solid #ddd;padding:.25em .6em;
text-align:right}th{background:#f5f5f5}td:first-child,th:first-child{text-align:left}
pre{background:#f6f8fa;padding:.7em;overflow-x:auto;font-size:.85em}.note{background:#fff8e1;padding:.6em 1em;
border-left:4px solid #f0b400}
"""


def _table_html(df: pd.DataFrame) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "—" if not np.isfinite(v) else f"{v:.4g}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in df.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def write_report(path: Path, title: str, intro: Sequence[str], sections: Sequence[Section],
                 facts: dict[str, Any] | None = None) -> Path:
    """Write the HTML report atomically; figures are referenced relative to ``path``'s folder."""
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts += [f"<p class='note'>{p}</p>" for p in intro]
    for sec in sections:
        parts.append(f"<h2>{html.escape(sec.title)}</h2>")
        parts += [f"<p>{p}</p>" for p in sec.paragraphs]
        for src, caption in sec.figures:
            parts.append(f"<figure><img src='{html.escape(src)}' alt='{html.escape(caption)}'>"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        for caption, df in sec.tables:
            parts.append(f"<p><b>{html.escape(caption)}</b></p>{_table_html(df)}")
        if sec.commands:
            parts.append("<pre>" + html.escape("\n".join(sec.commands)) + "</pre>")
    if facts:
        parts.append("<h2>Run facts</h2><pre>" + html.escape(json.dumps(facts, indent=2, default=str)) + "</pre>")
    parts.append("</body></html>")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(parts), encoding="utf-8")
    return path
