"""``agrivlm recipe build``: recipe YAML → JSONL shards, manifest, reference tables, plots.

Steps: open the stack and the parcel layer (reprojected to the stack's CRS) → chip grid → geographic
split → one scan of the stack (chip clear fractions, parcel index curves) → phenology per parcel (+
labels) → per chip: parcels clipped to it, land-cover classes → each enabled family's records → the
stage mixture (or every record) per split → outputs. The outputs are written into a temporary folder
beside ``OUT`` that replaces it only when complete.

``OUT`` holds::

    shards/{train,val,test}-NNNNN.jsonl   records (agrivlm.recipes.schema), byte-identical for recipe + seed
    manifest.json                         counts per family/task/split, seeds, sources + SHA-256, chips,
                                          split of every record, mixture proportions, shard checksums
    tables/growth_stages.csv              agrivlm.schema.STAGE_COLUMNS (labels win over derived stages)
    tables/key_dates.csv                  agrivlm.schema.KEY_DATE_COLUMNS
    tables/phenology.csv                  every detected season in detail (SOS, peak start, POS, ...)
    tables/parcels.gpkg                   layers ``parcels`` (clipped to the stack) and ``chip_parcels``
    plots/phenology.png, plots/splits.png

A recipe with ``sources:`` (several real sources, ``synth:`` scene folders) prepares each source on its own
(chip ids ``NAME/r000000_c000000``; a scene dealt whole to a split, or blocks within it), pools the records
of all, shares each mixture component among the entries by weight, and writes the tables and plots of
each source under ``tables/NAME/`` and ``plots/NAME/``.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import numpy.typing as npt
import pandas as pd
import shapely
from rasterio.features import rasterize
from rasterio.windows import Window
from tqdm.auto import tqdm

from agrivlm.errors import ConfigError
from agrivlm.geo.chips import chip_id as make_chip_id
from agrivlm.geo.chips import chip_windows
from agrivlm.geo.coords import norm_box
from agrivlm.geo.dates import day_str, season_windows
from agrivlm.geo.rasters import RasterPath, network_stamp
from agrivlm.geo.stack import Stack, open_stack
from agrivlm.io import atomic_dir, fixed_gpkg_date, sha256_file
from agrivlm.recipes.config import RecipeConfig, SceneSplitConfig, SourceConfig, load_recipe
from agrivlm.recipes.context import ChipContext, ParcelInChip, RecordFactory, select_frames
from agrivlm.recipes.families import builders
from agrivlm.recipes.mixture import MixReport, max_unique, mix
from agrivlm.recipes.phenology import (
    FieldPhenology,
    GrowthTruth,
    analyse_parcels,
    key_date_table,
    load_growth_truth,
    phenology_detail_table,
    season_of,
    stage_table,
    to_days,
)
from agrivlm.recipes.plot import pick_parcels, plot_phenology, plot_splits
from agrivlm.recipes.scan import IndexBands, StackScan, scan_stack
from agrivlm.recipes.schema import FAMILIES, SCHEMA_VERSION, SPLITS, Record, write_records
from agrivlm.recipes.sources import ClassRaster, ResolvedSource, load_parcels, resolve_sources
from agrivlm.recipes.splits import SplitAssignment, assign_splits
from agrivlm.recipes.state import BuildState
from agrivlm.sample import portable_spec, resolve_spec
from agrivlm.tasks.questions import UNKNOWN_CLASS

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Everything computed before records are made (reusable: tests build pools from it once)."""

    cfg: RecipeConfig
    base_dir: Path
    stack: Stack
    parcels: gpd.GeoDataFrame
    parcel_counts: dict[str, int]
    #: Every window of the chip grid and the split assignment over them.
    windows: list[Window]
    assignment: SplitAssignment
    scan: StackScan
    phenology: dict[str, FieldPhenology]
    state: BuildState
    chips: list[ChipContext] = field(default_factory=list)
    #: The source this was prepared from (files, labels, split rule, mixture weight).
    origin: ResolvedSource | None = None

    @property
    def source(self) -> ResolvedSource:
        """The source (the recipe's single ``source:`` when prepared without one)."""
        if self.origin is not None:
            return self.origin
        return resolve_sources(self.cfg, self.base_dir)[0]


