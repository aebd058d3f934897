"""Curriculum-stage mixtures: samples drawn from component pools by weight, with a seed.

Each component's count is its exact quota of the samples (largest remainder of ``weight × n``), so the
achieved proportions match the config to within ``1/n``; the seed decides the order in which the
components interleave and which records each one draws. A component draws its records in a seeded
permutation and starts a fresh permutation when the pool is used up (records then repeat; the report
says how often). ``max_unique`` asks for the largest ``n`` at which no pool has to repeat.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from agrivlm.recipes.context import rng_for
from agrivlm.recipes.splits import allocate

T = TypeVar("T")


@dataclass
class MixReport:
    """What a mixture draw achieved."""

    requested: dict[str, float]
    counts: dict[str, int]
    pool_sizes: dict[str, int]
    #: Draws beyond each pool's size (0 = no record repeated).
    repeats: dict[str, int]

    @property
    def total(self) -> int:
        """Samples drawn."""
        return sum(self.counts.values())

    @property
    def proportions(self) -> dict[str, float]:
        """Achieved share of each component."""
        n = max(self.total, 1)
        return {k: v / n for k, v in self.counts.items()}

    def as_dict(self) -> dict[str, object]:
        """JSON-ready, proportions rounded to 6 decimals."""
        return {
            "requested": self.requested,
            "counts": self.counts,
            "proportions": {k: round(v, 6) for k, v in self.proportions.items()},
            "max_abs_deviation": round(max(abs(self.proportions[k] - self.requested[k]) for k in self.counts), 6)
            if self.counts else 0.0,
            "pool_sizes": self.pool_sizes,
            "repeats": self.repeats,
            "total": self.total,
        }


@dataclass
class _Cycler(Generic[T]):
    items: Sequence[T]
    key: str
    seed: int
    epoch: int = 0
    pos: int = 0

    def __post_init__(self) -> None:
        self._perm = self._permutation()

    def _permutation(self) -> list[int]:
        return [int(i) for i in rng_for(self.seed, "mix-pool", self.key, self.epoch).permutation(len(self.items))]

    def next(self) -> T:
        if self.pos == len(self._perm):
            self.epoch, self.pos = self.epoch + 1, 0
            self._perm = self._permutation()
        item = self.items[self._perm[self.pos]]
        self.pos += 1
        return item


def max_unique(pools: Mapping[str, Sequence[object]], weights: Mapping[str, float]) -> int:
    """The largest ``n`` whose quotas fit every pool without repeats."""
    total = sum(weights.values())
    # a quota is at least floor(share × n), so no n above this bound fits; scan down from it (largest-remainder
    # quotas are not monotone in n, so the first fit from above is the answer)
    n = min(
        (math.floor((len(pools[k]) + 1) * total / w) for k, w in weights.items() if w > 0),
        default=0,
    )
    while n > 0 and any(c > len(pools[k]) for k, c in allocate(weights, n).items()):
        n -= 1
    return n


def mix(
    pools: Mapping[str, Sequence[T]], weights: Mapping[str, float], n: int, seed: int, label: str = ""
) -> tuple[list[T], MixReport]:
    """Draw ``n`` samples from ``pools`` with exact quotas by ``weights``, interleaved in a seeded order.

    Raises:
        ValueError: a component with a positive quota has an empty pool.

    """
    counts = allocate(dict(weights), n)
    for k, c in counts.items():
        if c > 0 and not pools[k]:
            raise ValueError(f"mixture component {k!r} has no records to draw {c} samples from")
    slots = [k for k in weights for _ in range(counts[k])]
    order = rng_for(seed, "mix-order", label).permutation(len(slots))
    cyclers = {k: _Cycler(pools[k], f"{label}:{k}", seed) for k in weights}
    out = [cyclers[slots[int(i)]].next() for i in order]
    report = MixReport(
        requested={k: float(w) for k, w in weights.items()},
        counts=counts,
        pool_sizes={k: len(pools[k]) for k in weights},
        repeats={k: max(counts[k] - len(pools[k]), 0) for k in weights},
    )
    return out, report
