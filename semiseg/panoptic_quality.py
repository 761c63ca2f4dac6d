"""Panoptic quality (PQ = SQ x RQ) with panopticapi's rules, collected per image by `PanopticEvaluator`.

Per image and class (Kirillov et al. 2019; panopticapi `pq_compute_single_core`):
- a predicted and a ground-truth segment of the same class match when their IoU > 0.5, where the
  union leaves out the predicted pixels that fall on void (unlabeled) ground truth;
- crowd ground truth is never matched; an unmatched ground-truth segment is a false negative;
- an unmatched prediction is a false positive unless more than half of it lies on void pixels plus
  the crowd regions of its class (then it is ignored);
- PQ = sum of matched IoUs / (TP + FP/2 + FN/2), SQ = IoU sum / TP, RQ = TP / (TP + FP/2 + FN/2),
  averaged over the classes that have a TP, FP or FN (all, things, stuff).

Written here because the one official implementation (panopticapi) works on PNG folders through a
process pool and is not packaged on PyPI; tests check it on hand-built cases and against
torchmetrics' `PanopticQuality`.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from semiseg.data.masks import decode_segmentation
from semiseg.data.records import DatasetRecords, ImageRecord
from semiseg.errors import DataError
from semiseg.structures import PanopticSegmentation

VOID = 0  # the segment id of unlabeled pixels, in ground truth and predictions alike
STAT_ROWS = ("tp", "fp", "fn", "iou")


def image_pq_stats(gt_ids: np.ndarray, gt_segments: dict[int, tuple[int, bool]], pred_ids: np.ndarray,
                   pred_segments: dict[int, int], num_classes: int) -> np.ndarray:
    """One image -> [4, K] float64 rows tp, fp, fn, iou sum per class.

    gt_ids / pred_ids: [H, W] integer segment maps (0 = void / nothing predicted);
    gt_segments: {id: (class, iscrowd)}; pred_segments: {id: class}.
    """
    if gt_ids.shape != pred_ids.shape:
        raise ValueError(f"ground truth {gt_ids.shape} and prediction {pred_ids.shape} differ in size")
    stats = np.zeros((len(STAT_ROWS), num_classes))
    offset = int(pred_ids.max(initial=0)) + 1
    pairs, counts = np.unique(gt_ids.astype(np.int64) * offset + pred_ids.astype(np.int64), return_counts=True)
    overlap = {(int(p) // offset, int(p) % offset): int(c) for p, c in zip(pairs, counts)}
    gt_area: dict[int, int] = {}
    pred_area: dict[int, int] = {}
    for (g, p), c in overlap.items():
        gt_area[g] = gt_area.get(g, 0) + c
        pred_area[p] = pred_area.get(p, 0) + c
    unknown = set(pred_area) - set(pred_segments) - {VOID}
    if unknown:
        raise ValueError(f"predicted segment ids {sorted(unknown)[:5]} are in the map but not in the segment list")
    matched_gt, matched_pred = set(), set()
    for (g, p), intersection in overlap.items():
        if g not in gt_segments or p not in pred_segments:
            continue
        label, crowd = gt_segments[g]
        if crowd or label != pred_segments[p]:
            continue
        union = pred_area[p] + gt_area[g] - intersection - overlap.get((VOID, p), 0)
        iou = intersection / union
        if iou > 0.5:
            stats[0, label] += 1
            stats[3, label] += iou
            matched_gt.add(g)
            matched_pred.add(p)
    crowd_of_class: dict[int, list[int]] = {}
    for g, (label, crowd) in gt_segments.items():
        if crowd:
            crowd_of_class.setdefault(label, []).append(g)
        elif g not in matched_gt and gt_area.get(g, 0) > 0:
            stats[2, label] += 1
    for p, label in pred_segments.items():
        if p in matched_pred or pred_area.get(p, 0) == 0:
            continue
        ignored = overlap.get((VOID, p), 0) + sum(overlap.get((g, p), 0) for g in crowd_of_class.get(label, []))
        if ignored / pred_area[p] <= 0.5:
            stats[1, label] += 1
    return stats


def summarize_pq(stats: np.ndarray, is_thing: list[bool], class_names: list[str]) -> dict[str, Any]:
    """[4, K] summed stats -> {"PQ", "SQ", "RQ", "PQ_th", ..., "PQ_st", ..., "per_class": {name: PQ}} in percent."""
    tp, fp, fn, iou = stats
    counted = (tp + fp + fn) > 0
    denominator = np.maximum(tp + 0.5 * fp + 0.5 * fn, 1e-12)
    pq, sq, rq = iou / denominator, np.where(tp > 0, iou / np.maximum(tp, 1), 0.0), tp / denominator
    things = np.array(is_thing, dtype=bool)
    result: dict[str, Any] = {}
    for suffix, chosen in (("", np.ones_like(things)), ("_th", things), ("_st", ~things)):
        selected = counted & chosen
        for name, values in (("PQ", pq), ("SQ", sq), ("RQ", rq)):
            result[name + suffix] = float(values[selected].mean() * 100) if selected.any() else math.nan
    result["per_class"] = {n: float(pq[k] * 100) if counted[k] else math.nan for k, n in enumerate(class_names)}
    return result


def ground_truth_segments(record: ImageRecord) -> tuple[np.ndarray, dict[int, tuple[int, bool]]]:
    """A record's annotations painted in order into a [H, W] int32 id map (ids 1..N) and {id: (class, iscrowd)}."""
    ids = np.zeros((record.height, record.width), np.int32)
    segments = {}
    for index, annotation in enumerate(record.annotations, start=1):
        ids[decode_segmentation(annotation.segmentation, record.height, record.width)] = index
        segments[index] = (annotation.label, annotation.iscrowd)
    return ids, segments


