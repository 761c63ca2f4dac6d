"""Box utilities of the box-predicting heads (Mask DINO): formats, GIoU, logit space, mask boxes.

Two box formats: `cxcywh` (centre, size) and `xyxy` (corners). Mask DINO predicts normalised
cxcywh boxes in [0, 1] relative to the *padded* input canvas and refines them in logit space
(`inverse_sigmoid`), so the helpers here work on any units and any leading shape.
"""
from __future__ import annotations

import torch


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] (cx, cy, w, h) -> [..., 4] (x0, y0, x1, y1)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] (x0, y0, x1, y1) -> [..., 4] (cx, cy, w, h)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def normalized_cxcywh(boxes_xyxy: torch.Tensor, canvas_hw: tuple[int, int]) -> torch.Tensor:
    """[N, 4] xyxy pixels of a canvas (H, W) -> [N, 4] cxcywh divided by (W, H, W, H)."""
    h, w = canvas_hw
    scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=boxes_xyxy.device)
    return box_xyxy_to_cxcywh(boxes_xyxy.float()) / scale


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """[N, 4] xyxy -> [N]."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Pairwise generalised IoU of [N, 4] and [M, 4] xyxy boxes -> [N, M] in [-1, 1].

    `eps` is added to the union and to the enclosing area (DINO / Mask DINO), so degenerate
    (zero-area) boxes give finite values instead of NaN.
    """
    area1, area2 = box_area(boxes1), box_area(boxes2)
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    inter_wh = (bottom_right - top_left).clamp(min=0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    iou = inter / (union + eps)
    hull_wh = (torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
               - torch.min(boxes1[:, None, :2], boxes2[None, :, :2])).clamp(min=0)
    hull = hull_wh[..., 0] * hull_wh[..., 1]
    return iou - (hull - union) / (hull + eps)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """logit(x) with x clamped to [0, 1] and both x and 1 - x to at least `eps` (|result| <= 11.513)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def masks_to_boxes_inclusive(masks: torch.Tensor) -> torch.Tensor:
    """Boxes through the centres of the extreme mask pixels (Mask DINO's "mask2box").

    masks: [N, H, W] bool -> [N, 4] float xyxy with x1 = the last foreground column (no +1, so a
    one-pixel mask has zero size). An empty mask gives (1e8, 1e8, 0, 0), as the reference does;
    `inverse_sigmoid` of its normalised cxcywh then clamps to (+11.5, +11.5, -11.5, -11.5).
    `semiseg.structures.masks_to_boxes` is the pixel-edge variant (+1, empty -> zeros).
    """
    n, h, w = masks.shape
    if n == 0:
        return masks.new_zeros((0, 4), dtype=torch.float32)
    ys = torch.arange(h, dtype=torch.float32, device=masks.device)[None, :, None]
    xs = torch.arange(w, dtype=torch.float32, device=masks.device)[None, None, :]
    x1 = (masks * xs).flatten(1).amax(1)
    y1 = (masks * ys).flatten(1).amax(1)
    x0 = (xs.expand(n, h, w)).masked_fill(~masks, 1e8).flatten(1).amin(1)
    y0 = (ys.expand(n, h, w)).masked_fill(~masks, 1e8).flatten(1).amin(1)
    return torch.stack([x0, y0, x1, y1], dim=1)