def _frame_file(path: RasterPath, root: Path) -> str:
    """A frame's file as records name it: relative to the spec's folder, a remote file or STAC item by its name."""
    return os.path.relpath(path, root) if isinstance(path, Path) else path.name


def _spec_root(resolved: str) -> Path:
    path = Path(resolved)
    if path.is_dir():
        return path
    parts = path.parts
    for i, part in enumerate(parts):
        if any(ch in part for ch in "*?["):
            return Path(*parts[:i]) if i else Path(".")
    return path.parent


def _crs_text(crs: Any) -> str:
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_wkt()


def _clip_parcels(chip: ChipContext, parcels: gpd.GeoDataFrame) -> list[ParcelInChip]:
    footprint = chip.grid.footprint()
    hits = np.sort(parcels.sindex.query(footprint, predicate="intersects"))
    out = []
    for i in hits:
        geom = parcels.geometry.iloc[int(i)]
        clipped = shapely.intersection(geom, footprint)
        if clipped.geom_type not in ("Polygon", "MultiPolygon"):
            polys = [g for g in getattr(clipped, "geoms", []) if g.geom_type in ("Polygon", "MultiPolygon")]
            clipped = shapely.union_all(polys) if polys else shapely.Polygon()
        if clipped.is_empty or clipped.area <= 0:
            continue
        row = parcels.iloc[int(i)]
        out.append(ParcelInChip(
            row=int(i), field_id=str(row.field_id), cls=str(row.cls), geom=clipped,
            area_px=float(clipped.area / chip.pixel_area), box=norm_box(chip.grid, clipped),
            cut=bool(clipped.area < geom.area * (1.0 - 1e-6)),
        ))
    out.sort(key=lambda p: (round(p.box[1], 6), round(p.box[0], 6), p.field_id))
    return out


def fixed_split(windows: Sequence[Window], split: str) -> SplitAssignment:
    """Every chip in one split (a whole scene dealt to a split): no blocks, nothing excluded."""
    return SplitAssignment(blocks={}, chip_split=dict.fromkeys(range(len(windows)), split))


def prepare_all(cfg: RecipeConfig, base_dir: Path, progress: bool = True) -> list[Prepared]:
    """:func:`prepare` for every source of the recipe (``synth:`` globs expanded), in order."""
    return [prepare(cfg, base_dir, progress, origin) for origin in resolve_sources(cfg, base_dir)]


def _check_labels_meet_stack(
    truth: GrowthTruth, origin: ResolvedSource, base_dir: Path, times: npt.NDArray[np.datetime64],
    seasons: list[str], season_start: str,
) -> None:
    """A label table none of whose rows falls on the stack (no acquisition day, no season) is an error.

    Such a table answers nothing: a date or season format the recipe does not share, or another scene's
    labels. Tables that also cover other dates or years are fine.
    """
    labels = origin.labels
    if labels is None:
        return
    days = {day_str(t) for t in times}
    if labels.stages and truth.stage_labels and not any(d in days for _, d in truth.stage_labels):
        raise ConfigError(
            f"{resolve_spec(labels.stages, base_dir)}: no labelled date is an acquisition day of the stack "
            f"({day_str(times[0])} … {day_str(times[-1])}); check the date column and that the labels are this "
            "source's"
        )
    if labels.key_dates and truth.key_date_labels and not any(
        season_of(s) in seasons for _, s in truth.key_date_labels
    ):
        have = sorted({s for _, s in truth.key_date_labels})[:3]
        raise ConfigError(
            f"{resolve_spec(labels.key_dates, base_dir)}: seasons {have} are none of the stack's "
            f"({', '.join(seasons)}: the year a season starts in, from phenology.season_start {season_start})"
        )


def source_chip_id(origin: ResolvedSource | None, window: Window) -> str:
    """``r000000_c000000``, prefixed ``NAME/`` for a named source (so ids stay unique across scenes)."""
    cid = make_chip_id(window)
    return f"{origin.name}/{cid}" if origin is not None and origin.name is not None else cid


def _bounds(b: Any) -> str:
    return "(" + ", ".join(f"{float(v):.0f}" for v in b) + ")"


def _open_source_stack(src: SourceConfig, base_dir: Path) -> Stack:
    """The source's stack (and its masks), opened as the recipe specifies them."""
    return open_stack(
        resolve_spec(src.stack, base_dir),
        masks=resolve_spec(src.masks, base_dir) if src.masks else None,
        same_day=src.same_day,
        assets=src.assets,
        mask_assets=src.mask_assets,
        mask_values=src.mask_values,
    )