class PanopticEvaluator:
    """PQ of panoptic predictions over the images of `records` (at their original size).

    `add(image_id, PanopticSegmentation)` scores an image at once (a later call for the same image
    replaces it); images never added count as predicted empty. Same interface as `CocoEvaluator`.
    """

    def __init__(self, records: DatasetRecords):
        self.source = str(records.source)
        self.class_names = records.class_names
        self.is_thing = records.is_thing
        self._records = {r.image_id: r for r in records.records}
        self._per_image: dict[int, np.ndarray] = {}

    def reset(self) -> None:
        self._per_image.clear()

    def add(self, image_id: int, prediction: PanopticSegmentation) -> None:
        record = self._records.get(int(image_id))
        if record is None:
            raise DataError(f"{self.source}: predictions for image id {image_id}, which is not in the annotations")
        pred_ids = prediction.segment_ids.detach().cpu().numpy()
        if pred_ids.shape != (record.height, record.width):
            raise DataError(f"{self.source}: image {image_id} is {record.height}x{record.width} but its panoptic "
                            f"prediction is {pred_ids.shape[0]}x{pred_ids.shape[1]}")
        gt_ids, gt_segments = ground_truth_segments(record)
        pred_segments = {s.id: s.label for s in prediction.segments}
        self._per_image[int(image_id)] = image_pq_stats(gt_ids, gt_segments, pred_ids, pred_segments,
                                                        len(self.class_names))

    def gather(self) -> None:
        """Give every rank the per-image statistics of all ranks (a no-op without torch.distributed)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[dict | None] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, self._per_image)
            for per_image in gathered:
                self._per_image.update(per_image)

    def evaluate(self) -> dict[str, dict]:
        """{"panoptic": {"PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st", "per_class"}}."""
        total = np.zeros((len(STAT_ROWS), len(self.class_names)))
        for image_id, record in self._records.items():
            if image_id in self._per_image:
                total += self._per_image[image_id]
            else:
                gt_ids, gt_segments = ground_truth_segments(record)
                total += image_pq_stats(gt_ids, gt_segments, np.zeros_like(gt_ids), {}, len(self.class_names))
        return {"panoptic": summarize_pq(total, self.is_thing, self.class_names)}
