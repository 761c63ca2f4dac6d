"""Mask DINO's set criterion: Mask2Former's, with focal classification, box losses, the encoder
("interm") prediction set and the denoising sets.

Terms of one prediction set, each normalised by `num_masks` (targets per rank, at least 1):
  loss_ce   sigmoid focal loss (alpha, gamma) over all queries x classes; a query's target row is
            the one-hot class of its matched object, all zeros when unmatched (no "no object" class);
            the rows of unmatched queries are scaled by `unmatched_weight` (1 = the reference)
  loss_mask point-sampled sigmoid BCE and loss_dice soft dice of matched masks (Mask2Former's)
  loss_bbox L1 of matched normalised cxcywh boxes and loss_giou 1 - GIoU of them
Sets: the final one (""), every auxiliary one ("_{i}"), the encoder's ("_interm"), all matched with
the Hungarian matcher independently; and the denoising sets ("_dn", "_dn_{i}") with their fixed
assignment (DN slot g * group_size + j reconstructs object j), normalised by num_masks x groups,
without the mask terms when `dn == "standard"`. A batch built without DN queries (no object, or
more objects in an image than `dn_num`) gets zero DN terms. Terms come weighted.

Target boxes are the targets' xyxy pixel boxes normalised by their own canvas (the padded input).
Targets flagged `ignore` (uncertain pseudo-objects) are matched in the matched sets, but the query
matched to one gets no loss (a zero focal row weight, no mask or box terms); the model builds no
denoising queries for them, so the DN sets see the other targets only.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from semiseg.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou, normalized_cxcywh
from semiseg.models.mask2former_criterion import Indices, SetCriterion, average_num_masks, split_ignored
from semiseg.models.matcher import HungarianMatcher
from semiseg.structures import Instances

DN_MODES = ("no", "standard", "seg")


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, num_boxes: float, alpha: float = 0.25,
                       gamma: float = 2.0, row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """logits, targets [B, N, K] -> sum of alpha_t * (1 - p_t)**gamma * BCE over all entries / num_boxes.

    row_weights: optional [B, N] factor for each query's K entries.
    """
    prob = logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = bce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    if row_weights is not None:
        loss = loss * row_weights[..., None]
    return loss.sum() / num_boxes


@dataclass
class SetPoints:
    """Fixed point coordinates for one prediction set instead of random draws (to replay a run).

    matcher: per image [1, P, 2] uniform points of the matcher (None for DN sets)
    loss:    [N, P, 2] the points of the N supervised masks, in `loss_masks` row order
    """

    matcher: Sequence[torch.Tensor] | None = None
    loss: torch.Tensor | None = None


class MaskDINOCriterion(SetCriterion):
    """forward(outputs of `MaskDINODecoder`, targets: B x Instances, points=None) -> weighted losses.

    points: optional {tag: SetPoints} with tags "final", "aux{i}", "interm", "dn_final", "dn_aux{i}".
    unmatched_weight: see `loss_focal` (Guided Distillation passes `semi.unmatched_weight` for unlabeled images).
    The matcher should use the focal class cost and the box costs (see `MaskDINO`).
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, class_weight: float = 4.0,
                 mask_weight: float = 5.0, dice_weight: float = 5.0, box_weight: float = 5.0,
                 giou_weight: float = 2.0, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 dn: str = "seg", no_object_weight: float = 0.1, num_points: int = 12544,
                 oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75):
        super().__init__(num_classes, matcher, class_weight=class_weight, mask_weight=mask_weight,
                         dice_weight=dice_weight, no_object_weight=no_object_weight, num_points=num_points,
                         oversample_ratio=oversample_ratio, importance_sample_ratio=importance_sample_ratio)
        if dn not in DN_MODES:
            raise ValueError(f"dn must be one of {DN_MODES}, got {dn!r}")
        self.weights.update(loss_bbox=box_weight, loss_giou=giou_weight)
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.dn = dn

    def loss_focal(self, pred_logits: torch.Tensor, targets: Sequence[Instances], indices: Indices,
                   num_masks: float, unmatched_weight: float = 1.0, ignored: Sequence[torch.Tensor] = ()
                   ) -> torch.Tensor:
        """pred_logits [B, N, K] -> focal loss against one-hot rows of the matched labels
        (the all-zero rows of unmatched queries scaled by `unmatched_weight`, the `ignored` queries'
        rows by 0). Targets with `class_probs` (soft pseudo-labels) give their matched queries those
        probabilities as row."""
        device = pred_logits.device
        rows = torch.zeros_like(pred_logits, dtype=torch.float32)
        matched = torch.zeros(pred_logits.shape[:2], device=device)  # [B, N]: 1 for matched queries
        for b, (target, (src, tgt)) in enumerate(zip(targets, indices)):
            src, tgt = src.to(device), tgt.to(device)
            if target.class_probs is None:
                rows[b, src, target.labels.to(device)[tgt]] = 1.0
            else:
                rows[b, src] = target.class_probs.to(device).float()[tgt]
            matched[b, src] = 1.0
        row_weights = None
        if unmatched_weight != 1.0 or any(len(queries) for queries in ignored):
            row_weights = matched + unmatched_weight * (1 - matched)
            for b, queries in enumerate(ignored):
                row_weights[b, queries.to(device)] = 0.0
        return sigmoid_focal_loss(pred_logits.float(), rows, num_masks, self.focal_alpha, self.focal_gamma,
                                  row_weights)

    @staticmethod
    def loss_boxes(pred_boxes: torch.Tensor, target_boxes: Sequence[torch.Tensor], indices: Indices,
                   num_masks: float) -> tuple[torch.Tensor, torch.Tensor]:
        """pred_boxes [B, N, 4], target_boxes B x [n_b, 4] (normalised cxcywh) -> (L1, 1 - GIoU) of matched pairs."""
        device = pred_boxes.device
        src = torch.cat([pred_boxes[b, s.to(device)] for b, (s, _) in enumerate(indices)]).float()
        tgt = torch.cat([boxes.to(device)[t.to(device)] for boxes, (_, t) in zip(target_boxes, indices)]).float()
        loss_bbox = F.l1_loss(src, tgt, reduction="none").sum() / num_masks
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)))
        return loss_bbox, (1 - giou).sum() / num_masks

    def set_losses(self, outputs: Mapping, targets: Sequence[Instances], target_boxes: Sequence[torch.Tensor],
                   indices: Indices, num_masks: float, with_masks: bool = True,
                   coords: torch.Tensor | None = None, unmatched_weight: float = 1.0) -> dict[str, torch.Tensor]:
        """Unweighted terms of one prediction set with a given assignment (pairs with ignored targets get none)."""
        indices, ignored = split_ignored(targets, indices)
        losses = {"loss_ce": self.loss_focal(outputs["pred_logits"], targets, indices, num_masks, unmatched_weight,
                                             ignored)}
        if with_masks:
            losses["loss_mask"], losses["loss_dice"] = self.loss_masks(
                outputs["pred_masks"], targets, indices, num_masks, coords=coords)
        losses["loss_bbox"], losses["loss_giou"] = self.loss_boxes(outputs["pred_boxes"], target_boxes, indices, num_masks)
        return losses

    def weighted(self, losses: Mapping[str, torch.Tensor], suffix: str) -> dict[str, torch.Tensor]:
        return {f"{k}{suffix}": v * self.weights[k] for k, v in losses.items()}

    def forward(self, outputs: Mapping, targets: Sequence[Instances],
                points: Mapping[str, SetPoints] | None = None, unmatched_weight: float = 1.0
                ) -> dict[str, torch.Tensor]:
        """unmatched_weight: scales the focal rows of the matched sets' unmatched queries (DN sets have none)."""
        if len(targets) != outputs["pred_logits"].shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {outputs['pred_logits'].shape[0]} images")
        points = points or {}
        device = outputs["pred_logits"].device
        num_masks = average_num_masks(targets, device)
        target_boxes = [normalized_cxcywh(t.boxes.to(device), t.image_size) for t in targets]

        matched = [("", "final", outputs)]
        matched += [(f"_{i}", f"aux{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]
        if outputs.get("interm_outputs") is not None:
            matched.append(("_interm", "interm", outputs["interm_outputs"]))
        losses = {}
        for suffix, tag, out in matched:
            set_points = points.get(tag, SetPoints())
            indices = self.matcher(out, targets, coords=set_points.matcher)
            raw = self.set_losses(out, targets, target_boxes, indices, num_masks, coords=set_points.loss,
                                  unmatched_weight=unmatched_weight)
            losses.update(self.weighted(raw, suffix))
        if self.dn != "no":
            # the model's denoising queries come from the targets that are not ignored
            confident_boxes = [boxes if t.ignore is None else boxes[~t.ignore] for t, boxes in zip(targets, target_boxes)]
            losses.update(self.denoising_losses(outputs, [t.confident() for t in targets], confident_boxes,
                                                num_masks, points))
        return losses

    def denoising_losses(self, outputs: Mapping, targets: Sequence[Instances], target_boxes: Sequence[torch.Tensor],
                         num_masks: float, points: Mapping[str, SetPoints]) -> dict[str, torch.Tensor]:
        """Weighted `_dn` / `_dn_{i}` terms; zeros when the batch had no DN queries."""
        with_masks = self.dn == "seg"
        dn_outputs = outputs.get("dn_outputs")
        suffixes = ["_dn"] + [f"_dn_{i}" for i in range(len(outputs.get("aux_outputs", [])))]
        if dn_outputs is None:
            keys = ["loss_ce", "loss_bbox", "loss_giou"] + (["loss_mask", "loss_dice"] if with_masks else [])
            zero = outputs["pred_logits"].new_zeros(())
            return {f"{k}{suffix}": zero for suffix in suffixes for k in keys}
        denoising = outputs["denoising"]
        indices = denoising.indices([len(t) for t in targets])
        num_dn = num_masks * denoising.num_groups
        sets = [("_dn", "dn_final", dn_outputs)]
        sets += [(f"_dn_{i}", f"dn_aux{i}", aux) for i, aux in enumerate(dn_outputs["aux_outputs"])]
        losses = {}
        for suffix, tag, out in sets:
            coords = points.get(tag, SetPoints()).loss
            raw = self.set_losses(out, targets, target_boxes, indices, num_dn, with_masks=with_masks, coords=coords)
            losses.update(self.weighted(raw, suffix))
        return losses
