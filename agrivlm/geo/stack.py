"""Open a multitemporal stack of GeoTIFFs as one co-registered ``(time, band, y, x)`` array.

``open_stack`` resolves the inputs (folder, glob, list), dates every file (:mod:`agrivlm.geo.dates`),
checks CRS and band counts, picks a reference grid and aligns every other file to it through a
``rasterio.vrt.WarpedVRT`` (lazy: pixels are warped only when a window is read). Per-date mask files
(clouds, no data) are matched to the data by acquisition time and carried as a boolean mask.

Reads are windowed: :meth:`Stack.read_window` reads one window of every date, and :attr:`Stack.data`
/ :attr:`Stack.mask` are dask-backed xarray objects whose chunks read their own windows. Nothing
reads a whole raster into memory.
"""

from __future__ import annotations

import glob as globlib
import logging
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Literal

import dask.array as darr
import numpy as np
import numpy.typing as npt
import rasterio
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.io import DatasetReader
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from agrivlm.errors import IngestError
from agrivlm.geo.coords import GeoGrid, TimeAxis
from agrivlm.geo.dates import DatedFile, resolve_date

log = logging.getLogger(__name__)

#: File extensions picked up when a folder is given.
RASTER_SUFFIXES = (".tif", ".tiff", ".TIF", ".TIFF")

Inputs = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
SameDay = Literal["keep", "first", "mosaic"]


def resolve_inputs(inputs: Inputs, what: str = "inputs") -> list[Path]:
    """Expand a folder, a glob pattern, a file, or a list of any of these into GeoTIFF paths.

    Raises:
        IngestError: when a path does not exist or nothing matches.

    """
    items: Sequence[str | os.PathLike[str]] = [inputs] if isinstance(inputs, str | os.PathLike) else inputs
    paths: list[Path] = []
    for item in items:
        text = os.fspath(item)
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in RASTER_SUFFIXES and p.is_file())
            if not found:
                raise IngestError(f"{path}: the folder holds no GeoTIFF (*.tif, *.tiff); point to the right folder")
            paths.extend(found)
        elif any(ch in text for ch in "*?["):
            found = sorted(Path(p) for p in globlib.glob(text, recursive=True) if Path(p).is_file())
            if not found:
                raise IngestError(f"{text}: the pattern matches no file; check the pattern")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise IngestError(f"{path}: no such file or folder")
    if not paths:
        raise IngestError(f"no {what} given: pass a folder, a glob or a list of GeoTIFFs")
    return paths


@dataclass(frozen=True)
class SourceInfo:
    """What the stack needs to know about one file, read from its header once."""

    path: Path
    time: datetime
    date_source: str
    crs: CRS
    transform: Affine
    width: int
    height: int
    count: int
    dtype: str
    nodata: float | None
    descriptions: tuple[str | None, ...]

    @property
    def grid(self) -> GeoGrid:
        """The file's own pixel grid."""
        return GeoGrid(self.transform, self.crs, self.width, self.height)


def _inspect(dated: DatedFile) -> SourceInfo:
    try:
        with rasterio.open(dated.path) as ds:
            if ds.crs is None:
                raise IngestError(
                    f"{dated.path}: no CRS; fix the file (e.g. gdal_edit.py -a_srs EPSG:xxxx), "
                    "agrivlm never guesses one"
                )
            if ds.transform == Affine.identity() and not ds.gcps[0]:
                raise IngestError(f"{dated.path}: no geotransform (identity); the file is not georeferenced")
            return SourceInfo(
                path=dated.path,
                time=dated.time,
                date_source=dated.source,
                crs=ds.crs,
                transform=ds.transform,
                width=ds.width,
                height=ds.height,
                count=ds.count,
                dtype=ds.dtypes[0],
                nodata=ds.nodata,
                descriptions=tuple(ds.descriptions),
            )
    except rasterio.errors.RasterioIOError as exc:
        raise IngestError(f"{dated.path}: cannot be opened as a raster ({exc}); check or re-download the file") from exc


def _same_grid(info: SourceInfo, ref: GeoGrid) -> bool:
    return (
        info.crs == ref.crs
        and info.width == ref.width
        and info.height == ref.height
        and info.transform.almost_equals(ref.transform, precision=1e-9 * max(abs(ref.transform.a), 1e-12))
    )


