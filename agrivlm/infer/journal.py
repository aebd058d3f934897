"""The journal of an inference run: append-only JSONL, one fsynced line per finished batch of chips.

Line 1 is the header: the settings that decide the answers (model, task, inputs, chip grid, frames,
bands, generation). Then, in the order they happen:

* ``{"type": "stack", "stack": KEY, ...}`` when a stack opened (its CRS, bounds, chip count and content
  fingerprint, :mod:`agrivlm.infer.fingerprint`: a resume refuses a stack that changed since);
* ``{"type": "chips", "stack": KEY, "chips": [...]}`` a finished batch: one record per chip, with its
  answers and features (geometry as WKB hex, so a reload gives the same bytes), or a skipped chip with the
  reason;
* ``{"type": "stack_done", "stack": KEY, ...}`` when every chip of a stack is journaled.

Each has its type here (:class:`StackEntry`, :class:`ChipsEntry` with its :class:`ChipRecord` s, their
:class:`AnswerRecord` s and :class:`FeatureRecord` s, :class:`StackDoneEntry`), so what the runner writes and
what the outputs read is checked by mypy against one declaration.

A batch is written as ONE line with one ``write`` and an ``fsync``, so a kill leaves either the whole batch
or at most a torn last line, which the next run drops (truncating the file to its last complete line). A
restarted run reads the journal, skips every journaled chip and stack, and goes on; because whole batches are
journaled, the remaining chips form the same batches as in an uninterrupted run (with the same
``--batch-size``), so the answers are the same to the bit.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, NotRequired, TypedDict, cast

from agrivlm.infer.errors import InferError
from agrivlm.io import fsync_dir

#: Version of the journal layout; a journal of another version is refused.
#: 2: ``stack`` records carry a content fingerprint of the stack, the header the sha256 of the weights.
JOURNAL_VERSION = 2


class FeatureRecord(TypedDict):
    """One box, polygon or point of an answer (a row of the output layer)."""

    #: ``chip``: an ``ask`` answer without positions, about the whole chip.
    kind: Literal["box", "polygon", "point", "chip"]
    #: WKB hex, in the stack's CRS (a reload gives the same bytes).
    geometry: str
    #: Geometric mean of its tokens' probabilities (None: no tokens).
    score: float | None
    #: Its position tokens as text.
    tokens: str
    #: Land-use label the answer gave it ("" when none).
    label: str
    #: Marked "partly outside the image".
    cut: bool
    #: Normalized ``(u1, v1, u2, v2)`` bounds (a point: ``(u, v)``).
    box: list[float]


class AnswerRecord(TypedDict):
    """One question's answer: its text, score, parse status and features; growth answers their stages."""

    #: The question's meta (the point of a point prompt, the field and dates of a growth question …).
    meta: dict[str, Any]
    text: str
    score: float | None
    #: The answer ended (EOS) within the token budget.
    finished: bool
    #: Position tokens that fit no box, point, polygon or span.
    unmatched: int
    features: list[FeatureRecord]
    #: Boxes or rings without area (dropped).
    degenerate: int
    #: Nothing the task expects could be read from the answer.
    unparsed: bool
    #: ``fields`` point prompts: outlines that do not hold their point (dropped).
    off_point: NotRequired[int]
    #: ``growth`` timeline: ``[stage, first day, last day]`` spans.
    spans: NotRequired[list[list[str]]]
    #: ``growth`` timeline: the stage on every date asked about (None: no span near it).
    stages: NotRequired[dict[str, str | None]]
    #: ``growth`` date by date: the stage word.
    stage: NotRequired[str | None]
    #: ``ask``: its dates and date spans.
    dates: NotRequired[list[str]]
    segments: NotRequired[list[list[str]]]


class ChipRecord(TypedDict):
    """One chip of a ``chips`` entry: answered (``ok``, with its answers) or ``skipped`` (with the reason)."""

    chip_id: str
    #: The chip's index in the stack's chip grid (reading order).
    index: int
    status: Literal["ok", "skipped"]
    reason: NotRequired[str]
    #: What preparing it noted (frames dropped …), or None.
    note: NotRequired[str | None]
    answers: NotRequired[list[AnswerRecord]]
    #: The stack key, added by :meth:`Journal.chips` (not written in the entry).
    stack: NotRequired[str]


class StackEntry(TypedDict):
    """A stack opened: its CRS, bounds, chip count, date range and content fingerprint."""

    type: Literal["stack"]
    stack: str
    name: str
    crs: str
    bounds: list[float]
    chips_total: int
    dates: list[str]
    fingerprint: Any


class ChipsEntry(TypedDict):
    """A finished batch of one stack."""

    type: Literal["chips"]
    stack: str
    chips: list[ChipRecord]


class StackDoneEntry(TypedDict):
    """Every chip of a stack journaled."""

    type: Literal["stack_done"]
    stack: str
    chips_total: int
    chips_skipped: int


#: An entry after the header.
Entry = StackEntry | ChipsEntry | StackDoneEntry


def _dumps(entry: Any) -> str:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def _weights_change(old: Any, new: Any) -> str | None:
    """"model weights changed (…)" when only the weights of the same checkpoint folder differ, else None."""
    if not isinstance(old, dict) or not isinstance(new, dict) or old.get("path") != new.get("path"):
        return None
    if old.get("weights") == new.get("weights"):
        return None
    before = {w[0]: w for w in old.get("weights") or []}
    after = {w[0]: w for w in new.get("weights") or []}
    names = sorted(n for n in before.keys() | after.keys() if before.get(n) != after.get(n))
    return f"model weights changed ({', '.join(names)})"


