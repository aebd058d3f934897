from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.windows import Window

from agrivlm.geo.chips import chip_windows
from agrivlm.recipes.mixture import max_unique, mix
from agrivlm.recipes.splits import allocate, assign_splits, windows_overlap


@settings(max_examples=40, deadline=None)
@given(
    height=st.integers(20, 120),
    width=st.integers(20, 120),
    chip=st.integers(8, 32),
    stride_frac=st.sampled_from([0.5, 1.0]),
    block=st.integers(10, 70),
    buffer=st.integers(0, 4),
    seed=st.integers(0, 10_000),
)
def test_no_chip_of_one_split_overlaps_or_nears_a_chip_of_another(
    height: int, width: int, chip: int, stride_frac: float, block: int, buffer: int, seed: int
) -> None:
    chip = min(chip, height, width)
    windows = chip_windows(height, width, chip, max(1, int(chip * stride_frac)))
    a = assign_splits(windows, height, width, block, buffer, {"train": 0.6, "val": 0.2, "test": 0.2}, seed)
    assert set(a.chip_split) | set(a.excluded) == set(range(len(windows)))
    assert not set(a.chip_split) & set(a.excluded)
    kept = sorted(a.chip_split)
    box = np.array([[w.col_off, w.row_off, w.col_off + w.width, w.row_off + w.height] for w in windows])[kept]
    split = np.array([a.chip_split[i] for i in kept])
    # pairs of kept chips closer than the buffer (the same test as windows_overlap, for all pairs at once)
    near = ~((box[:, None, 2] + buffer <= box[None, :, 0]) | (box[None, :, 2] + buffer <= box[:, None, 0])
             | (box[:, None, 3] + buffer <= box[None, :, 1]) | (box[None, :, 3] + buffer <= box[:, None, 1]))
    assert not (near & (split[:, None] != split[None, :])).any()
    # the blocks with chip centres were dealt by the fractions, every split getting one when there are 3+
    counts = {s: [a.blocks[b] for b in a.dealt].count(s) for s in ("train", "val", "test")}
    if len(a.dealt) >= 3:
        assert min(counts.values()) >= 1
    for i, j in itertools.islice(itertools.combinations(kept, 2), 200):  # spot-check the helper itself
        if a.chip_split[i] != a.chip_split[j]:
            assert not windows_overlap(windows[i], windows[j], gap=buffer)


def test_split_is_deterministic_and_depends_on_the_seed() -> None:
    windows = chip_windows(200, 200, 32, 16)
    fr = {"train": 0.5, "val": 0.25, "test": 0.25}
    a = assign_splits(windows, 200, 200, 50, 2, fr, 7)
    assert a == assign_splits(windows, 200, 200, 50, 2, fr, 7)
    assert any(assign_splits(windows, 200, 200, 50, 2, fr, s).blocks != a.blocks for s in range(8, 12))


def test_windows_overlap_gap() -> None:
    a, b = Window(0, 0, 10, 10), Window(10, 0, 10, 10)
    assert not windows_overlap(a, b) and windows_overlap(a, b, gap=1)
    assert windows_overlap(a, Window(9, 9, 5, 5)) and not windows_overlap(a, Window(12, 0, 3, 3), gap=2)


@given(fr=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=5).filter(lambda x: sum(x) > 0), n=st.integers(0, 500))
def test_allocate_sums_to_n_and_is_within_one_of_the_exact_share(fr: list[float], n: int) -> None:
    fractions = {f"k{i}": f for i, f in enumerate(fr)}
    counts = allocate(fractions, n)
    assert sum(counts.values()) == n and min(counts.values()) >= 0
    total = sum(fr)
    for k, f in fractions.items():
        assert abs(counts[k] - f / total * n) < 1.0 + 1e-9


def test_mix_quotas_order_and_repeats() -> None:
    pools = {"a": list(range(100)), "b": list(range(1000, 1050)), "c": list(range(2000, 2010))}
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    out, rep = mix(pools, weights, 1001, seed=4)
    assert len(out) == 1001 and rep.counts == {"a": 501, "b": 300, "c": 200}
    assert all(abs(rep.proportions[k] - weights[k]) < 1 / 1001 + 1e-12 for k in weights)
    assert rep.repeats == {"a": 401, "b": 250, "c": 190}
    # each pool is drawn as whole permutations: the first 10 of "c" are all distinct
    cs = [x for x in out if x >= 2000]
    assert sorted(cs[:10]) == pools["c"]
    assert mix(pools, weights, 1001, seed=4)[0] == out and mix(pools, weights, 1001, seed=5)[0] != out
    n = max_unique(pools, weights)
    assert n == 52 and max(mix(pools, weights, n, seed=0)[1].repeats.values()) == 0
    assert max(mix(pools, weights, n + 1, seed=0)[1].repeats.values()) > 0