def _load_source_parcels(src: SourceConfig, base_dir: Path, stack: Stack) -> tuple[gpd.GeoDataFrame, dict[str, int]]:
    """The source's parcels in the stack's CRS; an error when none of them lies on the stack."""
    parcels, counts = load_parcels(
        src.parcels, base_dir, stack.crs, layer=src.parcel_layer, id_column=src.id_column,
        class_column=src.class_column, class_names=src.class_names,
    )
    footprint = stack.grid.footprint()
    if not len(parcels) or not parcels.intersects(footprint).any():
        what = "holds no parcels" if not len(parcels) else (
            f"has {len(parcels)} parcels, none on the stack (parcels {_bounds(parcels.total_bounds)}, stack "
            f"{_bounds(footprint.bounds)} in {stack.crs}); check the layer's CRS")
        raise ConfigError(f"{src.parcels}: {what}: every answer would be 'no fields'")
    return parcels, counts


def _assign(cfg: RecipeConfig, origin: ResolvedSource, windows: list[Window], h: int, w: int) -> SplitAssignment:
    """The split of every chip: the source's own split when it is dealt whole, else geographic blocks."""
    if origin.split is not None:
        return fixed_split(windows, origin.split)
    return assign_splits(
        windows, h, w, cfg.split.block_px, cfg.split.buffer_px,
        {str(k): v for k, v in cfg.split.fractions.items()}, cfg.split.seed,
    )


def _record_factory(cfg: RecipeConfig, src: SourceConfig, base_dir: Path, stack: Stack,
                    season_start: str) -> RecordFactory:
    """The factory of the source's records: the stack's files, dates and bands as records name them."""
    data_root = _spec_root(resolve_spec(src.stack, base_dir))
    mask_root = _spec_root(resolve_spec(src.masks, base_dir)) if src.masks else None
    return RecordFactory(
        recipe=cfg.name,
        seed=cfg.seed,
        data_spec=portable_spec(src.stack, base_dir),
        mask_spec=portable_spec(src.masks, base_dir) if src.masks else None,
        step_files=["+".join(_frame_file(s.path, data_root) for s in step.sources) for step in stack.steps],
        step_masks=[
            _frame_file(step.masks[0].path, mask_root) if step.masks[0] is not None and mask_root else None
            for step in stack.steps
        ],
        times=stack.times,
        crs=_crs_text(stack.crs),
        band_names=list(stack.band_names),
        assets=src.assets,
        mask_assets=src.mask_assets,
        mask_values=src.mask_values,
        season_start=season_start,
    )


def _add_chips(prep: Prepared, kept: list[int]) -> None:
    """Append the kept chips to ``prep`` (parcels clipped to each) and select their frames, overall and per season.

    ``kept`` holds the indices into ``prep.windows`` in scan order (column ``k`` of the scan's clear fractions).
    """
    c, state, days = prep.cfg.chips, prep.state, prep.state.days
    for k, i in enumerate(kept):
        win = prep.windows[i]
        cid = source_chip_id(prep.origin, win)
        chip = ChipContext(
            chip_id=cid, window=win, grid=prep.stack.grid.subgrid(win), split=prep.assignment.chip_split[i],
            clear=prep.scan.chip_clear[:, k],
        )
        chip.parcels = _clip_parcels(chip, prep.parcels)
        state.frames_all[cid] = select_frames(days, chip.clear, c.min_clear, c.max_frames, c.min_frames)
        for label, start, end in state.seasons:
            state.frames_season[(cid, label)] = select_frames(
                days, chip.clear, c.min_clear, c.max_frames, c.min_frames, span=(start, end)
            )
        prep.chips.append(chip)


