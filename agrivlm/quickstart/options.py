"""What a quickstart run is made of (:class:`QuickstartOptions`), and what its report reads of a run.

The report (:mod:`agrivlm.quickstart.report`) reads a run through :class:`QuickstartRun`, the part of
:class:`agrivlm.quickstart.run.Quickstart` it needs, so the run module imports the report and not the other way
round.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agrivlm.errors import ConfigError

#: The steps, in order.
STEPS: tuple[str, ...] = ("ingest", "recipes", "stage1", "stage2", "stage3", "infer", "eval", "report")
#: Share of ``--steps`` each training stage gets (stage 3, the agricultural fine-tune, the most).
STAGE_SHARE = {"stage1": 0.15, "stage2": 0.15, "stage3": 0.70}

@dataclass(frozen=True)
class QuickstartOptions:
    """What a quickstart run is made of (recorded in ``DIR/quickstart.json``)."""

    #: Optimizer steps over the three stages (split by :data:`STAGE_SHARE`).
    steps: int = 1000
    #: GeoTIFF stack (folder/glob, a remote file, a STAC JSON); None: the embedded sample.
    stack: str | None = None
    #: Per-date cloud masks of the stack (None: the sample's, or none for a user stack).
    masks: str | None = None
    #: A STAC stack's assets that are the bands, and its masks' asset (``agrivlm ingest --assets``).
    assets: tuple[str, ...] | None = None
    mask_assets: tuple[str, ...] | None = None
    #: Parcel layer (any CRS); None: the sample's.
    parcels: str | None = None
    #: Parcel id and class columns of a user layer.
    parcel_id: str | None = None
    parcel_class: str | None = None
    #: Band preset of the stack (``agrivlm.pipeline.bands.PRESETS``): ``ndvi`` for the sample.
    preset: str = "ndvi"
    #: Folder with ``vision/`` (SigLIP/CLIP) and ``llm/`` (Qwen2/Llama) checkpoints; None: tiny random model.
    #: Given, the run trains stage 1 → 2 → 3 from it (``start`` must be ``scratch``).
    base_model: str | None = None
    #: ``default``: fine-tune the checkpoint shipped in the package (stage 3 only, all of ``steps``);
    #: ``scratch``: stage 1 → 2 → 3 of the tiny random model or of ``base_model``.
    start: str = "default"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.start not in ("default", "scratch"):
            raise ConfigError(f"start must be default or scratch, got {self.start!r}")
        if self.start == "default" and self.base_model is not None:
            raise ConfigError("--base-model trains stage 1 → 2 → 3 from its weights: pass --start scratch with it")

    @property
    def stages(self) -> tuple[str, ...]:
        """The training stages this run trains."""
        return ("stage3",) if self.start == "default" else ("stage1", "stage2", "stage3")

    def stage_steps(self) -> dict[str, int]:
        """Steps of each trained stage (at least 1)."""
        if self.start == "default":
            return {"stage3": max(1, self.steps)}
        return {s: max(1, round(self.steps * share)) for s, share in STAGE_SHARE.items()}


class QuickstartRun(Protocol):
    """A quickstart run as its report reads it (:class:`agrivlm.quickstart.run.Quickstart`)."""

    out: Path
    opts: QuickstartOptions

    @property
    def stack(self) -> str:
        """The stack's path (folder, glob, remote file or STAC JSON)."""

    @property
    def stack_options(self) -> dict[str, Any]:
        """The STAC settings of the stack (``assets``, ``mask_assets``)."""

    @property
    def masks(self) -> str | None:
        """The stack's mask files, if any."""

    def done(self, step: str) -> dict[str, Any] | None:
        """What a finished step recorded; None while it is not done."""

    def final(self, stage: str) -> Path:
        """A training stage's final checkpoint folder."""

    def recipe_file(self, stage: str) -> Path:
        """A stage's recipe file."""

    def stage_overrides(self, stage: str) -> dict[str, Any]:
        """The ``--set`` keys a stage trains with."""