class Journal:
    """An open journal: the entries read back from disk, and :meth:`append` for new ones.

    Use :meth:`open`; close with :meth:`close` (or as a context manager).
    """

    def __init__(self, path: Path, settings: dict[str, Any], entries: list[Entry]) -> None:
        self.path = path
        self.settings = settings
        #: Entries after the header, oldest first (read back from disk, then appended).
        self.entries = entries
        #: Entries found on disk when opened (0 for a fresh journal).
        self.resumed_entries = len(entries)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)

    @classmethod
    def open(cls, path: str | os.PathLike[str], settings: dict[str, Any], restart: bool = False) -> Journal:
        """Open (or create) the journal of a run with ``settings`` (JSON-able).

        An existing journal is resumed when its header's settings equal ``settings``; ``restart`` discards it.

        Raises:
            InferError: the journal belongs to a run with other settings (naming what differs), or a line
                before the last one is damaged.

        """
        path = Path(path)
        settings = json.loads(_dumps(settings))  # as it will read back
        if restart and path.exists():
            path.unlink()
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            line = _dumps({"type": "header", "version": JOURNAL_VERSION, "settings": settings}) + "\n"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(path.parent)
            return cls(path, settings, [])
        lines = list(_read_lines(path))
        if not lines:
            raise InferError(f"{path}: empty journal (no header); delete it or pass --restart")
        header = lines[0]
        if header.get("type") == "header" and header.get("version") == 1:
            # Refused, not resumed with a warning: a version-1 journal cannot show that its answers are of the
            # stacks and weights given now, and resuming such a journal blindly is exactly how stale answers got
            # into outputs with exit status 0; starting over costs only time.
            raise InferError(f"{path}: the journal predates content fingerprints of stacks and weights, so its "
                             "answers cannot be checked against the inputs; pass --restart to start over")
        if header.get("type") != "header" or header.get("version") != JOURNAL_VERSION:
            raise InferError(f"{path}: not an agrivlm infer journal of version {JOURNAL_VERSION}; pass --restart")
        old_settings = header.get("settings", {})
        weights = _weights_change(old_settings.get("model"), settings.get("model"))
        if weights is not None:
            raise InferError(f"{path}: {weights} since the journal was written; its answers are of the old weights: "
                             "pass --restart to start over, or write to another --out")
        diff = _differences(old_settings, settings)
        if diff:
            raise InferError(
                f"{path}: journal of a run with other settings ({'; '.join(diff[:4])}"
                f"{' …' if len(diff) > 4 else ''}); pass --restart to discard it, or write to another --out"
            )
        return cls(path, settings, cast(list[Entry], lines[1:]))

    def append(self, entry: Entry) -> None:
        """Write one entry as one line (one ``write``, then ``fsync``) and remember it."""
        data = (_dumps(entry) + "\n").encode()
        written = os.write(self._fd, data)
        if written != len(data):  # a regular file takes the whole buffer; anything else is a full disk
            raise InferError(f"{self.path}: only {written} of {len(data)} bytes written (disk full?)")
        os.fsync(self._fd)
        self.entries.append(entry)

    def close(self) -> None:
        """Close the file (entries stay readable)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what is done (each accessor filters on the entry's "type", which narrows it to its TypedDict) ----------
    def chips(self, stack: str | None = None) -> Iterator[ChipRecord]:
        """Every journaled chip record (of one stack), in journal order, with its ``stack``."""
        for e in self.entries:
            if e["type"] == "chips" and (stack is None or e["stack"] == stack):
                for rec in e["chips"]:
                    yield {**rec, "stack": e["stack"]}

    def done_chips(self, stack: str) -> set[str]:
        """Ids of the journaled chips of ``stack``."""
        return {rec["chip_id"] for rec in self.chips(stack)}

    def stack_done(self, stack: str) -> StackDoneEntry | None:
        """The ``stack_done`` entry of ``stack``, if every chip of it is journaled."""
        return next((e for e in self.entries if e["type"] == "stack_done" and e["stack"] == stack), None)

    def stack_info(self, stack: str) -> StackEntry | None:
        """The latest ``stack`` entry of ``stack`` (CRS, bounds, …)."""
        found = None
        for e in self.entries:
            if e["type"] == "stack" and e["stack"] == stack:
                found = e
        return found


def _read_lines(path: Path) -> Iterator[dict[str, Any]]:
    """Parse the journal; a torn last line (a kill mid-write) is cut off the file."""
    raw = path.read_bytes()
    pos = 0
    lineno = 0
    while pos < len(raw):
        end = raw.find(b"\n", pos)
        lineno += 1
        if end < 0:  # no newline: the write of this line never completed
            _truncate(path, pos)
            return
        try:
            entry = json.loads(raw[pos:end])
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            if end + 1 == len(raw):
                _truncate(path, pos)  # damaged last line: drop it, its batch is redone
                return
            raise InferError(f"{path}:{lineno}: damaged journal line ({exc}); pass --restart to start over") from exc
        if not isinstance(entry, dict):
            raise InferError(f"{path}:{lineno}: a journal line must be a JSON object; pass --restart")
        yield entry
        pos = end + 1


def _truncate(path: Path, size: int) -> None:
    with path.open("r+b") as fh:
        fh.truncate(size)
        fh.flush()
        os.fsync(fh.fileno())


