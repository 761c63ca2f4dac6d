"""COCO mask and box AP of instance predictions, computed with faster-coco-eval.

`CocoEvaluator` collects `Instances` predictions per image (masks at the original image size),
turns them into COCO results (compressed RLE masks, xywh boxes, dataset category ids) and scores
them against a COCO instances ground truth. Numbers follow detectron2's conventions: percent
(0-100), mask AP uses the mask area for the small/medium/large split, and at most `max_dets`
predictions per image are kept by score.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from faster_coco_eval import COCO, COCOeval_faster
from faster_coco_eval.core import mask as mask_utils

from semiseg.errors import ConfigError, DataError
from semiseg.structures import Instances

logger = logging.getLogger(__name__)

IOU_TYPES = ("segm", "bbox")
SUMMARY_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # the first six COCOeval stats, in order
# every metric group an evaluation can report (instance: segm + bbox; panoptic; semantic) and its summary keys
METRIC_GROUPS = {"segm": SUMMARY_KEYS, "bbox": SUMMARY_KEYS,
                 "panoptic": ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st"),
                 "sem_seg": ("mIoU", "fwIoU", "mACC", "pACC"), "cityscapes": ("AP", "AP50")}
BEST_METRIC = {"instance": "segm.AP", "panoptic": "panoptic.PQ", "semantic": "sem_seg.mIoU"}  # train.best_metric: auto


class CocoEvaluator:
    """Collects predictions for the images of a COCO instances ground truth and computes AP.

    Contiguous label `k` of a prediction is dataset category `category_ids[k]`, with the categories
    sorted by id (the order the COCO reader uses). Ground truth annotations are renumbered 1..N
    internally (faster-coco-eval treats annotation id 0 as "unmatched"); a missing `area` is the
    mask area, a missing `bbox` the mask's box and a missing `iscrowd` is 0.
    """

    def __init__(self, coco_gt: dict[str, Any], source: str = "<in-memory COCO dict>", max_dets: int = 100):
        self.source = source
        self.max_dets = max_dets
        self._gt = _normalised_ground_truth(coco_gt, source)
        categories = sorted(self._gt["categories"], key=lambda c: c["id"])
        self.category_ids: list[int] = [c["id"] for c in categories]
        self.class_names: list[str] = [str(c.get("name", c["id"])) for c in categories]
        self._image_sizes = {img["id"]: (img["height"], img["width"]) for img in self._gt["images"]}
        self._per_image: dict[int, list[dict[str, Any]]] = {}

    @classmethod
    def from_json(cls, ann_file: str | os.PathLike, max_dets: int = 100) -> "CocoEvaluator":
        """Read a COCO instances json; a missing or malformed file raises `DataError`."""
        path = Path(ann_file)
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise DataError(f"{path}: annotation file not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: cannot read COCO json ({e})") from None
        return cls(data, source=str(path), max_dets=max_dets)

    @property
    def image_ids(self) -> list[int]:
        """Ids of the ground truth images, sorted."""
        return sorted(self._image_sizes)

    def reset(self) -> None:
        """Forget all predictions added so far."""
        self._per_image.clear()

    def add(self, image_id: int, predictions: Instances) -> None:
        """Record the predictions of one image; a later call for the same image replaces them.

        predictions: labels [N] contiguous, masks [N, H, W] bool at the original image size,
        boxes [N, 4] xyxy pixels, scores [N]. Only the `max_dets` highest scores are kept.
        """
        image_id = int(image_id)
        if image_id not in self._image_sizes:
            raise DataError(f"{self.source}: predictions for image id {image_id}, which is not in the annotations")
        if predictions.scores is None:
            raise ValueError("CocoEvaluator.add needs predictions with scores")
        height, width = self._image_sizes[image_id]
        if len(predictions) and predictions.image_size != (height, width):
            raise DataError(f"{self.source}: image {image_id} is {height}x{width} but its predicted masks are "
                            f"{predictions.image_size[0]}x{predictions.image_size[1]}")
        labels = predictions.labels.detach().cpu()
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.category_ids)):
            raise ValueError(f"predicted labels must lie in [0, {len(self.category_ids)}), got {labels.tolist()}")
        order = torch.argsort(predictions.scores.detach().cpu(), descending=True, stable=True)[: self.max_dets]
        kept = predictions[order.to(predictions.labels.device)].to("cpu")
        self._per_image[image_id] = _to_coco_results(image_id, kept, self.category_ids)

    def results(self) -> list[dict[str, Any]]:
        """All predictions in the COCO results format (JSON-serialisable), ordered by image id.

        Each entry: image_id, category_id (dataset id), segmentation (compressed RLE, counts as str),
        bbox (xywh), score.
        """
        return [r for image_id in sorted(self._per_image) for r in self._per_image[image_id]]


    def merge(self, other_results: Iterable[dict[str, Any]]) -> None:
        """Add results produced elsewhere (another rank, a results file), grouped by image id.

        The results of an image replace any this evaluator already holds for it.
        """
        grouped: dict[int, list[dict[str, Any]]] = {}
        for r in other_results:
            image_id = int(r["image_id"])
            if image_id not in self._image_sizes:
                raise DataError(f"{self.source}: results for image id {image_id}, which is not in the annotations")
            grouped.setdefault(image_id, []).append(r)
        self._per_image.update(grouped)

    def gather(self) -> None:
        """Give every rank the predictions of all ranks (`all_gather_object`).

        A no-op unless torch.distributed is initialised; afterwards rank 0 can call `evaluate`.
        """
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        gathered: list[dict[int, list[dict[str, Any]]] | None] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, self._per_image)
        for per_image in gathered:
            self._per_image.update(per_image)

    def evaluate(self, iou_types: Iterable[str] = IOU_TYPES, image_ids: Iterable[int] | None = None) -> dict[str, dict]:
        """COCO AP in percent per iou type.

        Returns {iou_type: {"AP", "AP50", "AP75", "APs", "APm", "APl": float,
        "per_class": {class_name: AP}}}. A value with no ground truth to measure it (an empty area
        range, a class without annotations) is nan. With no predictions every AP is 0.
        image_ids restricts the evaluation to those ground truth images (default: all of them).
        """
        iou_types = tuple(iou_types)
        for iou_type in iou_types:
            if iou_type not in IOU_TYPES:
                raise ConfigError(f"unknown iou type {iou_type!r} (expected one of {', '.join(IOU_TYPES)})")
        if image_ids is not None:
            image_ids = sorted({int(i) for i in image_ids})
            unknown = [i for i in image_ids if i not in self._image_sizes]
            if unknown:
                raise DataError(f"{self.source}: cannot evaluate image ids {unknown[:5]}: not in the annotations")
        results = self.results()
        return {t: self._evaluate_one(t, results, image_ids) for t in iou_types}

    def _evaluate_one(self, iou_type: str, results: list[dict[str, Any]], image_ids: list[int] | None) -> dict:
        # Mask AP: without "bbox" the results keep the mask area (not the box area) for the
        # small/medium/large split. Box AP: the box alone.
        keep = ("image_id", "category_id", "segmentation", "score") if iou_type == "segm" else \
            ("image_id", "category_id", "bbox", "score")
        dets = [{k: copy.copy(r[k]) for k in keep} for r in results]
        coco_gt = COCO(copy.deepcopy(self._gt), print_function=logger.debug)
        coco_dt = coco_gt.loadRes(dets)
        coco_eval = COCOeval_faster(coco_gt, coco_dt, iouType=iou_type, print_function=logger.debug)
        coco_eval.params.maxDets = [1, 10, self.max_dets]
        if image_ids is not None:
            coco_eval.params.imgIds = image_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
        metrics: dict[str, Any] = {k: _percent(v) for k, v in zip(SUMMARY_KEYS, coco_eval.stats[: len(SUMMARY_KEYS)])}
        # precision: [T iou thresholds, R recall thresholds, K classes, A area ranges, M max dets];
        # K follows params.catIds (sorted), area "all", the largest max dets.
        precision = np.asarray(coco_eval.eval["precision"])
        per_class = {}
        for k, name in enumerate(self.class_names):
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            per_class[name] = float(p.mean() * 100) if p.size else math.nan
        metrics["per_class"] = per_class
        return metrics


def format_metrics(metrics: dict[str, dict]) -> str:
    """A compact text table: one header and one row per metric group (segm / bbox: AP AP50 ... APl;
    panoptic: PQ SQ RQ and their things / stuff parts; sem_seg: mIoU fwIoU mACC pACC)."""
    rows = []
    for group, values in metrics.items():
        keys = METRIC_GROUPS[group]
        header = f"{'':<9}" + "".join(f"{k:>7}" for k in keys)
        if not rows or rows[-2] != header:
            rows.append(header)
        rows.append(f"{group:<9}" + "".join(f"{values[k]:>7.2f}" for k in keys))
    return "\n".join(rows)


def _percent(stat: float) -> float:
    """A COCOeval stat (-1 = nothing to measure) in percent, -1 as nan."""
    return float(stat * 100) if stat >= 0 else math.nan


def _to_coco_results(image_id: int, predictions: Instances, category_ids: list[int]) -> list[dict[str, Any]]:
    """One image's predictions (on CPU, at the original size) as COCO result dicts."""
    if len(predictions) == 0:
        return []
    masks = np.asfortranarray(predictions.masks.permute(1, 2, 0).numpy().astype(np.uint8))  # [H, W, N]
    rles = mask_utils.encode(masks)
    boxes = predictions.boxes.float().clone()
    boxes[:, 2:] -= boxes[:, :2]  # xyxy -> xywh
    results = []
    for rle, label, box, score in zip(rles, predictions.labels.tolist(), boxes.tolist(), predictions.scores.tolist()):
        counts = rle["counts"]
        results.append({
            "image_id": image_id,
            "category_id": category_ids[label],
            "segmentation": {"size": [int(s) for s in rle["size"]],
                             "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts},
            "bbox": [float(v) for v in box],
            "score": float(score),
        })
    return results


def _normalised_ground_truth(coco: dict[str, Any], source: str) -> dict[str, Any]:
    """A checked deep copy of a COCO instances dict, ready for faster-coco-eval (see CocoEvaluator)."""
    if not isinstance(coco, dict):
        raise DataError(f"{source}: not a COCO instances json (top level is not an object)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise DataError(f"{source}: not a COCO instances json (missing list {key!r})")
    images = copy.deepcopy(coco["images"])
    sizes = {}
    for img in images:
        if not isinstance(img, dict) or "id" not in img or "height" not in img or "width" not in img:
            raise DataError(f"{source}: every image needs 'id', 'height' and 'width' (got {str(img)[:80]})")
        img["id"] = int(img["id"])
        sizes[img["id"]] = (int(img["height"]), int(img["width"]))
    categories = copy.deepcopy(coco["categories"])
    if not categories:
        raise DataError(f"{source}: no categories")
    if not all(isinstance(c, dict) and "id" in c for c in categories):
        raise DataError(f"{source}: every category needs an 'id'")
    category_ids = {c["id"] for c in categories}
    annotations = []
    for index, ann in enumerate(coco["annotations"]):
        if not isinstance(ann, dict):
            raise DataError(f"{source}: annotation #{index} is not an object")
        if ann.get("image_id") not in sizes:
            raise DataError(f"{source}: annotation {ann.get('id')} refers to unknown image id {ann.get('image_id')}")
        if ann.get("category_id") not in category_ids:
            raise DataError(f"{source}: annotation {ann.get('id')} has unknown category id {ann.get('category_id')}")
        if "segmentation" not in ann:
            raise DataError(f"{source}: annotation {ann.get('id')} has no segmentation")
        ann = copy.deepcopy(ann)
        ann["id"] = index + 1
        ann["iscrowd"] = int(ann.get("iscrowd", 0))
        if "area" not in ann or "bbox" not in ann:
            height, width = sizes[ann["image_id"]]
            rle = _segmentation_to_rle(ann["segmentation"], height, width)
            ann.setdefault("area", float(mask_utils.area(rle)))
            ann.setdefault("bbox", [float(v) for v in mask_utils.toBbox(rle)])
        annotations.append(ann)
    return {"images": images, "annotations": annotations, "categories": categories}


def _segmentation_to_rle(segmentation: list | dict, height: int, width: int) -> dict:
    """COCO polygons, uncompressed or compressed RLE -> one compressed RLE."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation.get("counts"), list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation
