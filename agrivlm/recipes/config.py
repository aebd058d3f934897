"""Recipe YAML → typed config (strict: unknown keys are errors naming the file and the key).

A recipe file may start with ``extends: other.yaml`` (a path relative to the file): the other file is
read first and this one is deep-merged over it, so the family recipes and the stage mixtures share one
source, chip grid and split and can never disagree about which chip is in which split.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import Field, field_validator, model_validator

from agrivlm.config import StrictModel, parse_config, read_yaml_mapping
from agrivlm.errors import ConfigError
from agrivlm.pipeline.inputs import MIN_FIELD_PX, SEASON_START, ChipRule
from agrivlm.recipes.schema import FAMILIES, SPLITS

SplitName = Literal["train", "val", "test"]
FieldTask = Literal[
    "outline_fields", "outline_parcels", "largest_of_class", "trace_outline", "count_fields", "edge_fields",
    "field_at_point",
]
GrowthTask = Literal["green_up_date", "peak_date", "senescence_date", "season_segment", "stage_on_date",
                     "stage_timeline"]
GeneralTask = Literal["caption", "majority", "presence", "fraction", "locate_class", "point_class"]
SpatialTask = Literal["left_right", "above_below", "nearest", "largest", "adjacent"]
FamilyName = Literal["field_boundaries", "growth_stages", "general_rs", "spatial_reasoning"]

#: Every task of each family (the default: all of them).
FIELD_TASKS: tuple[FieldTask, ...] = get_args(FieldTask)
GROWTH_TASKS: tuple[GrowthTask, ...] = get_args(GrowthTask)
GENERAL_TASKS: tuple[GeneralTask, ...] = get_args(GeneralTask)
SPATIAL_TASKS: tuple[SpatialTask, ...] = get_args(SpatialTask)
#: The tasks of each family.
FAMILY_TASKS: dict[str, tuple[str, ...]] = {
    "field_boundaries": FIELD_TASKS, "growth_stages": GROWTH_TASKS, "general_rs": GENERAL_TASKS,
    "spatial_reasoning": SPATIAL_TASKS,
}


def _default_fractions() -> dict[SplitName, float]:
    return {"train": 0.5, "val": 0.25, "test": 0.25}


def _default_samples() -> dict[SplitName, int | Literal["max_unique"]]:
    return {"train": 2000, "val": "max_unique", "test": "max_unique"}


class ClassRasterConfig(StrictModel):
    """A land-cover class raster (any grid; it is warped to the stack's grid with nearest resampling)."""

    #: Path or ``sample:<file>`` spec.
    path: str
    #: Class value → class word, e.g. ``{1: cultivated land, 3: grassland}``.
    classes: dict[int, str]
    #: Values that mean "no class" (never a land-cover answer).
    ignore: list[int] = Field(default_factory=list)


class SourceConfig(StrictModel):
    """Where the rasters, polygons and labels come from."""

    #: Stack: folder, glob or file of GeoTIFFs, one per date (``sample:ndvi`` = the embedded sample), remote files
    #: (``https://…``, ``s3://…``), or a STAC JSON (with ``assets``; :mod:`agrivlm.geo.stac`).
    stack: str
    #: Per-date cloud/no-data masks (non-zero = masked), matched to the stack by date.
    masks: str | None = None
    #: A STAC stack's assets that are the bands, in order (default: the items' one raster asset).
    assets: list[str] | None = None
    #: A STAC mask's asset (e.g. ``[SCL]``), and the mask values that mean masked (default: any non-zero value).
    mask_assets: list[str] | None = None
    mask_values: list[int] | None = None
    #: Band holding the vegetation index: 1-based number or band name. Ignored with ``normalized_difference``.
    band: int | str = 1
    #: Compute the index as ``(a − b) / (a + b)`` from two bands (1-based numbers or names), e.g. ``[nir, red]``.
    normalized_difference: tuple[int | str, int | str] | None = None
    #: Name of the index in plots and tables.
    index_name: str = "NDVI"
    #: Same-day acquisitions: ``keep`` | ``first`` | ``mosaic`` (as in ``agrivlm ingest``).
    same_day: Literal["keep", "first", "mosaic"] = "keep"
    #: Parcel layer (GeoPackage, GeoJSON, Shapefile, GeoParquet), any CRS: reprojected to the stack's CRS.
    parcels: str
    #: Layer inside a multi-layer file (default: the first).
    parcel_layer: str | None = None
    #: Column with a unique parcel id (default: the row number).
    id_column: str | None = None
    #: Column with the parcel's land-use class (default: every parcel is ``parcel``).
    class_column: str | None = None
    #: Raw class value → class word (e.g. fix a typo ``schrubland: shrubland``); empty values become ``unknown``.
    class_names: dict[str, str] = Field(default_factory=dict)
    #: Land-cover class raster for general remote-sensing questions (default: rasterize the parcel classes).
    class_raster: ClassRasterConfig | None = None


class LabelsConfig(StrictModel):
    """Real labels; where they exist they take precedence over derived ones."""

    #: Long stage table (CSV or GeoPackage/GeoJSON attribute table): one row per field and date.
    stages: str | None = None
    field_id_column: str = "field_id"
    date_column: str = "date"
    stage_column: str = "stage"
    #: Key-date table with ``agrivlm.schema.KEY_DATE_COLUMNS`` (field_id, season, green_up, peak, senescence);
    #: ``season`` is the recipe's season label (the year a season window starts in, ``phenology.season_start``).
    key_dates: str | None = None
    #: Which fields get stages and key dates derived from the index curves. A field listed in a table is
    #: answered from that table only (a date or key date it lacks is not asked, never derived):
    #: ``unlabelled_fields`` derives them for fields in no table; ``never`` asks only about labelled fields
    #: (synthetic scenes, whose truth is complete).
    derive: Literal["unlabelled_fields", "never"] = "unlabelled_fields"


def _fractions_sum_to_one(value: dict[str, float]) -> dict[str, float]:
    """Split fractions are non-negative and sum to 1 (scene splits and block splits alike)."""
    if any(v < 0 for v in value.values()) or abs(sum(value.values()) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be non-negative and sum to 1, got {value}")
    return value


class SceneSplitConfig(StrictModel):
    """Whole scenes dealt to splits: the scenes of a source entry, shuffled with ``seed``, by ``fractions``."""

    #: Share of scenes per split (largest remainder; every split with a non-zero share gets a scene when
    #: there are enough).
    fractions: dict[SplitName, float]
    #: Seed of the scene → split draw.
    seed: int = 0

    _sum_to_one = field_validator("fractions")(_fractions_sum_to_one)


#: Keys a ``synth:`` entry takes from the scene folder (setting them too is an error).
SYNTH_OWNED = ("stack", "masks", "parcels", "parcel_layer", "id_column", "class_column", "band",
               "normalized_difference", "labels")


class SourceEntry(SourceConfig):
    """One entry of ``sources:``: a real source (the keys of ``source:``) or ``synth:`` scenes.

    Each entry has its own labels, split rule and mixture weight.
    """

    #: Name of the source (letters, digits, ``_ . -``): chip ids become ``NAME/r000000_c000000``. Default:
    #: ``source<i>`` for a real source; the scene folder's name (prefixed ``NAME.`` when given) for ``synth:``.
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]+$")
    #: Synthetic scenes written by ``agrivlm synth``: a scene folder or a glob of them (relative to the recipe
    #: file). Each becomes a source: ``stack/``, ``cloud_mask/``, ``parcels.gpkg`` (``field_id``, ``class``),
    #: stage and key-date labels from ``truth/`` (``derive: never``), the index from ``scene.json``'s bands.
    synth: str | None = None
    stack: str | None = None  # type: ignore[assignment]
    parcels: str | None = None  # type: ignore[assignment]
    #: Growth-stage labels of this source (relative paths: to the recipe file).
    labels: LabelsConfig | None = None
    #: ``train`` | ``val`` | ``test``: every chip of every scene of this entry goes there; ``{fractions, seed}``:
    #: whole scenes are dealt to splits; unset: geographic blocks within each scene (the recipe's ``split:``).
    split: SplitName | SceneSplitConfig | None = None
    #: Share of this entry in each mixture component, relative to the other entries with records there.
    weight: float = Field(default=1.0, gt=0.0)

    @model_validator(mode="after")
    def _synth_or_files(self) -> SourceEntry:
        if self.synth is not None:
            clash = [k for k in SYNTH_OWNED if k in self.model_fields_set]
            if clash:
                raise ValueError(f"synth: the scene folder gives {', '.join(clash)}; leave them out of this entry")
        elif self.stack is None or self.parcels is None:
            raise ValueError("give synth: (scene folders) or both stack: and parcels:")
        return self

    def to_source(self) -> SourceConfig:
        """The :class:`SourceConfig` of a real (non-``synth``) entry."""
        keys = set(SourceConfig.model_fields)
        return SourceConfig(**{k: v for k, v in self.model_dump().items() if k in keys})


class SplitConfig(StrictModel):
    """Geographic split: square blocks of the stack get a split; chips must fit their block's split."""

    #: Block size in pixels of the stack's grid.
    block_px: int = Field(default=50, gt=0)
    #: A chip is kept only if it stays this many pixels away from every block of another split.
    buffer_px: int = Field(default=2, ge=0)
    #: Share of blocks per split.
    fractions: dict[SplitName, float] = Field(default_factory=_default_fractions)
    #: Seed of the block → split draw.
    seed: int = 0

    _sum_to_one = field_validator("fractions")(_fractions_sum_to_one)


class PhenologyConfig(StrictModel):
    """Per-parcel index curves and TIMESAT-style amplitude-threshold phenology."""

    #: Parcel classes analysed (default: all).
    classes: list[str] | None = None
    #: Parcels with fewer pixels (centres inside the polygon) are not analysed.
    min_pixels: int = Field(default=6, gt=0)
    #: A date counts for a parcel when at least this fraction of its pixels is clear.
    min_clear_fraction: float = Field(default=0.5, gt=0.0, le=1.0)
    #: Spacing of the gap-filled curve in days.
    step_days: int = Field(default=5, gt=0)
    #: Savitzky–Golay window in days (rounded to an odd number of samples).
    savgol_window_days: int = Field(default=45, gt=0)
    #: Savitzky–Golay polynomial order.
    savgol_order: int = Field(default=2, ge=0)
    #: Upper-envelope iterations (observations below the fit are treated as residual cloud; 0 = off).
    envelope_iterations: int = Field(default=1, ge=0)
    #: Start of each season as ``MM-DD``; a season lasts one year.
    season_start: str = SEASON_START
    #: Minima before/after the peak are searched this many days outside the season.
    season_margin_days: int = Field(default=90, ge=0)
    #: Start/end of season: fraction of the left/right amplitude above the left/right minimum.
    sos_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    eos_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    #: The ``peak`` stage: where the curve is above this fraction of the amplitude.
    peak_fraction: float = Field(default=0.8, gt=0.0, lt=1.0)
    #: Seasons whose amplitude (peak − minimum) is below this are not seasons.
    min_amplitude: float = Field(default=0.1, gt=0.0)
    #: … or below this fraction of the curve's whole range (max − min over all dates): a mowing dip and
    #: its regrowth are not a season of their own.
    min_relative_amplitude: float = Field(default=0.4, ge=0.0, le=1.0)
    #: After the end of season: ``harvested``, ``dormant``, or ``auto`` (harvested when the drop from the
    #: end of the peak stage to the end of season takes at most ``harvest_max_days``).
    post_season: Literal["auto", "harvested", "dormant"] = "auto"
    harvest_max_days: float = Field(default=30.0, gt=0.0)
    #: Rows of the stack read at once (bounded memory).
    tile_px: int = Field(default=512, gt=0)

    @field_validator("season_start")
    @classmethod
    def _month_day(cls, value: str) -> str:
        parts = value.split("-")
        ok = len(parts) == 2 and all(len(p) == 2 and p.isdigit() for p in parts)
        if ok:
            try:
                datetime.strptime(f"2001-{value}", "%Y-%m-%d")  # a day every year has (no 02-29)
            except ValueError:
                ok = False
        if not ok:
            raise ValueError(f"season_start must be a day every year has, as MM-DD (e.g. 03-01), got {value!r}")
        return value

    @model_validator(mode="after")
    def _fractions_ordered(self) -> PhenologyConfig:
        if not (self.sos_fraction < self.peak_fraction and self.eos_fraction < self.peak_fraction):
            raise ValueError("sos_fraction and eos_fraction must be below peak_fraction")
        return self


class FieldBoundariesConfig(StrictModel):
    """Field outlines, largest parcel of a class, edge-cut parcels, counts."""

    #: Parcel classes that are "fields" (default: every class).
    field_classes: list[str] | None = None
    #: Clipped parts smaller than this (pixels of area) are slivers: left out and counted in ``meta``.
    min_area_px: float = Field(default=4.0, ge=0.0)
    #: "Outline every …" is asked only when at most this many objects are in the chip.
    max_objects: int = Field(default=12, gt=0)
    #: How the listings (``outline_fields``, ``outline_parcels``) answer each field: ``polygon`` (its
    #: outline as ``outline_vertices`` LAPE points at most) or ``box``. Grounding answers
    #: (``largest_of_class``, ``edge_fields``) and the questions' references stay boxes.
    outline_as: Literal["polygon", "box"] = "polygon"
    #: Vertices of a listed polygon at most (simplified until it fits, as ``trace_outline``).
    outline_vertices: int = Field(default=8, ge=3)
    #: Polygon answers have at most this many vertices (simplified until they fit).
    max_vertices: int = Field(default=16, ge=3)
    #: Outlines are traced for parcels with at least this many pixels in the chip.
    trace_min_area_px: float = Field(default=16.0, ge=0.0)
    #: "Largest … parcel" needs the largest to beat the second by this factor.
    unique_margin: float = Field(default=1.1, ge=1.0)
    #: ``field_at_point``: points asked about per chip (each its own record), drawn uniformly over the chip.
    point_prompts: int = Field(default=6, ge=0)
    #: ``field_at_point``: points asked in one conversation (one record, every answer supervised); 1: one record
    #: per point.
    points_per_record: int = Field(default=1, ge=1)
    #: ``field_at_point``: points closer than this (pixels) to a parcel's edge are drawn again (mixed pixels
    #: there make "which field?" ambiguous).
    point_edge_px: float = Field(default=1.0, ge=0.0)
    tasks: list[FieldTask] = Field(default_factory=lambda: list(FIELD_TASKS))


class GrowthStagesConfig(StrictModel):
    """Key dates and stages per field, the field pointed to by its box."""

    #: A field is asked about in a chip when at least this many of its pixels are inside.
    min_field_px: float = Field(default=MIN_FIELD_PX, ge=0.0)
    #: Stage questions per field, chip and season (dates drawn among frames where the field is clear).
    stage_questions: int = Field(default=2, ge=0)
    labels: LabelsConfig | None = None
    #: Default: every task but ``stage_timeline``, which is asked for by name (a model trained on both stage
    #: tasks is asked the way it saw more often, see ``agrivlm.train.trainer``).
    tasks: list[GrowthTask] = Field(default_factory=lambda: list[GrowthTask](
        t for t in GROWTH_TASKS if t != "stage_timeline"))
    #: The dates a ``stage_timeline`` answer's spans run over: ``frames`` — the record's frames (its clear dates
    #: of the season, at most 16 a year: a span starts up to one frame gap after the stage does); ``season`` —
    #: every acquisition of the stack in the season, cloudy or not (a stage does not depend on the sky).
    #: Probed: 1,000 timeline steps from the shipped default, the same seed and schedule each way
    #: (benchmarks/results/learning_timeline_{season,frames}_probe.json). ``season`` against ``frames``:
    #: - held-out stage accuracy 0.747 against 0.717; left-out region 0.710 against 0.609; real block 0.592
    #:   against 0.579;
    #: - green-up / peak / senescence median days: 8.8 / 9.4 / 13 against 7.5 / 9.4 / 13 held out, 20 / 14 / 10
    #:   against 33 / 24 / 20 on the left-out region; real-block senescence 2.5 against 70.
    #: Both probes lost real-block stage accuracy (0.803 shipped then). The default checkpoint retrained with
    #: ``season`` (``agrivlm train default``, otherwise unchanged) kept it (0.803) and gained elsewhere: held-out
    #: stage accuracy 0.702 against 0.689, left-out region 0.627 against 0.532, held-out peak median 11 days
    #: against 15 (``DefaultTraining.timeline_dates``). So ``season`` is the default: the shipped checkpoint
    #: learned it, and a fine-tune from it (the quickstart) sees the same rule.
    timeline_dates: Literal["frames", "season"] = "season"


class GeneralRSConfig(StrictModel):
    """Land-cover questions from the class raster (or the rasterized parcel classes)."""

    #: A class is "present" with at least this many pixels, "absent" with none (in between: not asked).
    min_presence_px: int = Field(default=4, ge=1)
    #: Classes covering at least this share are named in captions.
    caption_min_share: float = Field(default=0.05, ge=0.0, le=1.0)
    #: Point questions per chip (points at pixel centres inside a uniform 3×3 neighbourhood).
    point_questions: int = Field(default=2, ge=0)
    tasks: list[GeneralTask] = Field(default_factory=lambda: list(GENERAL_TASKS))


class SpatialReasoningConfig(StrictModel):
    """Relations between parcels from geometry: left/right, above/below, nearest, largest, adjacent."""

    #: Parcels with fewer pixels in the chip are not used.
    min_area_px: float = Field(default=4.0, ge=0.0)
    #: Relation questions (left/right, above/below) per chip.
    pairs_per_chip: int = Field(default=4, ge=0)
    #: Parcels closer than this (metres in the stack's CRS) are adjacent.
    adjacency_tolerance_m: float = Field(default=1.0, ge=0.0)
    #: "Nearest"/"largest" need the winner to beat the runner-up by this factor.
    unique_margin: float = Field(default=1.2, ge=1.0)
    #: Answers list at most this many boxes.
    max_objects: int = Field(default=8, gt=0)
    #: Subjects of nearest/adjacent questions per chip.
    subjects_per_chip: int = Field(default=3, ge=0)
    tasks: list[SpatialTask] = Field(default_factory=lambda: list(SPATIAL_TASKS))


class TasksConfig(StrictModel):
    """Which families a recipe builds (a family left out is not built)."""

    field_boundaries: FieldBoundariesConfig | None = None
    growth_stages: GrowthStagesConfig | None = None
    general_rs: GeneralRSConfig | None = None
    spatial_reasoning: SpatialReasoningConfig | None = None

    def enabled(self) -> list[str]:
        """Names of the enabled families, in :data:`FAMILIES` order."""
        return [f for f in FAMILIES if getattr(self, f) is not None]


class MixtureComponent(StrictModel):
    """One component of a curriculum-stage mixture."""

    #: Families whose records are pooled in this component.
    families: list[FamilyName]
    #: Share of the samples drawn from this component.
    weight: float = Field(gt=0.0)
    #: Keep only records without positions (stage 1: alignment without LAPE).
    text_only: bool = False
    #: Keep only these tasks of the families (None: every task). The default checkpoint gives the
    #: questions ``agrivlm infer`` asks (``field_at_point``, ``stage_on_date``) a component of their own.
    tasks: list[FieldTask | GrowthTask | GeneralTask | SpatialTask] | None = None


class MixtureConfig(StrictModel):
    """Samples per split drawn from the components by weight (exact quotas, seeded order)."""

    components: dict[str, MixtureComponent]
    #: Samples per split: a number (records repeat, in a fresh seeded order, once a pool is used up) or
    #: ``max_unique`` (as many as fit without repeating any record).
    samples: dict[SplitName, int | Literal["max_unique"]] = Field(default_factory=_default_samples)

    @field_validator("components")
    @classmethod
    def _weights_sum_to_one(cls, value: dict[str, MixtureComponent]) -> dict[str, MixtureComponent]:
        total = sum(c.weight for c in value.values())
        if not value or abs(total - 1.0) > 1e-6:
            raise ValueError(f"component weights must sum to 1, got {total:g}")
        return value


class OutputConfig(StrictModel):
    """Shards and plots."""

    #: Records per JSONL shard.
    shard_size: int = Field(default=5000, gt=0)
    #: Parcels shown in the phenology plot.
    plot_parcels: int = Field(default=4, ge=1)


class RecipeConfig(StrictModel):
    """A data recipe: sources, chip grid, split, phenology, task families and (for a stage) a mixture."""

    @property
    def same_day(self) -> str:
        """The same-day rule of the recipe's sources (one per recipe)."""
        return self.source.same_day if self.source is not None else self.sources[0].same_day  # type: ignore[index]


    #: Recipe name (in every record and the manifest).
    name: str
    description: str = ""
    #: Seed of every random choice (question phrasing, sampled dates, mixture); same seed → same bytes.
    seed: int = 0
    #: One source (the original form) …
    source: SourceConfig | None = None
    #: … or several: real sources and ``synth:`` scene folders, mixed in one dataset.
    sources: list[SourceEntry] | None = None
    #: The chip grid and which dates are frames (the chip-input contract's :class:`~agrivlm.pipeline.inputs.ChipRule`,
    #: kept in the manifest so a trainer writes it into the checkpoint).
    chips: ChipRule = Field(default_factory=ChipRule)
    split: SplitConfig = Field(default_factory=SplitConfig)
    phenology: PhenologyConfig = Field(default_factory=PhenologyConfig)
    tasks: TasksConfig
    mixture: MixtureConfig | None = None
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _consistent(self) -> RecipeConfig:
        if (self.source is None) == (self.sources is None):
            raise ValueError("give either source: (one source) or sources: (a list), not "
                             + ("both (set source: null to replace an extended one)" if self.source else "neither"))
        if self.sources is not None:
            if not self.sources:
                raise ValueError("sources: the list is empty")
            gs = self.tasks.growth_stages
            if gs is not None and gs.labels is not None:
                raise ValueError("tasks.growth_stages.labels: with sources:, give labels: on each source entry")
            names = [e.name for e in self.sources if e.name is not None]
            dup = next((n for n in names if names.count(n) > 1), None)
            if dup is not None:
                raise ValueError(f"sources: name {dup!r} is given twice")
            if len({e.same_day for e in self.sources}) > 1:
                raise ValueError("sources: every entry needs the same same_day (one recipe output has one)")
        enabled = self.tasks.enabled()
        if not enabled:
            raise ValueError("tasks: enable at least one family (" + ", ".join(FAMILIES) + ")")
        if self.mixture is not None:
            for name, comp in self.mixture.components.items():
                for fam in comp.families:
                    if fam not in enabled:
                        raise ValueError(f"mixture.components.{name}: family {fam} is not enabled under tasks")
                if comp.tasks is not None:
                    known = {t for fam in comp.families for t in FAMILY_TASKS[fam]}
                    bad = [t for t in comp.tasks if t not in known]
                    if bad:
                        raise ValueError(f"mixture.components.{name}.tasks: {', '.join(bad)} not a task of "
                                         f"{', '.join(comp.families)}")
        for split in self.split.fractions:
            if split not in SPLITS:
                raise ValueError(f"split.fractions: unknown split {split}")
        return self


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    if path.resolve() in chain:
        raise ConfigError(f"{path}: `extends` loops back to itself ({' → '.join(p.name for p in chain)})")
    where = f" (extended by {chain[-1]})" if chain else ""
    data = read_yaml_mapping(path, f"no such recipe file{where}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: extends: expected a file name, got {parent!r}")
    base = _read_yaml(path.parent / parent, (*chain, path.resolve()))
    return _deep_merge(base, data)


def load_recipe(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> RecipeConfig:
    """Read a recipe YAML (following ``extends``) into a :class:`RecipeConfig`.

    Raises:
        ConfigError: missing file, invalid YAML, unknown key or bad value — naming the file and the key.

    """
    path = Path(path)
    data = _read_yaml(path, ())
    for key, value in (overrides or {}).items():
        data[key] = value
    return parse_config(RecipeConfig, data, str(path))
