"""What the explorer was started with, and its round trip through the Streamlit script's command line.

``agrivlm explore`` builds :class:`ExploreSettings`, turns it into arguments after ``--`` of
``streamlit run`` (:meth:`ExploreSettings.to_argv`), and the page parses them back
(:meth:`ExploreSettings.from_argv`). The page reads these paths and no others: it has no field where a
path could be typed.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field

from agrivlm.explore.errors import ExploreError
from agrivlm.geo.grid import CHIP_SIZE


@dataclass(frozen=True)
class ExploreSettings:
    """The explorer's inputs and options (paths as given; they are checked when the page loads them)."""

    #: GeoTIFFs of the stack: folders, globs or files, remote files or a STAC JSON (as for ``agrivlm ingest``).
    stack: tuple[str, ...]
    #: Per-date cloud/no-data mask files (folders, globs or files), matched to the stack by date.
    masks: tuple[str, ...] = ()
    #: A STAC stack's assets that are the bands, and a STAC mask's asset (``agrivlm ingest --assets``).
    assets: tuple[str, ...] = ()
    mask_assets: tuple[str, ...] = ()
    #: Predicted field layers (GPKG/GeoJSON… with chip_id, task, score, tokens) and growth-stage CSVs.
    predictions: tuple[str, ...] = ()
    #: True field layers (e.g. a parcel register) and growth-stage CSVs.
    truth: tuple[str, ...] = ()
    #: Column with the ids of true fields (default: first unique of field_id, RABA_ID, index).
    truth_id: str | None = None
    #: A trained checkpoint folder for the question box.
    model: str | None = None
    #: Basemap: an XYZ tile template or a style JSON URL (default: none, works offline).
    tiles: str | None = None
    #: Chip size and stride in pixels for the chip grid and chip ids (as for ``agrivlm ingest``).
    chip_size: int = CHIP_SIZE
    stride: int | None = None
    #: Explicit band roles ``ROLE=BAND`` (band name or 1-based number), e.g. ``("red=B4", "nir=B8")``.
    bands: tuple[str, ...] = field(default_factory=tuple)
    #: Title shown on the page.
    title: str = "agrivlm field explorer"

    def band_map(self) -> dict[str, str]:
        """``bands`` as ``{role: band}``."""
        out = {}
        for item in self.bands:
            if "=" not in item:
                raise ExploreError(f"--band {item!r}: expected ROLE=BAND, e.g. red=B04 or nir=4")
            role, band = item.split("=", 1)
            out[role.strip().lower()] = band.strip()
        return out

    def to_argv(self) -> list[str]:
        """The script arguments that :meth:`from_argv` parses back into these settings."""
        argv: list[str] = []
        for flag, values in (("--stack", self.stack), ("--masks", self.masks), ("--predictions", self.predictions),
                             ("--truth", self.truth), ("--band", self.bands), ("--asset", self.assets),
                             ("--mask-asset", self.mask_assets)):
            for value in values:
                argv += [flag, value]
        for flag, one in (("--truth-id", self.truth_id), ("--model", self.model), ("--tiles", self.tiles)):
            if one is not None:
                argv += [flag, one]
        argv += ["--chip-size", str(self.chip_size), "--title", self.title]
        if self.stride is not None:
            argv += ["--stride", str(self.stride)]
        return argv

    @classmethod
    def from_argv(cls, argv: Sequence[str]) -> ExploreSettings:
        """Parse script arguments (see :meth:`to_argv`).

        Raises:
            ExploreError: unknown or missing arguments (argparse's message, without exiting).

        """
        parser = _Parser(prog="field_explorer.py", add_help=False)
        parser.add_argument("--stack", action="append", default=[])
        parser.add_argument("--masks", action="append", default=[])
        parser.add_argument("--predictions", action="append", default=[])
        parser.add_argument("--truth", action="append", default=[])
        parser.add_argument("--band", action="append", default=[])
        parser.add_argument("--asset", action="append", default=[])
        parser.add_argument("--mask-asset", action="append", default=[])
        parser.add_argument("--truth-id")
        parser.add_argument("--model")
        parser.add_argument("--tiles")
        parser.add_argument("--chip-size", type=int, default=CHIP_SIZE)
        parser.add_argument("--stride", type=int)
        parser.add_argument("--title", default=cls.title)
        ns = parser.parse_args(list(argv))
        if not ns.stack:
            raise ExploreError("no stack given: start the explorer with agrivlm explore --stack PATH (or --sample)")
        return cls(
            stack=tuple(ns.stack), masks=tuple(ns.masks), predictions=tuple(ns.predictions), truth=tuple(ns.truth),
            truth_id=ns.truth_id, model=ns.model, tiles=ns.tiles, chip_size=ns.chip_size, stride=ns.stride,
            bands=tuple(ns.band), title=ns.title, assets=tuple(ns.asset), mask_assets=tuple(ns.mask_asset),
        )


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ExploreError(f"the explorer was started with bad arguments: {message}")
