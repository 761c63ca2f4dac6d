"""Map-style datasets: records -> augmented `Sample`s (labeled, unlabeled weak/strong pairs, evaluation).

Randomness comes from the dataset's own `numpy.random.Generator`, seeded by `reseed` (the loader
does it per worker), so a loader built with the same seed yields the same samples. During
training an image that cannot be read is skipped (the next readable index is used instead) and the
reason travels with the sample (`Sample.skipped`), so the training process counts and reports
skips made in loader workers too; `strict=True` raises instead.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from semiseg.data.images import read_image
from semiseg.data.masks import decode_segmentation
from semiseg.data.records import DatasetRecords, ImageRecord
from semiseg.data.transforms import AugmentationPipeline, StrongAugmentation
from semiseg.errors import DataError
from semiseg.structures import Instances


@dataclass
class Sample:
    """One dataset item, before batching.

    image:     [3, H, W] uint8 RGB after augmentation (the weak view for unlabeled data)
    image_id:  the record's image id
    orig_size: (h, w) of the image file
    instances: ground truth on the (H, W) canvas, None for unlabeled and evaluation samples
    strong:    [3, H, W] uint8 strong view of an unlabeled image (same geometry as `image`)
    skipped:   "file: problem" of each unreadable image passed over to load this one
    """

    image: torch.Tensor
    image_id: int
    orig_size: tuple[int, int]
    instances: Instances | None = None
    strong: torch.Tensor | None = None
    skipped: tuple[str, ...] = ()


def _read_tensor(record: ImageRecord) -> torch.Tensor:
    """The record's image as [3, H, W] uint8; DataError if unreadable or not the size the annotations say."""
    image = read_image(record.file_name)
    h, w = image.shape[:2]
    if record.height is not None and (record.height, record.width) != (h, w):
        raise DataError(f"{record.file_name}: image is {h}x{w} but its annotations say {record.height}x{record.width}")
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()


class _TrainingDataset(Dataset):
    """Seeded randomness plus skip-or-raise handling of unreadable images."""

    def __init__(self, records: DatasetRecords, strict: bool, seed: int):
        if len(records) == 0:
            raise DataError(f"{records.source}: the dataset has no images")
        self.records = records
        self.strict = strict
        self.rng = np.random.default_rng(seed)
        self._unreadable: set[int] = set()

    def reseed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        skipped: list[str] = []
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            if candidate in self._unreadable:
                continue
            try:
                sample = self._load(self.records.records[candidate])
                return dataclasses.replace(sample, skipped=tuple(skipped)) if skipped else sample
            except DataError as error:
                if self.strict:
                    raise
                self._unreadable.add(candidate)
                skipped.append(str(error))
        raise DataError(f"{self.records.source}: none of its {len(self)} images could be read")

    def _load(self, record: ImageRecord) -> Sample:
        raise NotImplementedError


class LabeledDataset(_TrainingDataset):
    """Labeled training images: non-crowd instance masks decoded, then augmented with the image.

    filter_empty drops images without any non-crowd annotation (as the reference training sets);
    `self.records` holds the kept records (index i of the dataset is `self.records.records[i]`).
    """

    def __init__(self, records: DatasetRecords, transform: AugmentationPipeline, *, filter_empty: bool = True,
                 strict: bool = False, seed: int = 0):
        if filter_empty:
            kept = [r for r in records.records if any(not a.iscrowd for a in r.annotations)]
            if not kept and records.records:
                raise DataError(f"{records.source}: no image has a non-crowd annotation")
            records = DatasetRecords(kept, records.class_names, records.category_ids, records.source)
        super().__init__(records, strict, seed)
        self.transform = transform

    def _load(self, record: ImageRecord) -> Sample:
        image = _read_tensor(record)
        h, w = image.shape[-2:]
        annotations = [a for a in record.annotations if not a.iscrowd]
        masks = torch.zeros(len(annotations), h, w, dtype=torch.bool)
        for i, annotation in enumerate(annotations):
            source = f"{self.records.source} image {record.image_id} annotation {annotation.ann_id}"
            masks[i] = torch.from_numpy(decode_segmentation(annotation.segmentation, h, w, source=source))
        labels = torch.tensor([a.label for a in annotations], dtype=torch.long)
        image, instances = self.transform(image, masks, labels, self.rng)
        return Sample(image, record.image_id, (h, w), instances=instances)


class UnlabeledDataset(_TrainingDataset):
    """Unlabeled training images as weak/strong pairs: strong = `strong(weak)`, so both share the geometry."""

    def __init__(self, records: DatasetRecords, transform: AugmentationPipeline, strong: StrongAugmentation, *,
                 strict: bool = False, seed: int = 0):
        super().__init__(records, strict, seed)
        self.transform = transform
        self.strong = strong

    def _load(self, record: ImageRecord) -> Sample:
        image = _read_tensor(record)
        orig_size = (int(image.shape[-2]), int(image.shape[-1]))
        weak = self.transform.image_only(image, self.rng)
        return Sample(weak, record.image_id, orig_size, strong=self.strong(weak, self.rng))


class EvalDataset(Dataset):
    """Evaluation images resized by the deterministic test transform; an unreadable image is a DataError."""

    def __init__(self, records: DatasetRecords, transform: AugmentationPipeline):
        self.records = records
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        record = self.records.records[index]
        image = _read_tensor(record)
        orig_size = (int(image.shape[-2]), int(image.shape[-1]))
        return Sample(self.transform.image_only(image, np.random.default_rng(0)), record.image_id, orig_size)
