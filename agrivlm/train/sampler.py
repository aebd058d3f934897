"""A deterministic, resumable sample order: the order of epoch ``e`` is a permutation seeded by (seed, e).

Resuming does not depend on what a DataLoader prefetched: the trainer records how many samples it
has *trained on* (``epoch``, ``offset``) in its checkpointed state and the sampler restarts exactly
there. Per-sample randomness (augmentation, frame sampling) is seeded from :func:`sample_seed`, so a
resumed run sees exactly the same samples with exactly the same randomness as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for the randomness of sample ``index`` in ``epoch`` (independent of process/order)."""
    mixed = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(2, dtype=np.uint32)
    return int((int(mixed[0]) << 31) ^ int(mixed[1]))


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Sample indices of ``epoch``: a permutation seeded by ``(seed, epoch)`` (or ``arange`` without shuffle)."""
    if not shuffle:
        return np.arange(num_samples)
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


class ResumableSampler(Sampler[int]):
    """Yields the indices of one process's share of an epoch, starting at ``offset`` (for resume).

    With ``num_replicas`` processes, process ``rank`` takes positions ``rank, rank + R, ...`` of the
    epoch's order (the tail is dropped so every rank gets the same count).
    """

    def __init__(
        self, num_samples: int, seed: int, shuffle: bool = True, num_replicas: int = 1, rank: int = 0
    ) -> None:
        if num_samples <= 0:
            raise ValueError("ResumableSampler needs at least one sample")
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.offset = 0, 0

    def per_rank(self) -> int:
        """Samples each process sees per epoch."""
        return self.num_samples // self.num_replicas

    def set_position(self, epoch: int, offset: int) -> None:
        """Start the next iteration at ``offset`` samples (of this rank's share) into ``epoch``."""
        if not 0 <= offset <= self.per_rank():
            raise ValueError(f"offset {offset} outside the epoch's {self.per_rank()} samples")
        self.epoch, self.offset = epoch, offset

    def __len__(self) -> int:
        return self.per_rank() - self.offset

    def __iter__(self) -> Iterator[int]:
        order = epoch_order(self.num_samples, self.seed, self.epoch, self.shuffle)
        mine = order[self.rank : self.per_rank() * self.num_replicas : self.num_replicas]
        for index in mine[self.offset :]:
            yield int(index)


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU torch generator seeded with ``seed``."""
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen
