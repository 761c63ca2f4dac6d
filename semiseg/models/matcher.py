"""Hungarian matching of predicted queries to target instances (one-to-one, per image).

The cost of pairing query q with target t is a weighted sum of cost functions, each returning a
[Q, T] matrix: a class cost (pluggable: softmax for Mask2Former, `focal_class_cost` for Mask DINO),
mask costs (sigmoid BCE and dice) on points shared by all pairs of an image and, when their weights
are set (Mask DINO), box costs: L1 and -GIoU of normalised cxcywh boxes (targets normalised by their
own canvas). Costs are computed in float32 with autocast off and solved with
`scipy.optimize.linear_sum_assignment`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from semiseg.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou, normalized_cxcywh
from semiseg.models.point_sampling import point_sample
from semiseg.structures import Instances

ClassCost = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def softmax_class_cost(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-p(target class) with a softmax over K+1 logits. logits [Q, K+1], labels [T] -> [Q, T]."""
    return -logits.softmax(-1)[:, labels]


def focal_class_cost(logits: torch.Tensor, labels: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal cost (Deformable DETR / DINO): the focal loss of predicting the target class
    minus that of not predicting it. logits [Q, K] (no "no object"), labels [T] -> [Q, T]."""
    prob = logits.sigmoid()
    neg = (1 - alpha) * prob ** gamma * -(1 - prob + 1e-8).log()
    pos = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
    return pos[:, labels] - neg[:, labels]


def pairwise_sigmoid_bce(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean point-wise BCE of every prediction against every target. pred [Q, P] logits, target [T, P] -> [Q, T]."""
    num_points = pred.shape[1]
    pos = F.binary_cross_entropy_with_logits(pred, torch.ones_like(pred), reduction="none")
    neg = F.binary_cross_entropy_with_logits(pred, torch.zeros_like(pred), reduction="none")
    return (pos @ target.T + neg @ (1 - target).T) / num_points


def pairwise_dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft dice (+1 smoothing) of every prediction against every target. [Q, P], [T, P] -> [Q, T]."""
    prob = pred.sigmoid()
    numerator = 2 * prob @ target.T
    denominator = prob.sum(-1)[:, None] + target.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


class HungarianMatcher(nn.Module):
    """Matches queries to targets image by image.

    forward(outputs {"pred_logits": [B, Q, K+1], "pred_masks": [B, Q, h, w], "pred_boxes": [B, Q, 4] when
    box costs are set}, targets: B x Instances, coords: optional B x [1, P, 2] fixed points)
    -> B x (query indices [n] long, target indices [n] long), n = min(Q, T), on the CPU.
    Target masks may have any resolution: points are normalised canvas coordinates.
    """

    def __init__(self, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0,
                 num_points: int = 12544, class_cost: ClassCost = softmax_class_cost, cost_bbox: float = 0.0,
                 cost_giou: float = 0.0):
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matching costs are zero")
        self.cost_class, self.cost_mask, self.cost_dice = cost_class, cost_mask, cost_dice
        self.cost_bbox, self.cost_giou = cost_bbox, cost_giou
        self.num_points = num_points
        self.class_cost = class_cost

    def mask_costs(self, pred_masks: torch.Tensor, target_masks: torch.Tensor,
                   coords: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """BCE and dice costs on `num_points` uniform points shared by all pairs.

        pred_masks [Q, h, w] logits, target_masks [T, H, W] -> ([Q, T], [Q, T]).
        coords: [1, P, 2] points to use instead of a fresh uniform draw (to replay a recorded run).
        """
        if coords is None:
            coords = torch.rand(1, self.num_points, 2, device=pred_masks.device)
        coords = coords.to(pred_masks.device).view(1, -1, 2)
        pred = point_sample(pred_masks[:, None].float(), coords.expand(pred_masks.shape[0], -1, -1))[:, 0]
        target = point_sample(target_masks[:, None].float(), coords.expand(target_masks.shape[0], -1, -1))[:, 0]
        return pairwise_sigmoid_bce(pred, target), pairwise_dice(pred, target)

    def cost_matrix(self, logits: torch.Tensor, pred_masks: torch.Tensor, target: Instances,
                    pred_boxes: torch.Tensor | None = None, coords: torch.Tensor | None = None) -> torch.Tensor:
        """Total cost of one image: logits [Q, K+1], pred_masks [Q, h, w], pred_boxes [Q, 4] -> [Q, T]."""
        cost_mask, cost_dice = self.mask_costs(pred_masks, target.masks.to(pred_masks.device), coords)
        cost_class = self.class_cost(logits.float(), target.labels.to(logits.device))
        cost = self.cost_mask * cost_mask + self.cost_class * cost_class + self.cost_dice * cost_dice
        if self.cost_bbox or self.cost_giou:
            if pred_boxes is None:
                raise ValueError("box matching costs are set but the outputs have no pred_boxes")
            pred = pred_boxes.float()
            boxes = normalized_cxcywh(target.boxes.to(pred.device), target.image_size)
            cost = cost + self.cost_bbox * torch.cdist(pred, boxes, p=1)
            cost = cost - self.cost_giou * generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(boxes))
        return cost

    @torch.no_grad()
    def forward(self, outputs: dict, targets: Sequence[Instances],
                coords: Sequence[torch.Tensor] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pred_logits, pred_masks = outputs["pred_logits"], outputs["pred_masks"]
        pred_boxes = outputs.get("pred_boxes")
        indices = []
        with torch.autocast(device_type=pred_masks.device.type, enabled=False):
            for b, target in enumerate(targets):
                cost = self.cost_matrix(pred_logits[b], pred_masks[b], target,
                                        None if pred_boxes is None else pred_boxes[b],
                                        None if coords is None else coords[b])
                # non-finite costs (diverged predictions) are matched last instead of crashing scipy
                big = torch.finfo(cost.dtype).max
                cost = torch.nan_to_num(cost, nan=big, posinf=big, neginf=big).cpu()
                rows, cols = linear_sum_assignment(cost.numpy())
                indices.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
        return indices
