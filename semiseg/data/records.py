"""Dataset records: what a reader (COCO json, image folder, later Cityscapes/ADE20K) produces.

A reader turns files into a `DatasetRecords`; everything downstream (transforms, loaders,
evaluation) only sees these records, so a new format plugs in by writing one reader.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Annotation:
    """One instance of a labeled image.

    label:        contiguous class id in [0, num_classes)
    segmentation: COCO polygons (list of flat [x0, y0, x1, y1, ...] lists) or an RLE dict
                  ({"size": [h, w], "counts": str | list[int]})
    iscrowd:      crowd regions are ignored in training and kept for evaluation
    """

    label: int
    segmentation: list[list[float]] | dict[str, Any]
    iscrowd: bool = False
    bbox: list[float] | None = None  # xywh from the file, if any (boxes are recomputed from masks)
    ann_id: int | None = None


@dataclass
class ImageRecord:
    """One image and (for labeled data) its instances."""

    file_name: Path
    image_id: int
    height: int | None = None  # None for unlabeled folders (read from the file when loaded)
    width: int | None = None
    annotations: list[Annotation] = field(default_factory=list)


@dataclass
class DatasetRecords:
    """All records of a dataset plus what evaluation needs to map ids back.

    class_names:  name of each contiguous class id
    category_ids: original dataset category id of each contiguous class id
    source:       the file or folder the records came from (named in error messages)
    stuff_classes: contiguous ids of the stuff classes (COCO panoptic `isthing: 0`); the rest are things
    """

    records: list[ImageRecord]
    class_names: list[str]
    category_ids: list[int]
    source: Path
    stuff_classes: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def is_thing(self) -> list[bool]:
        return [k not in self.stuff_classes for k in range(self.num_classes)]