def prepare(cfg: RecipeConfig, base_dir: Path, progress: bool = True, origin: ResolvedSource | None = None) -> Prepared:
    """Open a source, cut and split the chip grid, scan the stack, derive phenology, clip parcels.

    ``origin`` is one of :func:`~agrivlm.recipes.sources.resolve_sources`; without it the recipe must have
    exactly one source.
    """
    if origin is None:
        resolved = resolve_sources(cfg, base_dir)
        if len(resolved) != 1:
            raise ConfigError(f"recipe {cfg.name}: {len(resolved)} sources; prepare each (prepare_all)")
        origin = resolved[0]
    src = origin.source
    stack = _open_source_stack(src, base_dir)
    index = IndexBands.from_config(stack.band_names, src.band, src.normalized_difference)
    parcels, counts = _load_source_parcels(src, base_dir, stack)
    t, _, h, w = stack.shape
    windows = chip_windows(h, w, cfg.chips.size, cfg.chips.stride, cfg.chips.edge)
    assignment = _assign(cfg, origin, windows, h, w)
    kept = sorted(assignment.chip_split)
    scan = scan_stack(
        stack, index, [windows[i] for i in kept], list(parcels.geometry), cfg.phenology.tile_px, progress
    )
    phen = cfg.phenology
    if origin.season_start is not None and origin.season_start != phen.season_start:
        phen = phen.model_copy(update={"season_start": origin.season_start})
    phenology = analyse_parcels(scan, parcels, phen)
    truth = load_growth_truth(phenology, origin.labels, base_dir)
    days = to_days(stack.times)

    factory = _record_factory(cfg, src, base_dir, stack, phen.season_start)
    state = BuildState(
        seed=cfg.seed, factory=factory, scan=scan, truth=truth, phenology=phen, days=days,
        seasons=season_windows(float(days.min()), float(days.max()), phen.season_start),
    )
    _check_labels_meet_stack(truth, origin, base_dir, stack.times, [s[0] for s in state.seasons], phen.season_start)
    prep = Prepared(cfg, base_dir, stack, parcels, counts, windows, assignment, scan, phenology, state, origin=origin)
    _add_chips(prep, kept)
    return prep


@contextmanager
def class_maps(prep: Prepared) -> Iterator[Callable[[ChipContext], None]]:
    """A loader that fills ``chip.classes``/``chip.class_names`` from the class raster or the parcel classes.

    Class maps are loaded one chip at a time (and dropped after use) so memory stays bounded.
    """
    src, base = prep.source.source, prep.base_dir
    if src.class_raster is not None:
        words = sorted(set(src.class_raster.classes.values()))
        lut = {code: words.index(word) for code, word in src.class_raster.classes.items()}
        names = dict(enumerate(words))
        with ClassRaster(
            Path(resolve_spec(src.class_raster.path, base)), prep.stack.grid, src.class_raster.classes,
            tuple(src.class_raster.ignore),
        ) as raster:

            def load_raster(chip: ChipContext) -> None:
                codes = raster.read(chip.window)
                mapped = np.full(codes.shape, -1, dtype=np.int64)
                for code, word in lut.items():
                    mapped[codes == code] = word
                chip.classes, chip.class_names = mapped, names

            yield load_raster
        return
    words = sorted(set(prep.parcels.cls) - {UNKNOWN_CLASS})
    names = dict(enumerate(words))

    def load_parcels(chip: ChipContext) -> None:
        shape = (int(chip.window.height), int(chip.window.width))
        shapes = [(p.geom, words.index(p.cls)) for p in chip.parcels if p.cls != UNKNOWN_CLASS]
        chip.classes = (
            rasterize(shapes, out_shape=shape, transform=chip.grid.transform, fill=-1, dtype="int32").astype(np.int64)
            if shapes else np.full(shape, -1, dtype=np.int64)
        )
        chip.class_names = names

    yield load_parcels


def build_pools(prep: Prepared, progress: bool = True) -> dict[str, list[Record]]:
    """Every enabled family's records over every kept chip (chip by chip), each pool sorted by sample id."""
    registry = builders()
    families = prep.cfg.tasks.enabled()
    pools: dict[str, list[Record]] = {f: [] for f in families}
    with class_maps(prep) as load_classes:
        for chip in tqdm(prep.chips, desc="records", unit="chip", disable=not progress):
            if "general_rs" in families:
                load_classes(chip)
            for family in families:
                pools[family].extend(registry[family](prep.state, chip, getattr(prep.cfg.tasks, family)))
            chip.classes = None
    for family, records in pools.items():
        records.sort(key=lambda r: r.sample_id)
        dup = [sid for sid, n in Counter(r.sample_id for r in records).items() if n > 1]
        if dup:
            raise RuntimeError(f"{family}: sample id {dup[0]} made twice; a builder's subject key is not unique")
    return pools


