"""Open a multitemporal stack of GeoTIFFs as one co-registered ``(time, band, y, x)`` array.

``open_stack`` resolves the inputs (folder, glob, list), dates every file (:mod:`agrivlm.geo.dates`),
checks CRS and band counts, picks a reference grid and aligns every other file to it through a
``rasterio.vrt.WarpedVRT`` (lazy: pixels are warped only when a window is read). Per-date mask files
(clouds, no data) are matched to the data by acquisition time and carried as a boolean mask.

Reads are windowed: :meth:`Stack.read_window` reads one window of every date, and :attr:`Stack.data`
/ :attr:`Stack.mask` are dask-backed xarray objects whose chunks read their own windows. Nothing
reads a whole raster into memory.

Speed: a window is read in each file's own data type into one ``(T, C, h, w)`` buffer (GDAL decodes
straight into it, no masked arrays), and nodata/NaN become the ``nodata`` mask in one vectorized pass.
While the stack is open every thread keeps its own handles (GDAL handles are not thread-safe, and
GDAL releases the GIL while decoding), so several threads read in parallel without a lock.
:meth:`Stack.read_block` reads a window once and :meth:`WindowRead.cut` cuts sub-windows (chips) from
it: the chip stream reads block-aligned groups of chips that way.
"""

from __future__ import annotations

import glob as globlib
import logging
import math
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import dask.array as darr
import numpy as np
import numpy.typing as npt
import rasterio
import rasterio.env
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import MaskFlags, Resampling
from rasterio.io import DatasetReader
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from agrivlm.errors import IngestError
from agrivlm.geo.coords import GeoGrid, TimeAxis
from agrivlm.geo.dates import DatedFile, resolve_date
from agrivlm.geo.rasters import RasterPath
from agrivlm.geo.remote import RemotePath, is_remote
from agrivlm.geo.stac import is_stac, stac_rasters

log = logging.getLogger(__name__)

#: File extensions picked up when a folder is given.
RASTER_SUFFIXES = (".tif", ".tiff", ".TIF", ".TIFF")

Inputs = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
SameDay = Literal["keep", "first", "mosaic"]


@contextmanager
def gdal_cache_cap(nbytes: int | None) -> Iterator[None]:
    """Cap GDAL's (process-wide) raster block cache at ``nbytes`` inside the block, then restore it.

    GDAL keeps every decoded block of an open file until the cache (``GDAL_CACHEMAX``, by default 5 %
    of RAM) is full, so a long read grows the process by that much even when nothing is read twice.
    Left alone when ``nbytes`` is None or the user set ``GDAL_CACHEMAX`` (environment or a
    ``rasterio.Env``).
    """
    user_set = "GDAL_CACHEMAX" in os.environ or (rasterio.env.hasenv() and "GDAL_CACHEMAX" in rasterio.env.getenv())
    if nbytes is None or user_set:
        yield
        return
    with rasterio.Env(GDAL_CACHEMAX=int(nbytes)):
        yield


def resolve_inputs(inputs: Inputs, what: str = "inputs", assets: Sequence[str] | None = None) -> list[RasterPath]:
    """Expand a folder, a glob pattern, a file, or a list of any of these into GeoTIFF paths.

    A remote address (``https://…``, ``s3://…``, ``/vsicurl/…``: :mod:`agrivlm.geo.remote`) is one file, kept
    as a :class:`~agrivlm.geo.remote.RemotePath` (opening it tells whether it is there). A STAC JSON (``.json``,
    local or a URL: :mod:`agrivlm.geo.stac`) is one raster per item, its ``assets`` as bands.

    Raises:
        IngestError: when a path does not exist or nothing matches, or a remote address is a pattern or
            has a scheme GDAL cannot read.

    """
    items: Sequence[str | os.PathLike[str]] = [inputs] if isinstance(inputs, str | os.PathLike) else inputs
    paths: list[RasterPath] = []
    for item in items:
        if is_stac(item):
            paths.extend(stac_rasters(str(item), assets))
            continue
        if is_remote(item):
            address = str(item)
            if any(ch in address.split("?", 1)[0] for ch in "*?["):
                raise IngestError(f"{address}: a remote folder cannot be listed nor a remote pattern expanded; give "
                                  "the files one by one, or a STAC JSON listing them (with --assets)")
            try:
                paths.append(RemotePath(address))
            except ValueError as exc:
                raise IngestError(str(exc)) from exc
            continue
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

    path: RasterPath
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
    #: Internal block (tile or strip) shape ``(rows, cols)`` of band 1.
    block_shape: tuple[int, int] = (0, 0)
    #: True when every band's validity comes from the nodata value alone (or all pixels are valid), so
    #: a plain read plus a comparison gives the same mask as ``read(masked=True)``; False with an
    #: alpha band or an internal mask band.
    plain_mask: bool = True

    @property
    def grid(self) -> GeoGrid:
        """The file's own pixel grid."""
        return GeoGrid(self.transform, self.crs, self.width, self.height)


