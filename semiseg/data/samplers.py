"""Index samplers: endless shuffled training streams (uniform or class-balanced) and evaluation shards.

Training samplers are sharded per rank (`rank::world_size` of each pass) and reshuffled every pass
with the generator seeded by `seed + pass`, so every rank sees a disjoint part of each pass and a
run is reproducible. `rank`/`world_size` default to the torch.distributed process group, if any.
"""
from __future__ import annotations

import itertools
import math
from collections import Counter
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from semiseg.data.records import DatasetRecords


def process_rank() -> int:
    """This process's rank in the torch.distributed group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    rank = process_rank() if rank is None else rank
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return rank, world_size


class InfiniteSampler(Sampler[int]):
    """Endless indices in [0, size): each pass is a permutation (seed + pass) of which this rank takes rank::world_size."""

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True, rank: int | None = None,
                 world_size: int | None = None):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        if size < self.world_size:
            raise ValueError(f"InfiniteSampler: {size} images cannot feed {self.world_size} ranks")

    def __iter__(self) -> Iterator[int]:
        for epoch in itertools.count():
            if self.shuffle:
                order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch))
            else:
                order = torch.arange(self.size)
            yield from order[self.rank::self.world_size].tolist()


def repeat_factors_from_records(records: DatasetRecords, threshold: float = 10.0) -> torch.Tensor:
    """Per-image repeat factors [num_images] (class-balanced, as LVIS / detectron2).

    r(c) = max(1, sqrt(threshold / f(c))) with f(c) the fraction of images containing class c
    (non-crowd instances); an image repeats max over its classes of r(c), 1 without classes.
    Guided Distillation uses threshold 10 for the labeled set.
    """
    classes_per_image = [{a.label for a in r.annotations if not a.iscrowd} for r in records.records]
    counts = Counter(c for classes in classes_per_image for c in classes)
    n = max(len(classes_per_image), 1)
    class_factor = {c: max(1.0, math.sqrt(threshold / (k / n))) for c, k in counts.items()}
    return torch.tensor([max((class_factor[c] for c in classes), default=1.0) for classes in classes_per_image],
                        dtype=torch.float64)


class RepeatFactorSampler(Sampler[int]):
    """Endless class-balanced stream: each pass repeats image i floor(r_i) or ceil(r_i) times.

    The fractional part is rounded stochastically per pass (generator seeded with seed + pass), so
    image i appears r_i times per pass on average; the pass is shuffled and sharded rank::world_size.
    """

    def __init__(self, repeat_factors: torch.Tensor | Sequence[float], seed: int = 0, rank: int | None = None,
                 world_size: int | None = None):
        factors = torch.as_tensor(repeat_factors, dtype=torch.float64)
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        if factors.ndim != 1 or factors.numel() < self.world_size or bool((factors < 1).any()):
            raise ValueError(f"RepeatFactorSampler needs >= {self.world_size} repeat factors, all >= 1")
        self.integer_part = factors.floor()
        self.fraction = factors - self.integer_part
        self.seed = seed

    def __iter__(self) -> Iterator[int]:
        for epoch in itertools.count():
            generator = torch.Generator().manual_seed(self.seed + epoch)
            repeats = self.integer_part + (torch.rand(self.fraction.shape, generator=generator,
                                                      dtype=torch.float64) < self.fraction)
            indices = torch.from_numpy(np.repeat(np.arange(repeats.numel()), repeats.long().numpy()))
            order = indices[torch.randperm(indices.numel(), generator=generator)]
            yield from order[self.rank::self.world_size].tolist()


class InferenceSampler(Sampler[int]):
    """Each index once, in order; rank r takes the r-th of world_size contiguous shards (sizes differ by <= 1)."""

    def __init__(self, size: int, rank: int | None = None, world_size: int | None = None):
        self.size = size
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        per_rank, extra = divmod(size, self.world_size)
        self.begin = self.rank * per_rank + min(self.rank, extra)
        self.end = self.begin + per_rank + (1 if self.rank < extra else 0)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.begin, self.end))

    def __len__(self) -> int:
        return self.end - self.begin