def _component_pools(
    preps: Sequence[Prepared], records: list[Record], name: str
) -> tuple[dict[str, list[Record]], dict[str, float]]:
    """A component's pool split by source entry (``name@sources[i]``), with the entries' weights.

    One entry: the pool as it is, weight 1. Entries without records in this pool are left out, so the
    others share the component (none with records: the empty pool, which the mixture reports).
    """
    group_of = {chip.chip_id: prep.source.group for prep in preps for chip in prep.chips}
    weight_of = {prep.source.group: prep.source.weight for prep in preps}
    by_group: dict[str, list[Record]] = {}
    for r in records:
        by_group.setdefault(group_of[r.chip.chip_id], []).append(r)
    if len(weight_of) == 1 or not by_group:
        return {name: records}, {name: 1.0}
    groups = [g for g in weight_of if g in by_group]
    total = sum(weight_of[g] for g in groups)
    return ({f"{name}@{g}": by_group[g] for g in groups}, {f"{name}@{g}": weight_of[g] / total for g in groups})


def arrange(
    prep: Prepared | Sequence[Prepared], pools: dict[str, list[Record]]
) -> tuple[dict[str, list[Record]], dict[str, MixReport]]:
    """Records per split: the stage mixture when the recipe has one, else every record in a seeded order.

    ``pools`` holds the records of every source in ``prep`` (one :class:`Prepared` per source). In a
    mixture each component is shared among the ``sources:`` entries by their weights (components named
    ``COMPONENT@sources[i]`` in the report when there are several).
    """
    from agrivlm.recipes.context import rng_for

    preps = [prep] if isinstance(prep, Prepared) else list(prep)
    cfg = preps[0].cfg
    out: dict[str, list[Record]] = {}
    reports: dict[str, MixReport] = {}
    for split in SPLITS:
        if cfg.mixture is None:
            recs = [r for fam in pools for r in pools[fam] if r.split == split]
            order = rng_for(cfg.seed, "order", split).permutation(len(recs))
            out[split] = [recs[int(i)] for i in order]
            continue
        comp_pools: dict[str, list[Record]] = {}
        weights: dict[str, float] = {}
        for name, comp in cfg.mixture.components.items():
            recs = [
                r for fam in comp.families for r in pools[fam]
                if r.split == split and (not comp.text_only or not r.has_positions)
                and (comp.tasks is None or r.task in comp.tasks)
            ]
            sub_pools, sub_weights = _component_pools(preps, recs, name)
            comp_pools.update(sub_pools)
            weights.update({k: comp.weight * w for k, w in sub_weights.items()})
        want = cfg.mixture.samples.get(split, "max_unique")  # type: ignore[call-overload]
        n = max_unique(comp_pools, weights) if want == "max_unique" else int(want)
        try:
            out[split], reports[split] = mix(comp_pools, weights, n, cfg.seed, label=split)
        except ValueError as exc:
            raise ConfigError(f"recipe {cfg.name}: mixture for split {split}: {exc}") from exc
    return out, reports


def _digest(path: RasterPath) -> str:
    """A local file's sha256, else its :func:`~agrivlm.geo.rasters.network_stamp`."""
    return sha256_file(path) if isinstance(path, Path) else network_stamp(path)


def _sources_manifest(prep: Prepared) -> dict[str, Any]:
    src, base = prep.source.source, prep.base_dir
    stack_files = {str(p.name): _digest(p) for p in prep.stack.files}
    mask_files = {str(m.path.name): _digest(m.path) for step in prep.stack.steps for m in step.masks if m is not None}
    out: dict[str, Any] = {
        "stack": {"spec": src.stack, "path": resolve_spec(src.stack, base), "files": stack_files},
        "masks": {"spec": src.masks, "path": resolve_spec(src.masks, base), "files": mask_files} if src.masks else None,
        "parcels": {"spec": src.parcels, "path": resolve_spec(src.parcels, base),
                    "sha256": sha256_file(resolve_spec(src.parcels, base))},
    }
    if src.class_raster is not None:
        p = resolve_spec(src.class_raster.path, base)
        out["class_raster"] = {"spec": src.class_raster.path, "path": p, "sha256": sha256_file(p)}
    labels = prep.source.labels
    if labels is not None:
        for key in ("stages", "key_dates"):
            spec = getattr(labels, key)
            if spec:
                p = resolve_spec(spec, base)
                out[f"labels_{key}"] = {"spec": spec, "path": p, "sha256": sha256_file(p)}
    return out