def _inspect(dated: DatedFile | RasterPath, dates: Mapping[str, object] | None = None) -> SourceInfo:
    """Open a file once: its date (when given a bare path: mapping, then its tags, then its name) and header."""
    path = dated.path if isinstance(dated, DatedFile) else dated
    try:
        with rasterio.open(path) as ds:
            if not isinstance(dated, DatedFile):
                dated = resolve_date(path, dates, tags=ds.tags())
            if ds.crs is None:
                raise IngestError(
                    f"{path}: no CRS; fix the file (e.g. gdal_edit.py -a_srs EPSG:xxxx), agrivlm never guesses one"
                )
            if ds.transform == Affine.identity() and not ds.gcps[0]:
                raise IngestError(f"{path}: no geotransform (identity); the file is not georeferenced")
            return SourceInfo(
                path=path,
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
                block_shape=(int(ds.block_shapes[0][0]), int(ds.block_shapes[0][1])),
                plain_mask=all(
                    set(flags) <= {MaskFlags.nodata, MaskFlags.all_valid} for flags in ds.mask_flag_enums
                ),
            )
    except rasterio.errors.RasterioIOError as exc:
        raise IngestError(f"{path}: cannot be opened as a raster ({exc}); check or re-download the file") from exc


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
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _depth: int = field(default=0, repr=False)
    #: Per-thread open handles while the stack is open (``local.handles``, ``local.session``).
    _local: threading.local = field(default_factory=threading.local, repr=False)
    #: One ExitStack per thread that opened files in the current session; closed by :meth:`close`.
    _exits: list[ExitStack] = field(default_factory=list, repr=False)
    #: Incremented by every outermost :meth:`open`, so a thread's handles from an earlier session are
    #: never reused.
    _session: int = field(default=0, repr=False)

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
    def unmasked_steps(self) -> list[TimeStep]:
        """Dates read (at least partly) without a mask although the stack has masks (empty without any)."""
        if not self.has_masks:
            return []
        return [step for step in self.steps if any(m is None for m in step.masks)]

    @property
    def files(self) -> list[RasterPath]:
        """All data files used, in time order."""
        return [s.path for step in self.steps for s in step.sources]

    @property
    def warped_files(self) -> list[RasterPath]:
        """Data files that are not on the reference grid and are warped to it."""
        return [s.path for step in self.steps for s in step.sources if not _same_grid(s, self.grid)]

    # -- file handles -----------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, object]:
        # Open handles and the lock stay with the process; a copy (pickled to a worker) reopens lazily.
        private = ("_lock", "_local", "_exits", "data", "mask")
        state = {k: v for k, v in self.__dict__.items() if k not in private}
        state["_depth"] = 0
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._lock, self._local, self._exits = threading.Lock(), threading.local(), []

    def __enter__(self) -> Stack:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def is_open(self) -> bool:
        """Whether files stay open between reads (inside ``with stack:`` or :meth:`open`)."""
        return self._depth > 0

    def open(self) -> None:
        """Keep files open between reads until :meth:`close` (each thread opens its own on first use).

        Re-entrant: nested ``with stack:`` blocks close the files only when the outermost one ends.
        A GDAL dataset handle must not be shared between threads, so every thread reading while the
        stack is open opens the files it reads (warped ones through a VRT) once, and :meth:`close`
        closes all of them. :func:`open_stack` has already opened every file once to read its header.
        """
        with self._lock:
            self._depth += 1
            if self._depth == 1:
                self._session += 1

    def close(self) -> None:
        """Close the files opened by :meth:`open` (once every nested :meth:`open` is closed)."""
        with self._lock:
            self._depth = max(self._depth - 1, 0)
            if self._depth > 0:
                return
            exits, self._exits = self._exits, []
        for ex in exits:
            ex.close()

    def _thread_handles(self) -> dict[RasterPath, DatasetReader | WarpedVRT] | None:
        """The calling thread's handle cache for the current session, or None when the stack is closed."""
        if self._depth == 0:
            return None
        local = self._local
        if getattr(local, "session", None) != self._session:
            exit_stack = ExitStack()
            with self._lock:
                if self._depth == 0:
                    return None
                self._exits.append(exit_stack)
            local.handles, local.exit, local.session = {}, exit_stack, self._session
        handles: dict[RasterPath, DatasetReader | WarpedVRT] = local.handles
        return handles

    def _handle(
        self, handles: dict[RasterPath, DatasetReader | WarpedVRT], info: SourceInfo, kind: str
    ) -> DatasetReader | WarpedVRT:
        ds = handles.get(info.path)
        if ds is None:
            ds = handles[info.path] = self._open_aligned(info, kind, self._local.exit)
        return ds

    def _open_aligned(self, info: SourceInfo, kind: str, stack: ExitStack) -> DatasetReader | WarpedVRT:
        # Closed through ``close()`` callbacks, not as context managers: a dataset entered as one ties
        # itself to the opening thread's rasterio Env, and the stack closes every thread's handles
        # from the thread that closes the stack.
        try:
            ds = rasterio.open(info.path)
            stack.callback(ds.close)
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
        stack.callback(vrt.close)
        return vrt

    def _read_source(
        self, info: SourceInfo, kind: str, window: Window, out: npt.NDArray[Any] | None = None
    ) -> tuple[npt.NDArray[Any], npt.NDArray[np.bool_] | None]:
        """Read ``window`` of one file on the reference grid, in the file's own data type.

        Returns:
            ``values`` ``(C, h, w)`` (``out`` when given), and ``missing`` ``(C, h, w)`` bool where
            the file's own mask (alpha band, mask band, warp edge) says "no data", or ``None`` when
            the nodata value (and NaN) alone decide it (see :func:`missing_values`).

        """
        indexes = list(range(1, info.count + 1))  # never the alpha band a WarpedVRT may add
        plain = info.plain_mask and _same_grid(info, self.grid)
        try:
            handles = self._thread_handles()
            with ExitStack() as tmp:
                ds = self._handle(handles, info, kind) if handles is not None else self._open_aligned(info, kind, tmp)
                if plain:
                    return ds.read(indexes, window=window, out=out), None
                arr = ds.read(indexes, window=window, masked=True)
        except rasterio.errors.RasterioIOError as exc:
            raise IngestError(
                f"{info.path}: damaged data in window {window!r} ({exc}); re-download or re-export the file"
            ) from exc
        values = np.asarray(arr.data)
        if out is not None:
            out[...] = values
            values = out
        return values, np.ma.getmaskarray(arr)

    def _cloud_mask(self, info: SourceInfo, window: Window) -> npt.NDArray[np.bool_]:
        """``(h, w)`` True where the mask file ``info`` masks the pixel (or has no data)."""
        values, missing = self._read_source(info, "mask", window)
        masked = missing[0].copy() if missing is not None else missing_values(values[0], info.nodata)
        if self.mask_values is None:
            masked |= values[0] != 0
        else:
            masked |= np.isin(values[0], self.mask_values)
        return masked

    # -- reading -----------------------------------------------------------------------------------
    def read_block(
        self, window: Window, steps: Sequence[int] | None = None, scratch: npt.NDArray[np.uint8] | None = None
    ) -> WindowRead:
        """Read ``window`` of every (or the selected) time step once, in the files' own data type.

        Cut chips from it with :meth:`WindowRead.cut`. When every step has one file, all on the
        reference grid with the same data type and a nodata-only mask, the pixels land in one
        ``(T, C, h, w)`` array (each date decoded by GDAL straight into its slice); that array is a
        view of ``scratch`` (a 1-D uint8 buffer) when it is large enough, so a reader reusing one
        buffer for every window spares the page faults of a fresh allocation each time.
        """
        idx = list(range(len(self.steps))) if steps is None else list(steps)
        h, w = int(window.height), int(window.width)
        chosen = [self.steps[i] for i in idx]
        firsts = [step.sources[0] for step in chosen]
        uniform = bool(chosen) and all(
            len(step.sources) == 1 and s.plain_mask and s.dtype == firsts[0].dtype and _same_grid(s, self.grid)
            for step, s in zip(chosen, firsts, strict=True)
        )
        stacked = None
        if uniform:
            shape, dtype = (len(idx), len(self.band_names), h, w), np.dtype(firsts[0].dtype)
            nbytes = math.prod(shape) * dtype.itemsize
            if scratch is not None and scratch.nbytes >= nbytes:
                stacked = scratch[:nbytes].view(dtype).reshape(shape)
            else:
                stacked = np.empty(shape, dtype=dtype)
        values: list[list[npt.NDArray[Any]]] = []
        missing: list[list[npt.NDArray[np.bool_] | None]] = []
        clouds: list[list[npt.NDArray[np.bool_] | None]] = []
        for k, step in enumerate(chosen):
            vals, miss, cl = [], [], []
            for j, (info, mask_info) in enumerate(zip(step.sources, step.masks, strict=True)):
                out = stacked[k] if stacked is not None and j == 0 else None
                v, m = self._read_source(info, "data", window, out=out)
                vals.append(v)
                miss.append(m)
                cl.append(self._cloud_mask(mask_info, window) if mask_info is not None else None)
            values.append(vals)
            missing.append(miss)
            clouds.append(cl)
        return WindowRead(
            window=window,
            values=values,
            missing=missing,
            clouds=clouds,
            nodata_values=[[s.nodata for s in step.sources] for step in chosen],
            stacked=stacked,
        )

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
        block = self.read_block(window, steps)
        return block.cut(0, 0, int(window.height), int(window.width))

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
            "unmasked_dates": [f"{st.time:%Y-%m-%d}" for st in self.unmasked_steps],
            "date_sources": sorted({s.date_source for step in self.steps for s in step.sources}),
        }


