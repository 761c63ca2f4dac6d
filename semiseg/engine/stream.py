"""Endless training batches whose position can be saved and restored exactly (for `--resume`).

A `BatchStream` counts the batches the trainer has taken. Restarting it at that count skips the
sampler ahead by `count * batch_size` indices (no image is read), and every sample's augmentation
is seeded from its position in the stream (not from the worker that happens to load it), so the
resumed stream yields the same batches, bit for bit, as an uninterrupted one, with any number of
loader workers.
"""
from __future__ import annotations

import itertools
from typing import Iterator

import numpy as np
from torch.utils.data import Dataset, Sampler

from semiseg.config import Config
from semiseg.data.datasets import LabeledDataset
from semiseg.data.loader import build_train_loader
from semiseg.data.records import DatasetRecords
from semiseg.data.samplers import InfiniteSampler, RepeatFactorSampler, repeat_factors_from_records
from semiseg.engine.distributed import get_rank, get_world_size
from semiseg.errors import ConfigError
from semiseg.structures import Batch


class PositionedSampler(Sampler[tuple[int, int]]):
    """(global position, index) pairs of `sampler`, starting after its first `start` indices.

    The global position of this rank's j-th index is `j * world_size + rank`: distinct over ranks,
    and equal to the position in the unsharded stream for the rank::world_size sharding.
    """

    def __init__(self, sampler: Sampler[int], start: int, rank: int = 0, world_size: int = 1):
        self.sampler, self.start, self.rank, self.world_size = sampler, start, rank, world_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = itertools.islice(iter(self.sampler), self.start, None)
        for j, index in enumerate(indices, start=self.start):
            yield j * self.world_size + self.rank, index


class PositionSeededDataset(Dataset):
    """Wraps a training dataset: item `(position, index)` reseeds it from (seed, position), then loads `index`.

    `dataset.reseed(seed)` sets the dataset's random generator (as `semiseg.data.datasets`
    training datasets do); datasets without `reseed` are used as they are.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        position, index = item
        reseed = getattr(self.dataset, "reseed", None)
        if reseed is not None:
            reseed(int(np.random.SeedSequence([self.seed, position]).generate_state(1)[0]))
        return self.dataset[index]

    def reseed(self, seed: int) -> None:
        """Ignored: samples are seeded by position, not per loader worker."""


class BatchStream:
    """Endless per-rank batches of `batch_size` from `dataset` in `sampler` order, resumable.

    sampler: an endless per-rank index sampler (`InfiniteSampler`, `RepeatFactorSampler`).
    `position` is the number of batches taken so far; `start(position)` (re)opens the stream there.
    `skipped` holds the distinct "file: problem" messages of the unreadable images this rank's
    loader (its workers included) has passed over, in the order they were met.
    """

    def __init__(self, dataset: Dataset, sampler: Sampler[int], batch_size: int, num_workers: int = 0,
                 seed: int = 0, rank: int = 0, world_size: int = 1, size_divisibility: int = 32):
        self.dataset = PositionSeededDataset(dataset, seed)
        self.sampler, self.batch_size, self.num_workers = sampler, batch_size, num_workers
        self.seed, self.rank, self.world_size, self.size_divisibility = seed, rank, world_size, size_divisibility
        self.position = 0
        self.skipped: dict[str, None] = {}
        self._iterator: Iterator[Batch] | None = None

    def start(self, position: int = 0) -> None:
        self.close()
        self.position = position
        sampler = PositionedSampler(self.sampler, position * self.batch_size, self.rank, self.world_size)
        loader = build_train_loader(self.dataset, sampler, self.batch_size, self.num_workers, seed=self.seed,
                                    rank=self.rank, size_divisibility=self.size_divisibility)
        self._iterator = iter(loader)

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> Batch:
        if self._iterator is None:
            self.start(self.position)
        batch = next(self._iterator)
        self.position += 1
        self.skipped.update(dict.fromkeys(batch.skipped))
        return batch

    def close(self) -> None:
        """Stop the loader's worker processes (the stream reopens at `position` on the next batch)."""
        self._iterator = None


def per_rank_batch(global_batch: int, key: str) -> int:
    world = get_world_size()
    if global_batch < 1 or global_batch % world:
        raise ConfigError(f"{key}={global_batch} must be a positive multiple of the number of processes ({world})")
    return global_batch // world


def build_labeled_stream(cfg: Config, records: DatasetRecords) -> BatchStream:
    """This rank's endless labeled batches (augmented, uniform or repeat-factor sampling)."""
    data = cfg.data
    dataset = LabeledDataset(records, data.augmentation.train_transform(), filter_empty=data.filter_empty,
                             strict=data.strict, seed=cfg.train.seed)
    rank, world = get_rank(), get_world_size()
    if data.sampler == "repeat_factor":
        sampler = RepeatFactorSampler(repeat_factors_from_records(dataset.records, data.repeat_threshold),
                                      seed=cfg.train.seed, rank=rank, world_size=world)
    else:
        sampler = InfiniteSampler(len(dataset), seed=cfg.train.seed, rank=rank, world_size=world)
    return BatchStream(dataset, sampler, per_rank_batch(data.batch_size, "data.batch_size"), data.num_workers,
                       seed=cfg.train.seed, rank=rank, world_size=world,
                       size_divisibility=cfg.model.head.size_divisibility)