def _phenology_summary(preps: Sequence[Prepared]) -> dict[str, Any]:
    tables = [phenology_detail_table(p.phenology) for p in preps]
    table = pd.concat(tables, ignore_index=True) if len(tables) > 1 else tables[0]
    out: dict[str, Any] = {"fields_analysed": sum(len(p.phenology) for p in preps), "seasons": {}}
    for season, group in table.groupby("season"):
        med = {}
        for col in ("sos", "pos", "senescence", "eos"):
            days = to_days(group[col].to_numpy().astype("datetime64[D]"))
            med[col] = str(np.datetime64("1970-01-01") + np.timedelta64(int(round(float(np.median(days)))), "D"))
        out["seasons"][str(season)] = {"fields": int(len(group)), "median": med,
                                       "post_stage": dict(Counter(group.post_stage))}
    out["stage_labels"] = sum(len(p.state.truth.stage_labels) for p in preps)
    out["key_date_labels"] = sum(len(p.state.truth.key_date_labels) for p in preps)
    return out


def _write_parcels(prep: Prepared, path: Path) -> None:
    footprint = prep.stack.grid.footprint()
    parcels = prep.parcels
    inside = parcels[parcels.intersects(footprint)].copy()
    clipped = inside.geometry.intersection(footprint)
    layer = gpd.GeoDataFrame({
        "field_id": inside.field_id.values,
        "class": inside.cls.values,
        "area_m2": inside.area_m2.round(3).values,
        "clipped_area_m2": clipped.area.round(3).values,
        "cut_by_stack": (clipped.area.values < inside.area_m2.values * (1 - 1e-6)),
        "n_px": prep.scan.parcel_px[inside.index.to_numpy()],
        "analysed": [fid in prep.phenology for fid in inside.field_id],
    }, geometry=clipped.values, crs=parcels.crs)
    rows = []
    for chip in prep.chips:
        for p in chip.parcels:
            rows.append({"chip_id": chip.chip_id, "split": chip.split, "field_id": p.field_id, "class": p.cls,
                         "area_px": round(p.area_px, 3), "cut": p.cut, "geometry": p.geom})
    chip_layer = gpd.GeoDataFrame(rows, geometry="geometry", crs=parcels.crs) if rows else gpd.GeoDataFrame(
        {"chip_id": []}, geometry=gpd.GeoSeries([], crs=parcels.crs))
    with fixed_gpkg_date():  # the same recipe gives the same bytes
        layer.to_file(path, driver="GPKG", layer="parcels")
        chip_layer.to_file(path, driver="GPKG", layer="chip_parcels", mode="a")


def _write_source_files(prep: Prepared, out_dir: Path, sub: str) -> dict[str, Any]:
    """Tables and plots of one source under ``tables/SUB`` and ``plots/SUB``; their paths (relative)."""
    tables = out_dir / "tables" / sub
    tables.mkdir(parents=True, exist_ok=True)
    truth = prep.state.truth
    stage_table(truth, list(prep.stack.times)).to_csv(tables / "growth_stages.csv", index=False)
    key_date_table(truth, [s[0] for s in prep.state.seasons]).to_csv(tables / "key_dates.csv", index=False)
    phenology_detail_table(prep.phenology).to_csv(tables / "phenology.csv", index=False)
    _write_parcels(prep, tables / "parcels.gpkg")

    plots = out_dir / "plots" / sub
    index_name = prep.source.source.index_name
    chosen = pick_parcels(prep.phenology, prep.cfg.output.plot_parcels)
    where = f"recipe {prep.cfg.name}" + (f", {prep.source.name}" if prep.source.name else "")
    plot_phenology(chosen, plots / "phenology.png", index_name,
                   title=f"{where}: {index_name} of {len(chosen)} parcels, derived stages")
    kept = {c.chip_id: c.window for c in prep.chips}
    plot_splits(prep.stack.grid, kept, {c.chip_id: c.split for c in prep.chips},
                [prep.windows[i] for i in prep.assignment.excluded], prep.parcels, plots / "splits.png")
    rel = f"{sub}/" if sub else ""
    return {
        "tables": {"growth_stages": f"tables/{rel}growth_stages.csv", "key_dates": f"tables/{rel}key_dates.csv",
                   "phenology": f"tables/{rel}phenology.csv", "parcels": f"tables/{rel}parcels.gpkg"},
        "plots": [f"plots/{rel}phenology.png", f"plots/{rel}splits.png"],
    }


