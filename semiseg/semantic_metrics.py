"""Semantic segmentation metrics (mIoU, frequency-weighted IoU, mean and pixel accuracy), as detectron2's
`SemSegEvaluator` computes them: one confusion matrix over all pixels whose ground truth is not ignored.

A confusion matrix is a `bincount`; no library is needed for it (tests compare with torchmetrics).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from semiseg.data.masks import decode_segmentation
from semiseg.data.records import DatasetRecords, ImageRecord
from semiseg.errors import DataError

IGNORE = 255  # ground-truth pixels that no annotation covers


def ground_truth_classes(record: ImageRecord) -> np.ndarray:
    """A record's annotations painted in order into a [H, W] int64 class map, IGNORE where none is."""
    classes = np.full((record.height, record.width), IGNORE, np.int64)
    for annotation in record.annotations:
        classes[decode_segmentation(annotation.segmentation, record.height, record.width)] = annotation.label
    return classes


def confusion_matrix(truth: np.ndarray, prediction: np.ndarray, num_classes: int) -> np.ndarray:
    """[K, K] int64 counts, rows = ground truth, columns = prediction; IGNORE pixels are left out."""
    valid = truth != IGNORE
    if prediction[valid].size and (prediction[valid].min() < 0 or prediction[valid].max() >= num_classes):
        raise ValueError(f"predicted classes must lie in [0, {num_classes})")
    flat = truth[valid] * num_classes + prediction[valid]
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def summarize_confusion(confusion: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """{"mIoU", "fwIoU", "mACC", "pACC", "per_class": {name: IoU}} in percent; a class absent from both
    the ground truth and the predictions has IoU nan and is left out of the means."""
    tp = np.diag(confusion).astype(np.float64)
    truth, predicted = confusion.sum(1).astype(np.float64), confusion.sum(0).astype(np.float64)
    union = truth + predicted - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    accuracy = np.where(truth > 0, tp / np.maximum(truth, 1), np.nan)
    total = truth.sum()
    frequency = truth / max(total, 1)
    valid = union > 0
    return {
        "mIoU": float(np.nanmean(iou) * 100) if valid.any() else math.nan,
        "fwIoU": float((frequency[valid] * iou[valid]).sum() * 100),
        "mACC": float(np.nanmean(accuracy) * 100) if (truth > 0).any() else math.nan,
        "pACC": float(tp.sum() / max(total, 1) * 100),
        "per_class": {n: float(iou[k] * 100) for k, n in enumerate(class_names)},
    }


class SemanticEvaluator:
    """mIoU of [H, W] class maps (at the original size) over the images of `records`.

    `add(image_id, class_map)` accumulates the image's confusion (each image once); images never
    added do not count. Same interface as `CocoEvaluator`.
    """

    def __init__(self, records: DatasetRecords):
        self.source = str(records.source)
        self.class_names = records.class_names
        self._records = {r.image_id: r for r in records.records}
        self._confusion = np.zeros((len(self.class_names),) * 2, np.int64)
        self._added: set[int] = set()

    def reset(self) -> None:
        self._confusion[:] = 0
        self._added.clear()

    def add(self, image_id: int, prediction: torch.Tensor) -> None:
        record = self._records.get(int(image_id))
        if record is None:
            raise DataError(f"{self.source}: predictions for image id {image_id}, which is not in the annotations")
        if int(image_id) in self._added:
            raise ValueError(f"image id {image_id} was already added")
        predicted = prediction.detach().cpu().numpy().astype(np.int64)
        if predicted.shape != (record.height, record.width):
            raise DataError(f"{self.source}: image {image_id} is {record.height}x{record.width} but its semantic "
                            f"prediction is {predicted.shape[0]}x{predicted.shape[1]}")
        self._confusion += confusion_matrix(ground_truth_classes(record), predicted, len(self.class_names))
        self._added.add(int(image_id))

    def gather(self) -> None:
        """Sum the confusion matrices of all ranks on every rank (a no-op without torch.distributed)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[np.ndarray | None] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, self._confusion)
            self._confusion = np.sum(gathered, axis=0)

    def evaluate(self) -> dict[str, dict]:
        """{"sem_seg": {"mIoU", "fwIoU", "mACC", "pACC", "per_class"}}."""
        return {"sem_seg": summarize_confusion(self._confusion, self.class_names)}
