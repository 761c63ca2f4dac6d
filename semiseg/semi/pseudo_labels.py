"""Pseudo-label filters: turn a teacher's per-query evidence into `Instances` targets.

A filter is any callable `(candidates, image_sizes) -> list[Instances]`, where `candidates` is the
model's `PseudoLabelCandidates` (class_probs [B,Q,K], is_object [B,Q], mask_logits [B,Q,h,w],
boxes [B,Q,4] | None) and `image_sizes` the valid (h, w) of each image in the padded canvas. The
Guided Distillation trainer only calls the filter, so variants (decoupled class/mask thresholds,
external mask refiners, learned filters) plug in without touching the trainer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F

from semiseg.errors import ConfigError
from semiseg.models.protocol import PseudoLabelCandidates
from semiseg.structures import Instances

PseudoLabelFilter = Callable[[PseudoLabelCandidates, Sequence[tuple[int, int]]], list[Instances]]


@dataclass(frozen=True)
class ThresholdFilter:
    """Guided Distillation's filter (defaults = the reference's hard-coded values).

    A query becomes a pseudo-instance when
    - it is an object (Mask2Former: its argmax over K+1 classes is not "no object"),
    - its confidence max_c class_probs > `score_threshold` (or `class_thresholds[c]` for its class c),
    - its soft mask area, the sum of sigmoid(mask logits) inside the image, exceeds `min_area`
      (in mask pixels, i.e. at 1/`mask_stride` resolution).
    Its mask is sigmoid > `mask_threshold`, on the mask canvas: the logits' (h, w), or with
    `mask_upsampling` f > 1, the logits bilinearly upsampled to (f*h, f*w) first (f = `mask_stride`:
    the input canvas, the resolution at which the model's own inference binarises its masks; the
    reference binarises at 1/4, which costs small objects their shape). Its box, xyxy pixels of the
    mask canvas (the units the student's box loss and denoising normalise by that canvas), comes from
    - `box_source="mask"`: the binarised mask (the reference's rule, works for every model),
    - `box_source="head"`: the teacher's box head (`candidates.boxes`), clipped to the image.
    With `nms_iou` < 1, greedy class-agnostic mask-IoU NMS in order of confidence then drops a
    kept query whose mask overlaps a more confident kept one by IoU > `nms_iou` (for sigmoid-score
    models such as Mask DINO, whose duplicates no "no object" class suppresses). `scores` carries
    the confidence, so a loss may weight pseudo-instances by it. With `soft_classes`, `class_probs`
    carries the teacher's class probabilities [N, K], which the criteria then use as soft targets.

    With `ignore_threshold` set (below the thresholds above), a query that passes every test but
    the confidence one, with confidence > `ignore_threshold`, becomes an *ignored* pseudo-instance
    (`Instances.ignore`; NMS treats it like the others): the student's query matched to it gets no
    loss, so an object the teacher is unsure of is taught neither a class nor "no object".

    Deviation from the reference: mask pixels in the padding (outside `image_sizes`) are cleared
    before the area test, so a pseudo-mask never claims padding.
    """

    score_threshold: float = 0.7
    min_area: float = 5.0
    mask_threshold: float = 0.5
    class_thresholds: tuple[float, ...] | None = None
    mask_stride: int = 4
    box_source: Literal["mask", "head"] = "mask"
    nms_iou: float = 1.0
    soft_classes: bool = False
    ignore_threshold: float | None = None
    mask_upsampling: int = 1

    def __call__(self, candidates: PseudoLabelCandidates,
                 image_sizes: Sequence[tuple[int, int]]) -> list[Instances]:
        probs = candidates.class_probs.float()  # [B, Q, K]
        mask_logits = candidates.mask_logits.float()  # [B, Q, h, w]
        num_images, _, num_classes = probs.shape
        if len(image_sizes) != num_images:
            raise ValueError(f"{len(image_sizes)} image sizes for a batch of {num_images}")
        if self.box_source == "head" and candidates.boxes is None:
            raise ConfigError("semi.pseudo_labels.box_source=head needs a model with a box head (e.g. maskdino); "
                              "use box_source=mask")
        confidence, labels = probs.max(dim=2)  # [B, Q]
        threshold = self._thresholds(num_classes, probs.device)[labels]  # [B, Q]
        soft = mask_logits.sigmoid() * self._valid_region(mask_logits, image_sizes)  # [B, Q, h, w]
        candidate = candidates.is_object & (soft.sum(dim=(2, 3)) > self.min_area)
        confident = candidate & (confidence > threshold)
        keep = confident if self.ignore_threshold is None else candidate & (confidence > self.ignore_threshold)
        results = []
        for b in range(num_images):
            idx = keep[b].nonzero().view(-1)
            masks = self._binary_masks(mask_logits[b, idx], soft[b, idx], image_sizes[b])
            if self.nms_iou < 1.0:
                survivors = mask_nms(masks, confidence[b, idx], self.nms_iou)
                idx, masks = idx[survivors], masks[survivors]
            instances = Instances.from_masks(labels[b, idx], masks, scores=confidence[b, idx])
            if self.ignore_threshold is not None:
                instances = replace(instances, ignore=~confident[b, idx])
            if self.soft_classes:
                instances = replace(instances, class_probs=probs[b, idx])
            if self.box_source == "head":
                boxes = self._clipped_head_boxes(candidates.boxes[b, idx].float(), image_sizes[b])
                instances = replace(instances, boxes=boxes)
            results.append(instances)
        return results

    def _binary_masks(self, logits: torch.Tensor, soft: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """The kept queries' logits [N, h, w] and padding-cleared sigmoids -> [N, f*h, f*w] bool pseudo-masks."""
        if self.mask_upsampling == 1:
            return soft > self.mask_threshold
        h, w = logits.shape[-2:]
        canvas = (h * self.mask_upsampling, w * self.mask_upsampling)
        if len(logits) == 0:  # interpolate refuses an empty batch
            return torch.zeros(0, *canvas, dtype=torch.bool, device=logits.device)
        upsampled = F.interpolate(logits[None], size=canvas, mode="bilinear", align_corners=False)[0]
        masks = upsampled.sigmoid() > self.mask_threshold
        valid_h, valid_w = (math.ceil(n * self.mask_upsampling / self.mask_stride) for n in image_size)
        masks[:, valid_h:] = False
        masks[:, :, valid_w:] = False
        return masks

    def _clipped_head_boxes(self, boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """[N, 4] xyxy pixels of the logits' canvas -> xyxy pixels of the mask canvas, clipped to the image."""
        boxes = boxes * self.mask_upsampling
        valid_h, valid_w = (math.ceil(n * self.mask_upsampling / self.mask_stride) for n in image_size)
        limits = torch.tensor([valid_w, valid_h, valid_w, valid_h], dtype=boxes.dtype, device=boxes.device)
        return torch.minimum(boxes.clamp(min=0.0), limits)

    def _thresholds(self, num_classes: int, device: torch.device) -> torch.Tensor:
        """[K] confidence threshold of each class."""
        if self.class_thresholds is None:
            return torch.full((num_classes,), self.score_threshold, device=device)
        if len(self.class_thresholds) != num_classes:
            raise ConfigError(f"semi.pseudo_labels.class_thresholds has {len(self.class_thresholds)} values "
                              f"but the model has {num_classes} classes")
        return torch.tensor(self.class_thresholds, dtype=torch.float32, device=device)

    def _valid_region(self, mask_logits: torch.Tensor, image_sizes: Sequence[tuple[int, int]]) -> torch.Tensor:
        """[B, 1, h, w] float: 1 inside each image's valid area at mask resolution, 0 in the padding."""
        num_images, _, h, w = mask_logits.shape
        region = torch.zeros(num_images, 1, h, w, device=mask_logits.device)
        for b, (img_h, img_w) in enumerate(image_sizes):
            region[b, :, :math.ceil(img_h / self.mask_stride), :math.ceil(img_w / self.mask_stride)] = 1.0
        return region


def mask_iou(masks: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of binary masks: [N, h, w] bool -> [N, N] float (0 where both are empty)."""
    flat = masks.flatten(1).float()  # [N, h*w]
    inter = flat @ flat.T
    area = flat.sum(dim=1)
    return inter / (area[:, None] + area[None, :] - inter).clamp(min=1.0)


def mask_nms(masks: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy class-agnostic NMS on masks: [N, h, w] bool, [N] -> [N] bool, True = kept.

    Visiting masks by decreasing score, a mask is dropped when its IoU with an earlier *kept* mask
    exceeds `iou_threshold` (ties in score: query order). Solved as the fixed point of whole-tensor
    passes over the [N, N] "would suppress" matrix: each pass settles at least one more mask in score
    order, so it ends after at most N passes, usually a few.
    """
    order = scores.argsort(descending=True, stable=True)
    ranked = mask_iou(masks[order]) > iou_threshold  # [N, N]
    suppresses = ranked.triu(diagonal=1)  # earlier (row) would suppress later (column)
    keep = torch.ones(len(order), dtype=torch.bool, device=masks.device)
    while True:
        updated = ~(suppresses & keep[:, None]).any(dim=0)
        if torch.equal(updated, keep):
            break
        keep = updated
    kept = torch.zeros_like(keep)
    kept[order] = keep
    return kept
