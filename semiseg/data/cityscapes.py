"""Cityscapes as downloaded: `gtFine/{split}/{city}/*_gtFine_instanceIds.png` beside
`leftImg8bit/{split}/{city}/*_leftImg8bit.png`, for the instance, panoptic and semantic tasks.

In an instanceIds PNG a pixel value v >= 1000 is instance v % 1000 of the label id v // 1000; a value
below 1000 is a label id without instances. The 8 evaluated thing classes are person, rider, car,
truck, bus, train, motorcycle and bicycle (label ids 24-28, 31-33). Their instances become
annotations; their pixels without an instance (label id < 1000, e.g. "car group") become crowd
regions (ignored in training, as COCO crowds in evaluation); every other label (stuff, and the
things not evaluated: caravan, trailer) is background. Category ids are the Cityscapes label ids.
Evaluation reports COCO AP on these masks and the official Cityscapes AP (`cityscapes_evaluation.py`).

Panoptic and semantic tasks use the 19 evaluated classes (the train ids: 11 stuff classes road ..
sky, then the 8 things), read from the same file: a stuff class is one segment per image, thing
pixels without an instance are crowd; every other label (void, license plate, caravan, ...) is void
(255 in semantic evaluation). The semantic task merges each class's segments (`readers.py`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from semiseg.data.masks import encode_rle
from semiseg.data.records import Annotation, DatasetRecords, ImageRecord
from semiseg.errors import DataError

THING_CLASSES = {24: "person", 25: "rider", 26: "car", 27: "truck", 28: "bus", 31: "train", 32: "motorcycle",
                 33: "bicycle"}
STUFF_CLASSES = {7: "road", 8: "sidewalk", 11: "building", 12: "wall", 13: "fence", 17: "pole",
                 19: "traffic light", 20: "traffic sign", 21: "vegetation", 22: "terrain", 23: "sky"}
TRAIN_CLASSES = {**STUFF_CLASSES, **THING_CLASSES}  # label id -> name, in train-id order 0..18
MAX_LABEL_ID = 33  # label ids are -1 (license plate) .. 33
GT_SUFFIX = "_gtFine_instanceIds.png"
IMAGE_SUFFIX = "_leftImg8bit.png"


def load_cityscapes_instances(gt_dir: Path, image_dir: Path, task: str = "instance") -> DatasetRecords:
    """Records of every `*_gtFine_instanceIds.png` under `gt_dir` (e.g. gtFine/train), their images
    under `image_dir` (leftImg8bit/train) at the same city/name; DataError naming the file otherwise.
    task "instance": the 8 thing classes; "panoptic" / "semantic": the 19 train classes (11 stuff)."""
    gt_dir, image_dir = Path(gt_dir), Path(image_dir)
    if not gt_dir.is_dir():
        raise DataError(f"{gt_dir}: no such folder (expected Cityscapes gtFine/<split>)")
    gt_files = instance_id_files(gt_dir)
    classes = THING_CLASSES if task == "instance" else TRAIN_CLASSES
    labels = {label_id: index for index, label_id in enumerate(classes)}
    records = []
    for image_id, gt_file in enumerate(gt_files, start=1):
        relative = gt_file.relative_to(gt_dir)
        image = image_dir / relative.parent / (gt_file.name[:-len(GT_SUFFIX)] + IMAGE_SUFFIX)
        if not image.is_file():
            raise DataError(f"{gt_file}: its image {image} does not exist")
        ids = read_instance_ids(gt_file)
        records.append(ImageRecord(image, image_id, int(ids.shape[0]), int(ids.shape[1]),
                                   instance_annotations(ids, labels, gt_file)))
    stuff = tuple(labels[i] for i in STUFF_CLASSES if i in labels)
    return DatasetRecords(records, list(classes.values()), list(classes), gt_dir, stuff)


def instance_id_files(gt_dir: Path) -> list[Path]:
    """The `*_gtFine_instanceIds.png` under `gt_dir`, sorted: image id i + 1 is the i-th."""
    gt_files = sorted(Path(gt_dir).rglob(f"*{GT_SUFFIX}"))
    if not gt_files:
        raise DataError(f"{gt_dir}: no *{GT_SUFFIX} files (expected gtFine/<split>/<city>/...)")
    return gt_files


def records_to_coco(dataset: DatasetRecords) -> dict:
    """A COCO instances dict of `dataset`: the ground truth of `CocoEvaluator` for a format without a
    json of its own (the evaluator derives each mask's area and box)."""
    images, annotations = [], []
    for record in dataset.records:
        images.append({"id": record.image_id, "file_name": str(record.file_name), "height": record.height,
                       "width": record.width})
        for a in record.annotations:
            annotations.append({"id": len(annotations) + 1, "image_id": record.image_id,
                                "category_id": dataset.category_ids[a.label], "segmentation": a.segmentation,
                                "iscrowd": int(a.iscrowd)})
    categories = [{"id": c, "name": n} for c, n in zip(dataset.category_ids, dataset.class_names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def read_instance_ids(path: Path) -> np.ndarray:
    """[H, W] int64 pixel values of an instanceIds PNG (16- or 32-bit grayscale)."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("I", "I;16", "I;16B", "L"):
                raise DataError(f"{path}: an instanceIds PNG must be single-channel, got mode {image.mode}")
            return np.asarray(image).astype(np.int64)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable PNG ({e})") from None


def instance_annotations(ids: np.ndarray, labels: dict[int, int], source: Path) -> list[Annotation]:
    """Annotations of one instanceIds map (`labels`: Cityscapes label id -> contiguous class): one per
    instance, and one per value below 1000 of a class in `labels` (crowd for things, the segment of a
    stuff class)."""
    annotations = []
    for value in np.unique(ids).tolist():
        label_id = value // 1000 if value >= 1000 else value
        if not -1 <= label_id <= MAX_LABEL_ID:
            raise DataError(f"{source}: pixel value {value} is not a Cityscapes id (label id {label_id} "
                            f"outside -1..{MAX_LABEL_ID})")
        if label_id in labels:
            crowd = value < 1000 and label_id in THING_CLASSES
            annotations.append(Annotation(labels[label_id], encode_rle(ids == value), iscrowd=crowd))
    return annotations