@dataclass
class TimeStep:
    """One entry of the stack's time axis: one file, or several same-day files mosaicked."""

    #: Acquisition time of the entry (the earliest of its files).
    time: datetime
    #: Data files read for this entry, first valid pixel wins (one file unless ``same_day="mosaic"``).
    sources: list[SourceInfo]
    #: Matching mask file per source (``None`` where the date has no mask file).
    masks: list[SourceInfo | None]


@dataclass
class Stack:
    """A co-registered multitemporal stack of GeoTIFFs on one reference grid.

    Use as a context manager to keep the files open across many :meth:`read_window` calls
    (the chip stream does); outside one, each read opens and closes its files.
    """

    #: Time steps in chronological order.
    steps: list[TimeStep]
    #: The reference grid every file is aligned to (transform, CRS, width, height).
    grid: GeoGrid
    #: Band names, one per band (from the reference file's descriptions, or ``band_1`` ...).
    band_names: list[str]
    #: Nodata value of the stack (the reference file's, or the one passed to :func:`open_stack`).
    nodata: float | None
    #: Resampling used for files not on the reference grid (masks always use nearest).
    resampling: Resampling = Resampling.bilinear
    #: Values of a mask file that mean "masked" (``None``: any non-zero value, and the mask's nodata).
    mask_values: tuple[int, ...] | None = None
    #: Files left out by the same-day rule ``"first"`` (kept here so nothing is dropped silently).
    dropped: list[SourceInfo] = field(default_factory=list)
    #: Data type of the stored pixels.
    dtype: str = "float32"
    _handles: dict[Path, DatasetReader | WarpedVRT] | None = field(default=None, repr=False)
    _exit: ExitStack | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _depth: int = field(default=0, repr=False)

    # -- description ----------------------------------------------------------------------------
    @property
    def times(self) -> npt.NDArray[np.datetime64]:
        """Acquisition times, sorted, ``(T,)`` as ``datetime64[s]``."""
        return np.array([s.time for s in self.steps], dtype="datetime64[s]")

    @property
    def crs(self) -> CRS:
        """CRS of the reference grid."""
        return self.grid.crs

    @property
    def transform(self) -> Affine:
        """Affine transform of the reference grid (pixel edges → CRS)."""
        return self.grid.transform

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(T, C, H, W)``: dates, bands, rows, columns."""
        return (len(self.steps), len(self.band_names), self.grid.height, self.grid.width)

    @property
    def time_axis(self) -> TimeAxis:
        """The stack's date range as normalized time [0, 1]."""
        return TimeAxis.from_dates(self.times)

    @property
    def has_masks(self) -> bool:
        """Whether any date has a mask file."""
        return any(m is not None for step in self.steps for m in step.masks)

    @property
    def files(self) -> list[Path]:
        """All data files used, in time order."""
        return [s.path for step in self.steps for s in step.sources]

    @property
    def warped_files(self) -> list[Path]:
        """Data files that are not on the reference grid and are warped to it."""
        return [s.path for step in self.steps for s in step.sources if not _same_grid(s, self.grid)]

    # -- file handles -----------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, object]:
        # Open handles and the lock stay with the process; a copy (pickled to a worker) reopens lazily.
        state = {k: v for k, v in self.__dict__.items() if k not in ("_handles", "_exit", "_lock", "data", "mask")}
        state["_depth"] = 0
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._handles, self._exit, self._lock = None, None, threading.Lock()

    def __enter__(self) -> Stack:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        """Open every file (warped ones through a VRT) and keep them open until :meth:`close`.

        Re-entrant: nested ``with stack:`` blocks close the files only when the outermost one ends.
        """
        self._depth += 1
        if self._handles is not None:
            return
        self._exit = ExitStack()
        self._handles = {}
        for step in self.steps:
            for info, kind in [(s, "data") for s in step.sources] + [(m, "mask") for m in step.masks if m]:
                if info.path not in self._handles:
                    self._handles[info.path] = self._open_aligned(info, kind, self._exit)

    def close(self) -> None:
        """Close the files opened by :meth:`open` (once every nested :meth:`open` is closed)."""
        self._depth = max(self._depth - 1, 0)
        if self._depth == 0 and self._exit is not None:
            self._exit.close()
            self._exit, self._handles = None, None

    def _open_aligned(self, info: SourceInfo, kind: str, stack: ExitStack) -> DatasetReader | WarpedVRT:
        try:
            ds = stack.enter_context(rasterio.open(info.path))
        except rasterio.errors.RasterioIOError as exc:
            raise IngestError(f"{info.path}: cannot be opened ({exc})") from exc
        if _same_grid(info, self.grid):
            return ds
        resampling = Resampling.nearest if kind == "mask" else self.resampling
        vrt = WarpedVRT(
            ds,
            crs=self.grid.crs,
            transform=self.grid.transform,
            width=self.grid.width,
            height=self.grid.height,
            resampling=resampling,
            add_alpha=info.nodata is None,
        )
        return stack.enter_context(vrt)

    def _read(self, info: SourceInfo, kind: str, window: Window) -> np.ma.MaskedArray:
        """Read ``window`` of one file on the reference grid as a masked array ``(C, h, w)``."""
        indexes = list(range(1, info.count + 1))  # never the alpha band a WarpedVRT may add
        try:
            if self._handles is not None:
                with self._lock:
                    arr = self._handles[info.path].read(indexes, window=window, masked=True)
            else:
                with ExitStack() as tmp:
                    arr = self._open_aligned(info, kind, tmp).read(indexes, window=window, masked=True)
        except rasterio.errors.RasterioIOError as exc:
            raise IngestError(
                f"{info.path}: damaged data in window {window!r} ({exc}); re-download or re-export the file"
            ) from exc
        if kind == "data" and info.nodata is not None and not np.isnan(info.nodata):
            # Also honours a nodata value passed to open_stack for files that declare none.
            arr = np.ma.masked_where(np.ma.getmaskarray(arr) | (arr.data == info.nodata), arr.data)
        return arr

    def _read_mask(self, info: SourceInfo, window: Window) -> npt.NDArray[np.bool_]:
        arr = self._read(info, "mask", window)
        values = np.asarray(arr.data)[0]
        masked = np.ma.getmaskarray(arr)[0].copy()
        if self.mask_values is None:
            masked |= values != 0
        else:
            masked |= np.isin(values, self.mask_values)
        return masked

    # -- reading -----------------------------------------------------------------------------------
    def read_window(
        self, window: Window, steps: Sequence[int] | None = None
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
        """Read one window of every (or the selected) time step.

        Args:
            window: pixel window on the reference grid (must lie inside it).
            steps: indices of the time steps to read (default: all).

        Returns:
            ``data`` ``(T, C, h, w)`` float32, NaN where there is no data;
            ``nodata`` ``(T, C, h, w)`` bool, True where there is no data;
            ``mask`` ``(T, h, w)`` bool, True where the date's mask file masks the pixel (clouds);
            all False for dates without a mask file.

        """
        idx = range(len(self.steps)) if steps is None else steps
        h, w = int(window.height), int(window.width)
        c = len(self.band_names)
        data = np.full((len(idx), c, h, w), np.nan, dtype=np.float32)
        nodata = np.ones((len(idx), c, h, w), dtype=bool)
        mask = np.zeros((len(idx), h, w), dtype=bool)
        for out, i in enumerate(idx):
            step = self.steps[i]
            for info, mask_info in zip(step.sources, step.masks, strict=True):
                arr = self._read(info, "data", window)
                missing = np.ma.getmaskarray(arr) | ~np.isfinite(np.asarray(arr.data, dtype=np.float64))
                fill = nodata[out] & ~missing
                data[out][fill] = np.asarray(arr.data)[fill]
                nodata[out] &= missing
                if mask_info is not None:
                    # A mosaic pixel is masked when the file it came from masks it.
                    m = self._read_mask(mask_info, window)
                    mask[out] |= m & fill.any(axis=0)
                if not nodata[out].any():
                    break
        return data, nodata, mask

    # -- xarray views ----------------------------------------------------------------------------
    def _coords(self) -> dict[str, object]:
        coords: dict[str, object] = {"time": self.times.astype("datetime64[ns]")}
        t = self.transform
        if t.b == 0 and t.d == 0:
            coords["x"] = t.c + t.a * (np.arange(self.grid.width) + 0.5)
            coords["y"] = t.f + t.e * (np.arange(self.grid.height) + 0.5)
        else:  # rotated: no 1-D coordinate is exact; keep pixel indices and the transform
            coords["x"] = np.arange(self.grid.width)
            coords["y"] = np.arange(self.grid.height)
        coords["file"] = ("time", ["+".join(s.path.name for s in step.sources) for step in self.steps])
        return coords

    @cached_property
    def data(self) -> xr.DataArray:
        """Lazy ``(time, band, y, x)`` float32 DataArray (NaN = no data), with CRS and transform set.

        Each dask chunk reads only its own window of its own date.
        """
        chunk = 512
        per_time = [
            darr.from_array(
                _StepArray(self, i, "data"),
                chunks=(len(self.band_names), chunk, chunk),
                asarray=True,
                lock=False,
                name=f"agrivlm-stack-{id(self)}-{i}",
            )
            for i in range(len(self.steps))
        ]
        arr = xr.DataArray(
            darr.stack(per_time, axis=0),
            dims=("time", "band", "y", "x"),
            coords={**self._coords(), "band": self.band_names},
            name="data",
            attrs={"nodata": self.nodata if self.nodata is not None else np.nan},
        )
        return self._georef(arr)

    @cached_property
    def mask(self) -> xr.DataArray:
        """Lazy ``(time, y, x)`` bool DataArray: True where the date's mask file masks the pixel."""
        chunk = 512
        per_time = [
            darr.from_array(
                _StepArray(self, i, "mask"),
                chunks=(chunk, chunk),
                asarray=True,
                lock=False,
                name=f"agrivlm-mask-{id(self)}-{i}",
            )
            for i in range(len(self.steps))
        ]
        arr = xr.DataArray(
            darr.stack(per_time, axis=0), dims=("time", "y", "x"), coords=self._coords(), name="mask"
        )
        return self._georef(arr)

    def _georef(self, arr: xr.DataArray) -> xr.DataArray:
        arr = arr.rio.write_crs(self.crs)
        arr = arr.rio.write_transform(self.transform)
        return arr

    def dataset(self) -> xr.Dataset:
        """``data`` and ``mask`` together in one lazy Dataset."""
        return xr.Dataset({"data": self.data, "mask": self.mask})

    def summary(self) -> dict[str, object]:
        """A JSON-ready description: dates, CRS, size, bounds, files."""
        t, c, h, w = self.shape
        return {
            "dates": [str(x) for x in self.times],
            "n_dates": t,
            "n_bands": c,
            "band_names": self.band_names,
            "height": h,
            "width": w,
            "crs": self.crs.to_string(),
            "transform": list(self.transform)[:6],
            "bounds": list(self.grid.bounds),
            "nodata": self.nodata,
            "files": [str(p) for p in self.files],
            "warped_files": [str(p) for p in self.warped_files],
            "dropped_same_day": [str(s.path) for s in self.dropped],
            "has_masks": self.has_masks,
            "date_sources": sorted({s.date_source for step in self.steps for s in step.sources}),
        }


class _StepArray:
    """Array-like view of one time step for ``dask.array.from_array`` (reads windows on demand)."""

    def __init__(self, stack: Stack, index: int, kind: Literal["data", "mask"]) -> None:
        self.stack, self.index, self.kind = stack, index, kind
        c, h, w = len(stack.band_names), stack.grid.height, stack.grid.width
        self.shape: tuple[int, ...] = (c, h, w) if kind == "data" else (h, w)
        self.dtype = np.dtype(np.float32) if kind == "data" else np.dtype(bool)
        self.ndim = len(self.shape)

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        rows, cols = key[-2], key[-1]
        r0, r1, _ = rows.indices(self.shape[-2])
        c0, c1, _ = cols.indices(self.shape[-1])
        window = Window(c0, r0, max(c1 - c0, 0), max(r1 - r0, 0))
        if window.width == 0 or window.height == 0:
            return np.zeros(tuple(len(range(*k.indices(s))) for k, s in zip(key, self.shape, strict=True)), self.dtype)
        data, _, mask = self.stack.read_window(window, steps=[self.index])
        if self.kind == "mask":
            return mask[0]
        return data[0][key[0]] if len(key) == 3 else data[0]


def _match_masks(steps: list[TimeStep], mask_infos: list[SourceInfo]) -> None:
    by_time: dict[datetime, SourceInfo] = {}
    for info in mask_infos:
        if info.time in by_time:
            raise IngestError(
                f"{info.path}: two mask files for {info.time:%Y-%m-%d %H:%M:%S} "
                f"({by_time[info.time].path.name} too); keep one mask per acquisition"
            )
        by_time[info.time] = info
    used: set[datetime] = set()
    for step in steps:
        step.masks = [by_time.get(s.time) for s in step.sources]
        used.update(s.time for s in step.sources if s.time in by_time)
    unused = [info for t, info in by_time.items() if t not in used]
    if unused:
        raise IngestError(
            f"{unused[0].path}: mask file dated {unused[0].time:%Y-%m-%d %H:%M:%S} matches no data file "
            f"({len(unused)} unmatched); masks are matched to data by acquisition time"
        )
    for info in mask_infos:
        if info.count != 1:
            raise IngestError(f"{info.path}: a mask file must have 1 band, it has {info.count}")


def _group_same_day(infos: list[SourceInfo], rule: SameDay) -> tuple[list[TimeStep], list[SourceInfo]]:
    if rule == "keep":
        return [TimeStep(i.time, [i], [None]) for i in infos], []
    days: dict[object, list[SourceInfo]] = {}
    for info in infos:
        days.setdefault(info.time.date(), []).append(info)
    steps, dropped = [], []
    for group in days.values():
        if rule == "first":
            steps.append(TimeStep(group[0].time, [group[0]], [None]))
            dropped.extend(group[1:])
        else:  # mosaic
            steps.append(TimeStep(group[0].time, list(group), [None] * len(group)))
    return steps, dropped


def open_stack(
    inputs: Inputs,
    *,
    masks: Inputs | None = None,
    dates: Mapping[str, object] | None = None,
    reference: str | os.PathLike[str] | GeoGrid | None = None,
    band_names: Sequence[str] | None = None,
    nodata: float | None = None,
    same_day: SameDay = "keep",
    resampling: Resampling | str = Resampling.bilinear,
    mask_values: Iterable[int] | None = None,
) -> Stack:
    """Open GeoTIFFs of one area (one file per date, any band count) as a co-registered stack.

    Args:
        inputs: a folder, a glob pattern, a file, or a list of these.
        masks: per-date mask files (clouds/no data) in the same forms, matched to data by date.
        dates: explicit ``{file name or path: date}``; it wins over tags and names for the files it names.
        reference: the grid to align to: one of the files, another raster, or a :class:`GeoGrid`
            (default: the earliest file).
        band_names: names of the bands (default: the reference file's band descriptions).
        nodata: nodata value to assume for files that declare none (default: each file's own).
        same_day: several acquisitions on one calendar day are ``"keep"`` distinct time steps
            (default), ``"first"`` keeps the earliest (the others are listed in ``Stack.dropped``), or
            ``"mosaic"`` merges them (first valid pixel in time order wins).
        resampling: resampling for data files not on the reference grid.
        mask_values: mask-file values meaning "masked" (default: any non-zero value and the mask's nodata).

    Raises:
        IngestError: naming the file, for: no inputs, unreadable file, no CRS, no date,
            mixed band counts, masks that match no date.

    """
    if same_day not in ("keep", "first", "mosaic"):
        raise IngestError(f"same_day must be 'keep', 'first' or 'mosaic', not {same_day!r}")
    paths = resolve_inputs(inputs)
    infos = sorted((_inspect(resolve_date(p, dates)) for p in paths), key=lambda i: (i.time, str(i.path)))
    if nodata is not None:
        infos = [i if i.nodata is not None else _with_nodata(i, nodata) for i in infos]

    if isinstance(reference, GeoGrid):
        grid = reference
    elif reference is not None:
        grid = _inspect(DatedFile(Path(reference), datetime(1970, 1, 1), "reference")).grid
    else:
        grid = infos[0].grid
    ref_info = infos[0]
    for info in infos:
        if info.count != ref_info.count:
            raise IngestError(
                f"{info.path}: has {info.count} band(s) but {ref_info.path.name} has {ref_info.count}; "
                "a stack needs the same bands on every date (split it into one stack per band set)"
            )

    names = list(band_names) if band_names is not None else [
        d if d else f"band_{k + 1}" for k, d in enumerate(ref_info.descriptions)
    ]
    if len(names) != ref_info.count:
        raise IngestError(f"{len(names)} band names given for {ref_info.count} band(s) in {ref_info.path.name}")

    steps, dropped = _group_same_day(infos, same_day)
    if masks is not None:
        mask_paths = resolve_inputs(masks, what="mask files")
        mask_infos = [_inspect(resolve_date(p, dates)) for p in mask_paths]
        _match_masks(steps, mask_infos)

    stack = Stack(
        steps=steps,
        grid=grid,
        band_names=names,
        nodata=nodata if nodata is not None else ref_info.nodata,
        resampling=Resampling[resampling] if isinstance(resampling, str) else resampling,
        mask_values=tuple(mask_values) if mask_values is not None else None,
        dropped=dropped,
        dtype=ref_info.dtype,
    )
    if stack.warped_files:
        log.info("%d file(s) are not on the reference grid and are warped to it", len(stack.warped_files))
    return stack


def _with_nodata(info: SourceInfo, nodata: float) -> SourceInfo:
    return SourceInfo(**{**info.__dict__, "nodata": nodata})
