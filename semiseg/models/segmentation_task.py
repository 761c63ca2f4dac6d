"""What a model's `predict` returns, and the panoptic and semantic post-processing both meta-architectures share.

The reference's rules (Mask2Former `maskformer_model.py` `panoptic_inference` / `semantic_inference`;
Mask DINO uses the same loops with its own scores, see its `predict`):

- **semantic**: per pixel, sum over queries of class probability x mask probability, [K, H, W]; the
  class map is its argmax.
- **panoptic**: the queries kept by the model (score above `object_mask_threshold`, not "no object")
  compete per pixel by score x mask probability. A query becomes a segment where it wins and its own
  mask probability is >= 0.5, unless that leaves less than `overlap_threshold` of its mask (>= 0.5)
  or nothing at all. Stuff classes get one segment per image (later queries of the class join it).

transformers' `Mask2FormerImageProcessor` differs in three details (a query's area there is
measured on score-scaled probabilities, a pixel that no mask covers goes to its argmax query, and a
fused stuff class resets the running segment id), so tests compare with it where the rules agree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from semiseg.structures import PanopticSegmentation, Segment

TASKS = ("instance", "panoptic", "semantic")


@dataclass(frozen=True)
class SegmentationTask:
    """The task a model is trained and evaluated for (`model.task`, `model.stuff_classes`).

    name:          "instance" (`predict` -> list[Instances]), "panoptic" (list[PanopticSegmentation])
                   or "semantic" (list of [H, W] long class maps)
    stuff_classes: contiguous ids of the stuff classes (panoptic: one segment per class and image)

    The panoptic thresholds are the meta-architecture's own settings (`object_mask_threshold`,
    `overlap_threshold`: Mask2Former 0.8 / 0.8, Mask DINO 0.25 / 0.8, the references' values).
    """

    name: Literal["instance", "panoptic", "semantic"] = "instance"
    stuff_classes: tuple[int, ...] = ()


def semantic_inference(class_probs: torch.Tensor, mask_probs: torch.Tensor) -> torch.Tensor:
    """class_probs [Q, K], mask_probs [Q, H, W] -> [H, W] long class map (argmax of the [K, H, W] sum)."""
    return torch.einsum("qk,qhw->khw", class_probs.float(), mask_probs.float()).argmax(0)


def panoptic_inference(scores: torch.Tensor, labels: torch.Tensor, mask_probs: torch.Tensor,
                       stuff_classes: tuple[int, ...] | set[int], overlap_threshold: float) -> PanopticSegmentation:
    """The kept queries of one image -> its panoptic segmentation (ids 1, 2, ... in query order).

    scores [N], labels [N] contiguous classes, mask_probs [N, H, W] sigmoid mask probabilities at the
    output size.
    """
    height, width = mask_probs.shape[-2:]
    segment_ids = torch.zeros(height, width, dtype=torch.int32, device=mask_probs.device)
    segments: list[Segment] = []
    if len(scores) == 0:
        return PanopticSegmentation(segment_ids, segments)
    winner = (scores[:, None, None] * mask_probs).argmax(0)  # [H, W]
    stuff_segment: dict[int, int] = {}
    for k in range(len(scores)):
        label = int(labels[k])
        own = mask_probs[k] >= 0.5
        won = winner == k
        visible = won & own
        won_area, own_area = int(won.sum()), int(own.sum())
        if won_area == 0 or own_area == 0 or not bool(visible.any()) or won_area / own_area < overlap_threshold:
            continue
        if label in stuff_classes and label in stuff_segment:
            segment_ids[visible] = stuff_segment[label]
            continue
        segment_id = len(segments) + 1
        segment_ids[visible] = segment_id
        segments.append(Segment(segment_id, label, label not in stuff_classes, float(scores[k])))
        if label in stuff_classes:
            stuff_segment[label] = segment_id
    return PanopticSegmentation(segment_ids, segments)