def _stack_summary(prep: Prepared) -> dict[str, Any]:
    return {
        "n_dates": len(prep.stack.steps), "first_date": str(prep.stack.times[0]),
        "last_date": str(prep.stack.times[-1]), "crs": _crs_text(prep.stack.crs),
        "shape": list(prep.stack.shape), "transform": list(prep.stack.transform)[:6],
    }


def _parcel_summary(prep: Prepared) -> dict[str, int]:
    return {**prep.parcel_counts, "in_stack": int(prep.parcels.intersects(prep.stack.grid.footprint()).sum())}


def _block_ids(prep: Prepared) -> dict[str, str]:
    prefix = f"{prep.source.name}/" if prep.source.name else ""
    return {f"{prefix}{r}_{c}": s for (r, c), s in sorted(prep.assignment.blocks.items())}


def _write_shards(arranged: dict[str, list[Record]], out_dir: Path, shard_size: int) -> list[dict[str, Any]]:
    """Each split's records as ``shards/SPLIT-NNNNN.jsonl`` of ``shard_size`` records; the manifest's shard entries."""
    shard_dir = out_dir / "shards"
    shard_dir.mkdir(parents=True)
    shards = []
    for split in SPLITS:
        recs = arranged[split]
        for k in range(0, max(len(recs), 1), shard_size):
            chunk = recs[k:k + shard_size]
            if not chunk:
                continue
            path = shard_dir / f"{split}-{k // shard_size:05d}.jsonl"
            write_records(path, chunk)
            shards.append({"path": str(path.relative_to(out_dir)), "split": split, "records": len(chunk),
                           "sha256": sha256_file(path)})
    return shards


