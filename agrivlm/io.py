"""Files written so that a reader never sees half of one; vector layers and tables read with one-line errors.

Every output of agrivlm goes through these helpers: a file is written to a hidden temporary beside its target
and renamed over it (:func:`atomic_path`), a folder is built beside its target and swapped in
(:func:`atomic_dir`), a set of files that belong together is committed as one unit (:func:`atomic_unit`,
recovered by :func:`recover_folder` after a kill), so an interrupted run leaves the earlier result intact.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # geopandas/pandas are loaded only where a layer or table is read
    import geopandas as gpd
    import pandas as pd

log = logging.getLogger(__name__)

#: Prefix of the hidden folder :func:`atomic_unit` builds its files in.
UNIT_TMP = ".unit.tmp-"
#: Prefix of that folder once complete (the commit point): its files are moved into place, by this run or,
#: after a kill, by the next :func:`recover_folder`.
UNIT_COMMIT = ".unit.commit-"
#: Hidden temporaries of :func:`atomic_path` (``mkstemp``: ``.<stem>.XXXXXXXX<suffix>``) and the GeoPackage
#: (SQLite) side files of one (``-journal``, ``-wal``, ``-shm``).
_ATOMIC_TMP = re.compile(r"^\.[^/]+\.[A-Za-z0-9_]{8}\.[A-Za-z0-9]+(-journal|-wal|-shm)?$")

def ensure_writable_dir(folder: Path, error: type[Exception], what: str = "output folder") -> None:
    """Check, before any work is done, that files can be written in ``folder``; leave nothing behind.

    The missing part of the path is created, a temporary file written in it, and what was created removed
    again, so a run that then fails on its inputs leaves no empty folder.

    Raises:
        error: one line naming the folder and why it cannot be written (an impossible path, a file in the way,
            no permission, a read-only file system).

    """
    created = []
    probe = folder
    while not probe.exists() and probe != probe.parent:
        created.append(probe)
        probe = probe.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise error(f"{folder}: cannot write the {what} there ({reason}); choose another --out") from exc
    finally:
        for path in created:  # deepest first
            try:
                path.rmdir()
            except OSError:
                break


def remove_stale_temporaries(target: Path, before: float) -> list[str]:
    """Remove what killed runs left beside ``target``; return the names of what was found.

    :func:`atomic_path` temporaries of ``target`` (``.<stem>.XXXXXXXX<suffix>`` and their GeoPackage side
    files) and :func:`atomic_dir` folders (``.<name>.tmp-*``) last changed before ``before`` (seconds since the
    epoch) are removed; a previous ``target`` moved aside by :func:`atomic_dir` (``.<name>.old-*``) is put back
    when ``target`` itself is gone (a kill between the two renames), else removed. Only ``target``'s own
    temporaries are touched, never other hidden files of the folder. What was found is logged as a warning.
    """
    folder = target.parent
    if not folder.is_dir():
        return []
    own = re.compile(rf"^\.{re.escape(target.stem)}\.[A-Za-z0-9_]{{8}}{re.escape(target.suffix)}(-journal|-wal|-shm)?$")
    found = []
    for path in sorted(folder.iterdir()):
        name = path.name
        try:
            if path.lstat().st_mtime >= before:
                continue
        except FileNotFoundError:
            continue
        if name.startswith(f".{target.name}.old-") and path.is_dir():
            kept = path / target.name
            if kept.exists() and not target.exists():
                os.replace(kept, target)
            shutil.rmtree(path, ignore_errors=True)
            found.append(name)
        elif name.startswith(f".{target.name}.tmp-") and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            found.append(name)
        elif own.match(name) and path.is_file():
            path.unlink()
            found.append(name)
    if found:
        fsync_dir(folder)
        log.warning("%s: removed what an interrupted run left beside it: %s", target, ", ".join(found))
    return found


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    os.unlink(tmp)  # drivers (GPKG) want to create the file themselves
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a hidden temporary folder beside ``target``, which replaces ``target`` if the block succeeds.

    The folder is ``.<name>.tmp-XXXX``; a previous ``target`` is moved aside first and removed after; a failed
    block removes the folder. A run killed inside the block leaves ``target`` as it was (absent, or the
    previous complete one); what it left beside it is cleaned up (or put back) when the next one starts
    (:func:`remove_stale_temporaries`).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target, time.time())
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_unit(folder: Path) -> Iterator[Path]:
    """Yield a hidden temporary folder inside ``folder``; its files replace those of the same names as one unit.

    The caller writes every file of the unit (e.g. ``chips.gpkg`` and ``summary.json``) into the yielded
    folder. When the block succeeds the folder is renamed ``.unit.commit-XXXX`` — the commit point — and its
    files are then moved into ``folder``. A failure or a kill before the commit point leaves ``folder`` as it
    was (the temporary is removed, or found by the next :func:`recover_folder`); a kill after it is completed
    by the next :func:`recover_folder`, so the files never stay a mix of two runs.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=UNIT_TMP, dir=folder))
    try:
        yield tmp
        commit = folder / (UNIT_COMMIT + tmp.name[len(UNIT_TMP):])
        os.replace(tmp, commit)
        fsync_dir(folder)
        _install_unit(commit, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _install_unit(commit: Path, folder: Path) -> None:
    """Move the files of a committed unit into ``folder`` (``summary.json``-like files last), then drop it."""
    for path in sorted(commit.iterdir(), key=lambda p: (p.suffix == ".json", p.name)):
        _install_file(path, folder / path.name)
    fsync_dir(folder)
    commit.rmdir()


def _install_file(source: Path, target: Path) -> None:
    """Rename one file of a committed unit onto its target."""
    os.replace(source, target)


def recover_folder(folder: Path, before: float) -> list[str]:
    """Finish or remove what killed runs left in ``folder``; return the names of what was found.

    Committed units (``.unit.commit-*``) are completed, oldest first. Unfinished units (``.unit.tmp-*``) and
    :func:`atomic_path` temporaries (``.chips.XXXXXXXX.gpkg`` and its ``-journal``, ``.summary.XXXXXXXX.json``,
    …) last changed before ``before`` (seconds since the epoch: the current run's start, so a concurrent run's
    temporaries are left alone) are removed.
    """
    if not folder.is_dir():
        return []
    found = []
    entries = sorted(folder.iterdir(), key=lambda p: p.lstat().st_mtime_ns)
    for path in entries:
        if path.name.startswith(UNIT_COMMIT) and path.is_dir():
            _install_unit(path, folder)
            found.append(path.name)
    for path in entries:
        if not path.exists() or path.lstat().st_mtime >= before:
            continue
        if path.name.startswith(UNIT_TMP) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            found.append(path.name)
        elif _ATOMIC_TMP.match(path.name) and path.is_file():
            path.unlink()
            found.append(path.name)
    return found


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (renames) to disk where the platform allows it (not every platform opens folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


#: The timestamp GeoPackages are written with (GDAL's ``OGR_CURRENT_DATE``): fixed, so the same content gives the
#: same bytes (a GeoPackage otherwise records the time it was written in ``gpkg_contents.last_change``).
GPKG_DATE = "2000-01-01T00:00:00Z"


@contextmanager
def fixed_gpkg_date() -> Iterator[None]:
    """GeoPackages written inside this block carry :data:`GPKG_DATE` instead of the time of writing."""
    import pyogrio

    pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": GPKG_DATE})
    try:
        yield
    finally:
        pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": None})


# -- reading vector layers and attribute tables -----------------------------------------------------------
def _existing(path: str | os.PathLike[str], what: str, error: type[Exception], hint: str) -> Path:
    """``path`` as a :class:`~pathlib.Path`; ``error`` naming it when there is nothing there."""
    path = Path(path)
    if not path.exists():
        raise error(f"{path}: no such {what} file{hint}")
    return path


def read_vector(path: str | os.PathLike[str], what: str, error: type[Exception], *, layer: str | None = None,
                hint: str = "") -> gpd.GeoDataFrame:
    """A vector layer: any format GDAL reads (GeoPackage, GeoJSON, Shapefile, FlatGeobuf …), GeoParquet by suffix.

    Args:
        path: the file.
        what: what the layer is, for messages (``"fields layer"``, ``"parcel"``, ``"truth layer"``).
        error: the exception type to raise (each floor keeps its own error class).
        layer: a layer of a multi-layer file (GeoPackage); None: the first.
        hint: appended to the missing-file message (``" (--fields)"``).

    Raises:
        error: one line naming the file: it does not exist, or it cannot be read (with the reader's reason).

    """
    import geopandas as gpd

    path = _existing(path, what, error, hint)
    try:
        if path.suffix.lower() == ".parquet":
            return gpd.read_parquet(path)
        return gpd.read_file(path, layer=layer) if layer else gpd.read_file(path)
    except Exception as exc:  # noqa: BLE001 — pyogrio/pyarrow raise several types; all mean "cannot read this file"
        raise error(f"{path}: cannot be read as a {what} ({type(exc).__name__}: {exc})") from exc


def require_crs(frame: gpd.GeoDataFrame, source: str | os.PathLike[str], what: str, error: type[Exception]) -> None:
    """Refuse a layer without a CRS, in one line naming it: agrivlm never guesses a CRS."""
    if frame.crs is None:
        raise error(f"{source}: the {what} has no CRS; set the one it is in (e.g. `ogr2ogr -a_srs EPSG:xxxx` or "
                    "GeoDataFrame.set_crs): agrivlm never guesses a CRS")


def read_table(path: str | os.PathLike[str], what: str, error: type[Exception]) -> pd.DataFrame:
    """An attribute table: CSV/TXT (every cell a string, ``""`` for empty), Parquet, or a vector file's attributes.

    Raises:
        error: one line naming the file: it does not exist, or it cannot be read (with the reader's reason).

    """
    import pandas as pd

    path = _existing(path, what, error, "; pass a CSV, GeoPackage or GeoJSON table")
    try:
        suffix = path.suffix.lower()
        if suffix in (".csv", ".txt"):
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        if suffix == ".parquet":
            return pd.read_parquet(path)
        import pyogrio

        return pyogrio.read_dataframe(path, read_geometry=False)
    except Exception as exc:  # noqa: BLE001 — pandas/pyogrio raise many types; name the file and keep the cause
        raise error(f"{path}: cannot be read as a {what} table ({type(exc).__name__}: {exc})") from exc


def write_json(path: Path, data: object, *, sort_keys: bool = False, strict: bool = False,
               trailing_newline: bool = True) -> Path:
    """``data`` as indented JSON, replacing ``path`` whole (:func:`atomic_path`); returns ``path``.

    ``strict``: NaN and values JSON cannot hold are errors (scores: pass them through
    :func:`agrivlm.eval.common.json_safe`); otherwise such values are written as strings (``str``).
    """
    import json

    text = json.dumps(data, indent=2, sort_keys=sort_keys, allow_nan=not strict, default=None if strict else str)
    with atomic_path(path) as tmp:
        tmp.write_text(text + ("\n" if trailing_newline else ""), encoding="utf-8")
    return path


#: Columns tried, in this order, as a field layer's ids when none is named: the first whose values are unique
#: (and none empty) is used; without one, the row numbers. One rule for ``infer --fields``, ``eval`` and the
#: explorer.
FIELD_ID_COLUMNS: tuple[str, ...] = ("field_id", "id", "index")


def unique_ids(values: pd.Series) -> bool:
    """Whether ``values`` can serve as ids: none missing, none repeated (compared as strings)."""
    return bool(values.notna().all() and values.astype(str).is_unique)


def field_ids(frame: pd.DataFrame, source: str | os.PathLike[str], requested: str | None, error: type[Exception],
              option: str) -> tuple[pd.Series, str, list[str]]:
    """The ids of a field layer's rows as strings, the column they came from (or ``"row number"``), and notes.

    Args:
        frame: the layer (its geometry column is never an id).
        source: the file, for messages.
        requested: the column the user named (``option``), which must exist and be unique; None: the first unique
            column of :data:`FIELD_ID_COLUMNS`, each non-unique one noted, else the row numbers.
        error: the exception type to raise.
        option: the command-line option that names the column (``--field-id``, ``--truth-id``), for messages.

    Raises:
        error: the requested column does not exist or its values repeat or are empty.

    """
    import pandas as pd

    notes: list[str] = []
    if requested is not None:
        if requested not in frame.columns:
            names = ", ".join(str(c) for c in frame.columns if str(frame[c].dtype) != "geometry")
            raise error(f"{source}: no column {requested!r} for field ids ({option}); columns are {names}")
        if not unique_ids(frame[requested]):
            raise error(f"{source}: column {requested!r} is not a unique id (repeated or empty values); "
                        f"name another with {option}")
        return frame[requested].astype(str), requested, notes
    for name in FIELD_ID_COLUMNS:
        if name in frame.columns:
            if unique_ids(frame[name]):
                return frame[name].astype(str), name, notes
            notes.append(f"column {name!r} is not unique, so it is not used as the field id")
    return pd.Series([str(i) for i in range(len(frame))], index=frame.index), "row number", notes
