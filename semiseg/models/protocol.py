"""The meta-architecture protocol: everything the engine and the semi-supervised code rely on.

A model is any `nn.Module` with these members; Mask2Former and Mask DINO implement it, and
`tests/test_protocol.py` checks every implementation (a third meta-architecture is added by
passing that test). The trainers call nothing else, and never branch on an architecture name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import torch

from semiseg.structures import Instances


@dataclass
class PseudoLabelCandidates:
    """Per-query evidence from a teacher's outputs, turned into pseudo-labels by a filter.

    class_probs: [B, Q, K] class probabilities (Mask2Former: softmax over K+1 without "no object";
                 Mask DINO: sigmoid scores)
    is_object:   [B, Q] bool, whether the query predicts an object at all (Mask2Former: its argmax is
                 not "no object"; Mask DINO: all true)
    mask_logits: [B, Q, h, w] mask logits on the padded canvas at 1/4 of its resolution (h = H / 4)
    boxes:       [B, Q, 4] xyxy boxes in pixels of the `mask_logits` canvas (h, w), or None when the
                 model predicts no boxes (Mask2Former; a filter then derives them from the masks)
    """

    class_probs: torch.Tensor
    is_object: torch.Tensor
    mask_logits: torch.Tensor
    boxes: torch.Tensor | None = None


@dataclass(frozen=True)
class PseudoLabelDefaults:
    """The pseudo-label filter settings a model's scores call for (`semi.pseudo_labels` overrides them).

    score_threshold: keep a query whose class confidence exceeds this
    nms_iou:         class-agnostic mask NMS between kept queries above this IoU (1.0 = off)
    """

    score_threshold: float
    nms_iou: float


@runtime_checkable
class MetaArchitecture(Protocol):
    """What a model offers the trainers. images: [B, 3, H, W] uint8 padded batch; image_sizes: valid (h, w)."""

    pseudo_label_defaults: PseudoLabelDefaults

    def forward(self, images: torch.Tensor, image_sizes: Sequence[tuple[int, int]],
                targets: Sequence[Instances] | None = None) -> dict:
        """Raw outputs (a dict of tensors); `targets` only for models that use them in training (denoising)."""

    def loss(self, outputs: dict, targets: Sequence[Instances], unmatched_weight: float = 1.0
             ) -> dict[str, torch.Tensor]:
        """Weighted loss terms. Target masks may come at any resolution of the padded canvas (ground truth
        at full size, pseudo-labels at 1/4). unmatched_weight scales the class loss of queries that no
        target matched (Guided Distillation's `semi.unmatched_weight`, for unlabeled images)."""

    def predict(self, outputs: dict, image_sizes: Sequence[tuple[int, int]],
                orig_sizes: Sequence[tuple[int, int]]) -> list:
        """Per image, at the original size, by the model's `task` (a `SegmentationTask`): scored Instances
        (masks [N, H, W], boxes, labels, scores), a PanopticSegmentation, or a [H, W] class map."""

    def pseudo_label_candidates(self, outputs: dict) -> PseudoLabelCandidates:
        """The final layer's per-query evidence, for a pseudo-label filter."""