def _counts(
    pools: dict[str, list[Record]], arranged: dict[str, list[Record]]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The manifest's ``counts`` (per split, family, task and pool) and the split of every record written."""
    by_family: dict[str, dict[str, int]] = {}
    by_task: dict[str, dict[str, int]] = {}
    record_split: dict[str, str] = {}
    for split in SPLITS:
        for r in arranged[split]:
            by_family.setdefault(r.family, dict.fromkeys(SPLITS, 0))[split] += 1
            by_task.setdefault(f"{r.family}/{r.task}", dict.fromkeys(SPLITS, 0))[split] += 1
            record_split[r.sample_id] = split
    pool_counts = {
        fam: {split: sum(1 for r in recs if r.split == split) for split in SPLITS} for fam, recs in pools.items()
    }
    counts = {
        "records": {s: len(arranged[s]) for s in SPLITS},
        "unique_records": len(record_split),
        "by_family": dict(sorted(by_family.items())),
        "by_task": dict(sorted(by_task.items())),
        "pools": pool_counts,
    }
    return counts, record_split


def _chips_manifest(preps: Sequence[Prepared]) -> dict[str, Any]:
    """The manifest's ``chips``: grid and kept counts, buffer exclusions, chips per split, windows, frameless chips."""
    chips = [c for p in preps for c in p.chips]
    return {
        "grid": sum(len(p.windows) for p in preps),
        "kept": len(chips),
        "excluded_buffer": sorted(source_chip_id(p.origin, p.windows[i]) for p in preps
                                  for i in p.assignment.excluded),
        "by_split": {s: sorted(c.chip_id for c in chips if c.split == s) for s in SPLITS},
        "windows": {c.chip_id: [int(c.window.col_off), int(c.window.row_off), int(c.window.width),
                                int(c.window.height)] for c in chips},
        "without_frames": sorted(cid for p in preps for cid, fr in p.state.frames_all.items() if not fr),
    }


def _source_entries(
    preps: Sequence[Prepared], stacks: list[dict[str, Any]], files: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The manifest's ``sources`` of a ``sources:`` recipe: one entry per source, with its own summaries and files."""
    return [
        {"name": p.source.name, "entry": p.source.group, "weight": p.source.weight,
         "split": p.source.split or "blocks", "scene": p.source.scene, "files": _sources_manifest(p),
         "stack": stack, "parcels": _parcel_summary(p), "chips": len(p.chips),
         "phenology": _phenology_summary([p]), **f}
        for p, stack, f in zip(preps, stacks, files, strict=True)
    ]


def _stacks_total(stacks: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest's ``stack`` of a ``sources:`` recipe: how many sources and dates, the first and last date."""
    return {
        "sources": len(stacks), "n_dates": sum(st["n_dates"] for st in stacks),
        "first_date": min(st["first_date"] for st in stacks), "last_date": max(st["last_date"] for st in stacks),
    }


def write_outputs(
    prep: Prepared | Sequence[Prepared],
    pools: dict[str, list[Record]],
    arranged: dict[str, list[Record]],
    reports: dict[str, MixReport],
    out_dir: Path,
    recipe_path: Path,
) -> dict[str, Any]:
    """Write shards, tables, plots and the manifest into ``out_dir`` (a fresh folder); return the manifest.

    One source (``source:``): ``tables/`` and ``plots/`` hold its files. Several (``sources:``): each
    source's under ``tables/NAME/`` and ``plots/NAME/``, and the manifest's ``sources`` lists them.
    """
    preps = [prep] if isinstance(prep, Prepared) else list(prep)
    cfg = preps[0].cfg
    shards = _write_shards(arranged, out_dir, cfg.output.shard_size)
    single = cfg.source is not None
    files = [_write_source_files(p, out_dir, "" if single else str(p.source.name)) for p in preps]
    counts, record_split = _counts(pools, arranged)
    stacks = [_stack_summary(p) for p in preps]
    parcel_counts: Counter[str] = Counter()
    for p in preps:
        parcel_counts.update(_parcel_summary(p))
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "recipe": cfg.name,
        "recipe_file": str(recipe_path.resolve()),
        "recipe_sha256": sha256_file(recipe_path),
        "config": cfg.model_dump(mode="json"),
        "same_day": cfg.same_day,
        "seeds": {"recipe": cfg.seed, "split": cfg.split.seed},
        "sources": _sources_manifest(preps[0]) if single else _source_entries(preps, stacks, files),
        "stack": stacks[0] if single else _stacks_total(stacks),
        "parcels": dict(parcel_counts),
        "chips": _chips_manifest(preps),
        "split": {"blocks": {k: v for p in preps for k, v in _block_ids(p).items()}},
        "counts": counts,
        "mixture": {s: rep.as_dict() for s, rep in reports.items()} if reports else None,
        "phenology": _phenology_summary(preps),
        "shards": shards,
        "records": dict(sorted(record_split.items())),
        "tables": files[0]["tables"] if single else {
            str(p.source.name): f["tables"] for p, f in zip(preps, files, strict=True)
        },
        "plots": files[0]["plots"] if single else [x for f in files for x in f["plots"]],
    }
    if not single:
        manifest["split"]["scenes"] = {str(p.source.name): p.source.split or "blocks" for p in preps}
        manifest["seeds"]["scenes"] = {
            f"sources[{i}]": e.split.seed
            for i, e in enumerate(cfg.sources or []) if isinstance(e.split, SceneSplitConfig)
        }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def build_recipe(
    recipe: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    seed: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Build a recipe into ``out`` (see the module docstring); returns the manifest.

    Raises:
        ConfigError: bad recipe, or ``out`` holds a previous build and ``overwrite`` is False.

    """
    recipe_path = Path(recipe)
    out_dir = Path(out)
    cfg = load_recipe(recipe_path)
    if seed is not None:
        cfg = cfg.model_copy(update={"seed": seed})
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(f"{out_dir}: already exists and is not empty; pass --overwrite to replace it")
    preps = prepare_all(cfg, recipe_path.parent, progress)
    pools: dict[str, list[Record]] = {f: [] for f in cfg.tasks.enabled()}
    for prep in preps:
        for family, records in build_pools(prep, progress).items():
            pools[family].extend(records)
    for records in pools.values():
        records.sort(key=lambda r: r.sample_id)
    arranged, reports = arrange(preps, pools)
    with atomic_dir(out_dir) as tmp:
        return write_outputs(preps, pools, arranged, reports, tmp, recipe_path)


__all__ = ["FAMILIES", "Prepared", "arrange", "build_pools", "build_recipe", "prepare", "prepare_all", "write_outputs"]
