"""Batching and DataLoaders: padded `Batch`es, seeded workers, the paired labeled/unlabeled stream.

Reproducibility: every worker seeds `random`, `numpy`, `torch` and its dataset copy (`reseed`) from
(seed, rank, worker id); with `num_workers=0` the dataset is seeded from (seed, rank, 0). The
DataLoader hands batches out in sampler order, so the same seed and worker count give the same
batches.
"""
from __future__ import annotations

import functools
from dataclasses import replace
import random
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from semiseg.data.datasets import Sample
from semiseg.data.samplers import InferenceSampler, process_rank
from semiseg.structures import Batch, Instances


def _pad_images(images: Sequence[torch.Tensor], height: int, width: int) -> torch.Tensor:
    """[3, h_i, w_i] uint8 each -> [B, 3, height, width], zero-padded at the bottom/right."""
    out = images[0].new_zeros(len(images), 3, height, width)
    for i, image in enumerate(images):
        out[i, :, :image.shape[-2], :image.shape[-1]] = image
    return out


def _pad_instances(instances: Instances, height: int, width: int) -> Instances:
    """Masks zero-padded at the bottom/right to [N, height, width]; boxes are unchanged."""
    masks = instances.masks.new_zeros(len(instances), height, width)
    masks[:, :instances.masks.shape[-2], :instances.masks.shape[-1]] = instances.masks
    return replace(instances, masks=masks)


def collate(samples: Sequence[Sample], size_divisibility: int = 32) -> Batch:
    """Samples -> Batch on a common canvas: the largest (h, w) rounded up to a multiple of `size_divisibility`.

    Keeps each sample's valid size in `image_sizes`; targets (labeled samples) and strong views
    (unlabeled samples) are padded like the images.
    """
    sizes = [(int(s.image.shape[-2]), int(s.image.shape[-1])) for s in samples]
    height = -(-max(h for h, _ in sizes) // size_divisibility) * size_divisibility
    width = -(-max(w for _, w in sizes) // size_divisibility) * size_divisibility
    labeled = [s.instances is not None for s in samples]
    paired = [s.strong is not None for s in samples]
    if len(set(labeled)) > 1 or len(set(paired)) > 1:
        raise ValueError("collate: a batch mixes labeled, unlabeled and evaluation samples")
    return Batch(
        images=_pad_images([s.image for s in samples], height, width),
        image_sizes=sizes,
        targets=[_pad_instances(s.instances, height, width) for s in samples] if labeled[0] else None,
        strong=_pad_images([s.strong for s in samples], height, width) if paired[0] else None,
        image_ids=[s.image_id for s in samples],
        orig_sizes=[s.orig_size for s in samples],
        skipped=[m for s in samples for m in s.skipped],
    )


def worker_seed(seed: int, rank: int, worker_id: int) -> int:
    """A 32-bit seed for one (rank, worker), distinct for every pair."""
    return int(np.random.SeedSequence([seed, rank, worker_id]).generate_state(1)[0])


def _seed_worker(seed: int, rank: int, worker_id: int) -> None:
    derived = worker_seed(seed, rank, worker_id)
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)
    _reseed_dataset(get_worker_info().dataset, derived)


def _reseed_dataset(dataset: Dataset, seed: int) -> None:
    reseed = getattr(dataset, "reseed", None)
    if reseed is not None:
        reseed(seed)


def build_train_loader(dataset: Dataset, sampler: Sampler[int], batch_size: int, num_workers: int = 0,
                       seed: int = 0, rank: int | None = None, size_divisibility: int = 32) -> DataLoader:
    """Endless per-rank training batches (`batch_size` images per rank) drawn in `sampler` order."""
    rank = process_rank() if rank is None else rank
    if num_workers == 0:
        _reseed_dataset(dataset, worker_seed(seed, rank, 0))
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=num_workers,
        collate_fn=functools.partial(collate, size_divisibility=size_divisibility),
        worker_init_fn=functools.partial(_seed_worker, seed, rank) if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),  # keeps the global torch RNG untouched
        persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(),
    )


def build_eval_loader(dataset: Dataset, batch_size: int = 1, num_workers: int = 0, rank: int | None = None,
                      world_size: int | None = None, size_divisibility: int = 32) -> DataLoader:
    """Each image of this rank's contiguous shard once, in order."""
    return DataLoader(
        dataset, batch_size=batch_size, sampler=InferenceSampler(len(dataset), rank, world_size),
        num_workers=num_workers, collate_fn=functools.partial(collate, size_divisibility=size_divisibility),
        pin_memory=torch.cuda.is_available(),
    )
