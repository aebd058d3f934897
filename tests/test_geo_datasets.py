"""agrivlm stacks as torch datasets: the map-style one over a chip index, the iterable one over a ChipStream."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from rasters import write_dated_stack, write_raster
from torch.utils.data import DataLoader

from agrivlm.errors import IngestError
from agrivlm.geo import ChipStream, open_stack
from agrivlm.geo.datasets import ChipIndexDataset, ChipIterableDataset, collate_chips
from agrivlm.geo.ingest import ingest


@pytest.fixture(scope="module")
def stack_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ds")
    paths = write_dated_stack(root / "data", n_dates=4, height=40, width=48, bands=2)
    for p in paths:  # a cloud over the top-left of each date
        cloud = np.zeros((1, 40, 48), np.uint8)
        cloud[0, :10, :12] = 1
        write_raster(root / "masks" / p.name, cloud, nodata=255)
    return root


def _reference(stack_dir: Path) -> dict[str, object]:
    stream = ChipStream(open_stack(stack_dir / "data", masks=stack_dir / "masks"), chip_size=16, stride=16, workers=0)
    return {c.chip_id: c for c in stream}


def test_map_style_dataset_reads_the_index_rows_as_the_stream_does(stack_dir: Path, tmp_path: Path) -> None:
    summary = ingest(stack_dir / "data", tmp_path / "ing", chip_size=16, stride=16, masks=stack_dir / "masks",
                     progress=False)
    stack = open_stack(stack_dir / "data", masks=stack_dir / "masks")
    ds = ChipIndexDataset(tmp_path / "ing" / "chips.gpkg", stack)
    ref = _reference(stack_dir)
    assert len(ds) == summary["chips_kept"] == len(ref) == 9  # 40 × 48 px: 3 × 3 chips, the edges snapped
    s = ds[4]
    chip = ref[s["chip_id"]]
    assert s["image"].shape == (4, 2, 16, 16) and s["image"].dtype == torch.float32
    np.testing.assert_array_equal(s["image"].numpy(), chip.data)
    np.testing.assert_array_equal(s["mask"].numpy(), chip.mask)
    assert s["times"].tolist() == chip.times.astype("datetime64[s]").astype(np.int64).tolist()
    assert s["transform"] == tuple(list(chip.grid.transform)[:6]) and s["crs"] == stack.crs.to_wkt()
    assert ds[0]["mask"][:, :10, :12].all()  # the top-left chip carries the cloud mask
    # shuffled, batched, in two worker processes: every chip exactly once, the same pixels
    loader = DataLoader(ds, batch_size=4, shuffle=True, num_workers=2, collate_fn=collate_chips,
                        generator=torch.Generator().manual_seed(0))
    seen = []
    for batch in loader:
        assert batch["image"].shape[1:] == (4, 2, 16, 16)
        for cid, image in zip(batch["chip_id"], batch["image"], strict=True):
            np.testing.assert_array_equal(image.numpy(), ref[cid].data)
            seen.append(cid)
    assert sorted(seen) == sorted(ref)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_iterable_dataset_gives_every_chip_once_across_workers(stack_dir: Path) -> None:
    ref = _reference(stack_dir)
    stream = ChipStream(open_stack(stack_dir / "data", masks=stack_dir / "masks"), chip_size=16, stride=16,
                        workers=0, max_group_bytes=4 * 16 * 48 * 2 * 4)  # small groups: several per worker
    assert len(stream.groups()) >= 3
    for workers in (0, 2):
        got = {}
        for s in DataLoader(ChipIterableDataset(stream), batch_size=None, num_workers=workers):
            assert s["chip_id"] not in got
            got[s["chip_id"]] = s
        assert sorted(got) == sorted(ref)
        for cid, s in got.items():
            np.testing.assert_array_equal(s["image"].numpy(), ref[cid].data)


def test_an_index_of_another_stack_is_refused(stack_dir: Path, tmp_path: Path) -> None:
    big = write_dated_stack(tmp_path / "big", n_dates=2, height=80, width=80, bands=2)
    ingest(big[0].parent, tmp_path / "ing", chip_size=16, stride=16, progress=False)
    with pytest.raises(IngestError, match="another stack"):
        ChipIndexDataset(tmp_path / "ing" / "chips.gpkg", open_stack(stack_dir / "data"))
