"""agrivlm stacks as PyTorch datasets, for a user's own training loop or a torchgeo-style trainer.

* :class:`ChipIndexDataset` — map-style: item ``k`` is the chip of row ``k`` of a chip index (``chips.gpkg`` or
  ``.parquet`` of ``agrivlm ingest``, or the frame :func:`~agrivlm.geo.index.build_chip_index` returns), read
  from the stack on demand. Random access, shuffling, any sampler.
* :class:`ChipIterableDataset` — iterable: the chips of a :class:`~agrivlm.geo.chips.ChipStream`, read group by
  group (block-aligned); with several DataLoader workers each reads its own share of the groups, so every chip
  comes exactly once.

Both yield the same sample, a dict of tensors and metadata (torchgeo's ``image``/``mask`` naming)::

    image    (T, C, h, w) float32, NaN where there is no data (a ChipStream(native=True): the files' data type)
    nodata   (T, C, h, w) bool
    mask     (T, h, w) bool, True where the date's mask file masks the pixel (clouds)
    times    (T,) int64, seconds since 1970-01-01 (UTC) of each date
    chip_id, index, transform (6 floats, the chip's own), crs (WKT), bounds (minx, miny, maxx, maxy)

``collate_chips`` stacks samples of one shape into a batch (the metadata as lists). Stacks are picklable:
each worker process reopens the files lazily.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from agrivlm.errors import IngestError
from agrivlm.geo.chips import Chip, ChipStream
from agrivlm.geo.index import read_chip_index, row_window
from agrivlm.geo.stack import Stack

Sample = dict[str, Any]


def chip_sample(chip: Chip) -> Sample:
    """One chip as a dataset sample (see the module docstring)."""
    seconds = chip.times.astype("datetime64[s]").astype(np.int64)
    return {
        "image": torch.from_numpy(np.ascontiguousarray(chip.data)),
        "nodata": torch.from_numpy(np.ascontiguousarray(chip.nodata)),
        "mask": torch.from_numpy(np.ascontiguousarray(chip.mask)),
        "times": torch.from_numpy(seconds.copy()),
        "chip_id": chip.chip_id,
        "index": int(chip.index),
        "transform": tuple(float(v) for v in list(chip.grid.transform)[:6]),
        "crs": chip.grid.crs.to_wkt(),
        "bounds": chip.bounds,
    }


class ChipIndexDataset(Dataset[Sample]):
    """Map-style dataset over the rows of a chip index (see the module docstring).

    Args:
        index: a chip index file written by ``agrivlm ingest`` (``chips.gpkg``/``.parquet``) or its frame.
        stack: the stack the index was made from (:func:`~agrivlm.geo.stack.open_stack`).
        transform: applied to each sample (e.g. normalisation, augmentation).

    Raises:
        IngestError: a row whose window does not lie on the stack's grid (the index belongs to another stack).

    """

    def __init__(self, index: str | os.PathLike[str] | gpd.GeoDataFrame, stack: Stack,
                 transform: Callable[[Sample], Sample] | None = None) -> None:
        frame = index if isinstance(index, gpd.GeoDataFrame) else read_chip_index(Path(index))
        self.stack = stack
        self.transform = transform
        self.windows = [row_window(row) for _, row in frame.iterrows()]
        self.indices = [int(i) for i in frame["chip_index"]] if "chip_index" in frame else list(range(len(frame)))
        h, w = stack.grid.height, stack.grid.width
        for win, cid in zip(self.windows, frame["chip_id"], strict=True):
            if win.row_off < 0 or win.col_off < 0 or win.row_off + win.height > h or win.col_off + win.width > w:
                raise IngestError(f"chip {cid}: window {win} lies outside the stack's {h} × {w} grid; the index "
                                  "was made from another stack")
        self._stream = ChipStream(stack, chip_size=1, workers=0)  # its chip builder; the windows are the index's

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, k: int) -> Sample:
        if not -len(self) <= k < len(self):
            raise IndexError(k)
        sample = chip_sample(self._stream.read(self.indices[k], self.windows[k]))
        return self.transform(sample) if self.transform is not None else sample


class ChipIterableDataset(IterableDataset[Sample]):
    """Iterable dataset over a :class:`~agrivlm.geo.chips.ChipStream` (see the module docstring).

    All-nodata chips are skipped when the stream's ``skip_empty`` says so. Each DataLoader worker reads the
    groups ``worker_id, worker_id + num_workers, …``: every chip exactly once, in group order per worker.
    """

    def __init__(self, stream: ChipStream, transform: Callable[[Sample], Sample] | None = None) -> None:
        self.stream = stream
        self.transform = transform

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        groups = self.stream.groups()
        if info is not None:
            groups = groups[info.id::info.num_workers]
        for group in groups:
            for chip, empty in self.stream.read_group(group):
                if empty and self.stream.skip_empty:
                    continue
                sample = chip_sample(chip)
                yield self.transform(sample) if self.transform is not None else sample


def collate_chips(samples: Sequence[Sample]) -> Sample:
    """A batch of samples of one shape: tensors stacked on a new first axis, metadata as lists."""
    out: Sample = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out