def missing_values(values: npt.NDArray[Any], nodata: float | None) -> npt.NDArray[np.bool_]:
    """``values == nodata``, and NaN/±inf for floats: where a file without a mask band has no data.

    A nodata value the data type cannot hold (e.g. -9999 for uint16) matches nothing.
    """
    dtype = values.dtype
    if dtype.kind == "f":
        missing = ~np.isfinite(values)
        if nodata is not None and np.isfinite(nodata):
            missing |= values == dtype.type(nodata)
        return missing
    if nodata is None or not np.isfinite(nodata) or float(nodata) != int(nodata):
        return np.zeros(values.shape, dtype=bool)
    info = np.iinfo(dtype) if dtype.kind in "iu" else None
    if info is not None and not info.min <= int(nodata) <= info.max:
        return np.zeros(values.shape, dtype=bool)
    return values == dtype.type(int(nodata))


def may_be_missing(values: npt.NDArray[Any], nodata: float | None) -> bool:
    """False only when :func:`missing_values` is surely all False (checked by reductions, no mask built).

    Integers: the nodata value lies outside ``[min, max]``; floats: the sum is finite (no NaN/inf) and
    the nodata value lies outside ``[min, max]``. Reading is cheaper than building the boolean mask.
    """
    if values.size == 0:
        return False
    if values.dtype.kind == "f":
        if not np.isfinite(values.sum(dtype=np.float64)):
            return True
        if nodata is None or not np.isfinite(nodata):
            return False
    elif nodata is None or not np.isfinite(nodata):
        return False
    low = values.min()
    if nodata < low:
        return False
    return bool(nodata <= values.max())


