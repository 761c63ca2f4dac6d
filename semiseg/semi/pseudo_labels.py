"""Pseudo-label filters: turn a teacher's per-query evidence into `Instances` targets.

A filter is any callable `(candidates, image_sizes) -> list[Instances]`, where `candidates` is the
model's `PseudoLabelCandidates` (class_probs [B,Q,K], is_object [B,Q], mask_logits [B,Q,h,w],
boxes [B,Q,4] | None) and `image_sizes` the valid (h, w) of each image in the padded canvas. The
Guided Distillation trainer only calls the filter, so variants (decoupled class/mask thresholds,
external mask refiners, learned filters) plug in without touching the trainer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from semiseg.errors import ConfigError
from semiseg.structures import Instances

if TYPE_CHECKING:
    from semiseg.models.protocol import PseudoLabelCandidates

PseudoLabelFilter = Callable[["PseudoLabelCandidates", Sequence[tuple[int, int]]], list[Instances]]


@dataclass(frozen=True)
class ThresholdFilter:
    """Guided Distillation's filter (defaults = the reference's hard-coded values).

    A query becomes a pseudo-instance when
    - it is an object (Mask2Former: its argmax over K+1 classes is not "no object"),
    - its confidence max_c class_probs > `score_threshold` (or `class_thresholds[c]` for its class c),
    - its soft mask area, the sum of sigmoid(mask logits) inside the image, exceeds `min_area`
      (in mask pixels, i.e. at 1/`mask_stride` resolution).
    Its mask is sigmoid > `mask_threshold` and its box is derived from the mask. `scores` carries
    the confidence, so a loss may weight pseudo-instances by it.

    Deviation from the reference: mask pixels in the padding (outside `image_sizes`) are cleared
    before the area test, so a pseudo-mask never claims padding.
    """

    score_threshold: float = 0.7
    min_area: float = 5.0
    mask_threshold: float = 0.5
    class_thresholds: tuple[float, ...] | None = None
    mask_stride: int = 4

    def __call__(self, candidates: "PseudoLabelCandidates",
                 image_sizes: Sequence[tuple[int, int]]) -> list[Instances]:
        probs = candidates.class_probs.float()  # [B, Q, K]
        mask_logits = candidates.mask_logits.float()  # [B, Q, h, w]
        num_images, _, num_classes = probs.shape
        if len(image_sizes) != num_images:
            raise ValueError(f"{len(image_sizes)} image sizes for a batch of {num_images}")
        confidence, labels = probs.max(dim=2)  # [B, Q]
        threshold = self._thresholds(num_classes, probs.device)[labels]  # [B, Q]
        soft = mask_logits.sigmoid() * self._valid_region(mask_logits, image_sizes)  # [B, Q, h, w]
        keep = candidates.is_object & (confidence > threshold) & (soft.sum(dim=(2, 3)) > self.min_area)
        results = []
        for b in range(num_images):
            k = keep[b]
            masks = soft[b, k] > self.mask_threshold
            results.append(Instances.from_masks(labels[b, k], masks, scores=confidence[b, k]))
        return results

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