def _same_value(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return a == b or (np.isnan(a) and np.isnan(b))


@dataclass
class WindowRead:
    """One window of a stack read once, in the files' own data types; :meth:`cut` makes chips of it.

    Shapes: ``values[t][s]`` ``(C, h, w)`` for step ``t`` and its source file ``s`` (several only for
    same-day mosaics); ``missing[t][s]`` ``(C, h, w)`` bool or ``None`` (then the nodata value decides);
    ``clouds[t][s]`` ``(h, w)`` bool or ``None`` (no mask file); ``stacked`` ``(T, C, h, w)`` when every
    step has one plain file of one data type (``values[t][0]`` are then views of it).
    """

    window: Window
    values: list[list[npt.NDArray[Any]]]
    missing: list[list[npt.NDArray[np.bool_] | None]]
    clouds: list[list[npt.NDArray[np.bool_] | None]]
    nodata_values: list[list[float | None]]
    stacked: npt.NDArray[Any] | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held by the decoded pixels and masks."""
        arrays = [a for group in (self.values, self.missing, self.clouds) for row in group for a in row]
        return sum(a.nbytes for a in arrays if a is not None)

    def cut(
        self, row_off: int, col_off: int, height: int, width: int
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
        """The ``(data, nodata, mask)`` of a sub-window, offsets relative to :attr:`window`.

        ``data`` ``(T, C, height, width)`` float32 (NaN = no data), ``nodata`` the same shape bool,
        ``mask`` ``(T, height, width)`` bool (clouds); new contiguous arrays, exactly what
        :meth:`Stack.read_window` returns for that window. Same-day mosaics: first valid pixel wins,
        and a pixel is masked when the file it came from masks it.
        """
        data, nodata, mask, _ = self.cut_flagged(row_off, col_off, height, width)
        return data, nodata, mask

    def cut_flagged(
        self, row_off: int, col_off: int, height: int, width: int, native: bool = False
    ) -> tuple[npt.NDArray[Any], npt.NDArray[np.bool_], npt.NDArray[np.bool_], bool]:
        """:meth:`cut`, and whether the sub-window holds no data at all.

        The flag costs no scan when the min/max reductions already showed there is no nodata. ``native``: where
        the window was read into one array (:attr:`stacked`: every date one file of one data type on the grid),
        ``data`` keeps the files' data type and values, nodata pixels included (``nodata`` marks them): one
        copy instead of a conversion to float32 and a NaN fill; elsewhere float32 as without it.
        """
        rs, cs = slice(row_off, row_off + height), slice(col_off, col_off + width)
        n_steps = len(self.values)
        n_bands = self.values[0][0].shape[0] if n_steps else 0
        first = self.nodata_values[0][0] if n_steps else None
        if self.stacked is not None and all(_same_value(v, first) for row in self.nodata_values for v in row):
            part = self.stacked[:, :, rs, cs]
            data = part.copy() if native else part.astype(np.float32)
            has_missing = may_be_missing(part, first)
            if has_missing:
                nodata = missing_values(part, first)
                if not native:
                    np.copyto(data, np.float32(np.nan), where=nodata)
            else:  # the usual chip: nothing to mask, and np.zeros costs no pass over memory
                nodata = np.zeros(part.shape, dtype=bool)
            mask = np.zeros((n_steps, height, width), dtype=bool)
            with_clouds = [t for t, row in enumerate(self.clouds) if row[0] is not None]
            any_valid = np.logical_not(nodata.all(axis=1)) if has_missing and with_clouds else None
            for t in with_clouds:
                cloud = self.clouds[t][0]
                assert cloud is not None
                if any_valid is None:
                    mask[t] = cloud[rs, cs]
                else:
                    np.logical_and(cloud[rs, cs], any_valid[t], out=mask[t])
            return data, nodata, mask, bool(has_missing and nodata.all())
        data = np.full((n_steps, n_bands, height, width), np.nan, dtype=np.float32)
        nodata = np.ones((n_steps, n_bands, height, width), dtype=bool)
        mask = np.zeros((n_steps, height, width), dtype=bool)
        for t in range(n_steps):
            for values, explicit, cloud, nd in zip(
                self.values[t], self.missing[t], self.clouds[t], self.nodata_values[t], strict=True
            ):
                part = values[:, rs, cs]
                missing = missing_values(part, nd)
                if explicit is not None:
                    missing |= explicit[:, rs, cs]
                fill = nodata[t] & ~missing
                data[t][fill] = part[fill]
                nodata[t] &= missing
                if cloud is not None:
                    mask[t] |= cloud[rs, cs] & fill.any(axis=0)
                if not nodata[t].any():
                    break
        return data, nodata, mask, bool(nodata.all())



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
    assets: Sequence[str] | None = None,
    mask_assets: Sequence[str] | None = None,
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
        assets: with a STAC JSON as ``inputs``, the assets that are the bands, in order (``["B04", "B08"]``;
            default: the items' one raster data asset); see :mod:`agrivlm.geo.stac`.
        mask_assets: the same for a STAC JSON as ``masks`` (``["SCL"]``, with ``mask_values``).

    Raises:
        IngestError: naming the file, for: no inputs, unreadable file, no CRS, no date,
            mixed band counts, masks that match no date.

    """
    if same_day not in ("keep", "first", "mosaic"):
        raise IngestError(f"same_day must be 'keep', 'first' or 'mosaic', not {same_day!r}")
    infos = _dated_sources(inputs, dates, nodata, assets)
    grid = _reference_grid(reference, infos)
    ref_info = infos[0]
    _check_band_counts(infos)
    names = _band_names(band_names, ref_info)
    steps, dropped = _group_same_day(infos, same_day)
    if masks is not None:
        mask_paths = resolve_inputs(masks, what="mask files", assets=mask_assets)
        _match_masks(steps, [_inspect(p, dates) for p in mask_paths])
    stack = Stack(
        steps=steps, grid=grid, band_names=names, nodata=nodata if nodata is not None else ref_info.nodata,
        resampling=Resampling[resampling] if isinstance(resampling, str) else resampling,
        mask_values=tuple(mask_values) if mask_values is not None else None, dropped=dropped, dtype=ref_info.dtype,
    )
    _check_alignment(stack)
    return stack


def _dated_sources(inputs: Inputs, dates: Mapping[str, object] | None, nodata: float | None,
                   assets: Sequence[str] | None) -> list[SourceInfo]:
    """Every data file inspected, in time order (then by path), with ``nodata`` for files that declare none."""
    paths = resolve_inputs(inputs, assets=assets)
    infos = sorted((_inspect(p, dates) for p in paths), key=lambda i: (i.time, str(i.path)))
    if nodata is not None:
        infos = [i if i.nodata is not None else _with_nodata(i, nodata) for i in infos]
    return infos


def _reference_grid(reference: str | os.PathLike[str] | GeoGrid | None, infos: list[SourceInfo]) -> GeoGrid:
    """The grid to align to: the one given, the grid of the raster given, else the earliest file's."""
    if isinstance(reference, GeoGrid):
        return reference
    if reference is not None:
        return _inspect(DatedFile(Path(reference), datetime(1970, 1, 1), "reference")).grid
    return infos[0].grid


def _check_band_counts(infos: list[SourceInfo]) -> None:
    """Refuse files whose band count differs from the earliest file's.

    Raises:
        IngestError: naming the first file with another band count.

    """
    ref_info = infos[0]
    for info in infos:
        if info.count != ref_info.count:
            raise IngestError(
                f"{info.path}: has {info.count} band(s) but {ref_info.path.name} has {ref_info.count}; "
                "a stack needs the same bands on every date (split it into one stack per band set)"
            )


def _band_names(band_names: Sequence[str] | None, ref_info: SourceInfo) -> list[str]:
    """The names given (one per band), else the reference file's band descriptions (``band_<k>`` where empty)."""
    names = list(band_names) if band_names is not None else [
        d if d else f"band_{k + 1}" for k, d in enumerate(ref_info.descriptions)
    ]
    if len(names) != ref_info.count:
        raise IngestError(f"{len(names)} band names given for {ref_info.count} band(s) in {ref_info.path.name}")
    return names


def _check_alignment(stack: Stack) -> None:
    """Check the files warped to the grid meet it, and say which dates are read without a mask."""
    if stack.warped_files:
        _check_on_grid(stack)
        log.info("%d file(s) are not on the reference grid and are warped to it", len(stack.warped_files))
    bare = stack.unmasked_steps
    if bare:  # a date without its mask is read unmasked: say so, never quietly
        log.warning("masks cover %d of %d dates; %d date(s) are used without a mask (first: %s, %s)",
                    len(stack.steps) - len(bare), len(stack.steps), len(bare), f"{bare[0].time:%Y-%m-%d}",
                    bare[0].sources[0].path.name)


def _check_on_grid(stack: Stack) -> None:
    """Refuse a data file whose extent does not meet the stack's grid (it would be warped to no data only).

    Raises:
        IngestError: naming the file, its bounds in the stack's CRS and the grid's bounds.

    """
    from rasterio.warp import transform_bounds

    gx0, gy0, gx1, gy1 = stack.grid.bounds
    for step in stack.steps:
        for src in step.sources:
            if _same_grid(src, stack.grid):
                continue
            try:
                x0, y0, x1, y1 = transform_bounds(src.crs, stack.crs, *src.grid.bounds)
            except Exception as exc:  # noqa: BLE001 — rasterio raises several types for impossible transforms
                raise IngestError(f"{src.path}: its extent cannot be put in the stack's CRS "
                                  f"({stack.crs.to_string()}): {exc}") from exc
            if x1 <= gx0 or x0 >= gx1 or y1 <= gy0 or y0 >= gy1:
                raise IngestError(
                    f"{src.path}: its extent ({x0:.0f}, {y0:.0f}, {x1:.0f}, {y1:.0f} in {stack.crs.to_string()}) "
                    f"does not meet the stack's grid ({gx0:.0f}, {gy0:.0f}, {gx1:.0f}, {gy1:.0f}): it would be "
                    "all no data; check its CRS, or leave it out (a file of another area)"
                )


def _with_nodata(info: SourceInfo, nodata: float) -> SourceInfo:
    return SourceInfo(**{**info.__dict__, "nodata": nodata})
