"""Mask2Former's set criterion: Hungarian matching, then class and point-sampled mask losses.

For every prediction set (final and each auxiliary one, each matched independently):
  loss_ce   cross-entropy over all queries; unmatched queries must predict "no object" (class K),
            whose weight is `no_object_weight`
  loss_mask point-wise sigmoid BCE on matched pairs, averaged over points, summed over pairs / num_masks
  loss_dice 1 - soft dice on the same points, summed over pairs / num_masks
The points are `num_points` per pair: the most uncertain of an oversampled uniform draw plus
uniform ones. Terms are returned already multiplied by their weights; aux terms get `_{i}` suffixes.
Targets flagged `ignore` (uncertain pseudo-objects) take part in the matching, but the query matched
to one gets no loss: it is left out of loss_ce, loss_mask, loss_dice and of num_masks.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from semiseg.models.matcher import HungarianMatcher
from semiseg.models.point_sampling import get_uncertain_point_coords_with_randomness, point_sample
from semiseg.structures import Instances

Indices = list[tuple[torch.Tensor, torch.Tensor]]  # per image (query indices, target indices) of matched pairs
IGNORE_INDEX = -100  # F.cross_entropy's default: a query with this target adds nothing to loss_ce


def sigmoid_bce_loss(logits: torch.Tensor, labels: torch.Tensor, num_masks: float) -> torch.Tensor:
    """logits, labels [N, P] -> mean over points, summed over masks, / num_masks."""
    return F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1).sum() / num_masks


def dice_loss(logits: torch.Tensor, labels: torch.Tensor, num_masks: float) -> torch.Tensor:
    """logits, labels [N, P] -> sum over masks of 1 - (2*sum(p*t) + 1) / (sum(p) + sum(t) + 1), / num_masks."""
    prob = logits.sigmoid()
    numerator = 2 * (prob * labels).sum(-1)
    denominator = prob.sum(-1) + labels.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """logits, targets [B, Q, C] (rows of `targets` sum to 1), class_weights [C] -> the class-weighted mean
    of -sum_c w_c t_c log p_c, normalised by sum w_c t_c: `F.cross_entropy`'s weighted mean for one-hot rows."""
    weighted = targets * class_weights
    return -(weighted * logits.log_softmax(-1)).sum() / weighted.sum()


def average_num_masks(targets: Sequence[Instances], device: torch.device) -> float:
    """Targets (not ignored) per rank: the batch total, averaged over ranks when torch.distributed runs, at least 1."""
    num = torch.tensor([float(sum(t.num_targets for t in targets))], device=device)
    world = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num)
        world = dist.get_world_size()
    return max(num.item() / world, 1.0)


def split_ignored(targets: Sequence[Instances], indices: Indices) -> tuple[Indices, list[torch.Tensor]]:
    """A matching -> (its pairs whose target is not ignored, per image the queries matched to ignored targets)."""
    kept, ignored = [], []
    for target, (src, tgt) in zip(targets, indices):
        if target.ignore is None:  # ground truth: every pair is kept, as matched
            kept.append((src, tgt))
            ignored.append(src[:0])
            continue
        flags = target.ignore.to(tgt.device)[tgt]
        kept.append((src[~flags], tgt[~flags]))
        ignored.append(src[flags])
    return kept, ignored


class SetCriterion(nn.Module):
    """forward(outputs from the decoder, targets: B x Instances at any resolution) -> weighted losses.

    `empty_weight` [K+1] (1 for the classes, `no_object_weight` for "no object") is a buffer, as in
    the official checkpoints (`criterion.empty_weight`).
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, class_weight: float = 2.0,
                 mask_weight: float = 5.0, dice_weight: float = 5.0, no_object_weight: float = 0.1,
                 num_points: int = 12544, oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weights = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = no_object_weight
        self.register_buffer("empty_weight", empty_weight)
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio

    def loss_labels(self, pred_logits: torch.Tensor, targets: Sequence[Instances], indices: Indices,
                    unmatched_weight: float = 1.0, ignored: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """pred_logits [B, Q, K+1] -> weighted cross-entropy over all queries but the `ignored` ones.

        indices:          the matched pairs whose targets are not ignored
        unmatched_weight: multiplies the "no object" class weight (the unmatched queries' target).
        ignored:          per image, queries left out of the loss (matched to ignored targets)
        Targets with `class_probs` (soft pseudo-labels) give their matched queries those probabilities,
        normalised over the K classes, instead of a one-hot row.
        """
        b, q, _ = pred_logits.shape
        device = pred_logits.device
        target_classes = torch.full((b, q), self.num_classes, dtype=torch.long, device=device)
        for i, (target, (src, tgt)) in enumerate(zip(targets, indices)):
            target_classes[i, src.to(device)] = target.labels.to(device)[tgt.to(device)]
        class_weights = self.empty_weight
        if unmatched_weight != 1.0:
            class_weights = torch.cat([class_weights[:-1], class_weights[-1:] * unmatched_weight])
        if all(t.class_probs is None for t in targets):
            for i, queries in enumerate(ignored):
                target_classes[i, queries.to(device)] = IGNORE_INDEX
            return F.cross_entropy(pred_logits.float().transpose(1, 2), target_classes, class_weights,
                                   ignore_index=IGNORE_INDEX)
        soft = F.one_hot(target_classes, self.num_classes + 1).float()  # [B, Q, K+1]
        for i, (target, (src, tgt)) in enumerate(zip(targets, indices)):
            if target.class_probs is not None:
                probs = target.class_probs.to(device).float()[tgt.to(device)]
                soft[i, src.to(device), :-1] = probs / probs.sum(-1, keepdim=True).clamp(min=1e-12)
        for i, queries in enumerate(ignored):
            soft[i, queries.to(device)] = 0.0  # a zero row adds nothing to the loss nor to its normaliser
        return soft_cross_entropy(pred_logits.float(), soft, class_weights)

    def loss_masks(self, pred_masks: torch.Tensor, targets: Sequence[Instances], indices: Indices, num_masks: float,
                   coords: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """pred_masks [B, Q, h, w] -> (BCE, dice) on uncertainty-sampled points of the matched pairs.

        coords: [N, P, 2] points to use instead of sampling them (to replay a recorded run).
        """
        device = pred_masks.device
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)]).to(device)
        src_idx = torch.cat([src for src, _ in indices]).to(device)
        matched = pred_masks[batch_idx, src_idx][:, None]  # [N, 1, h, w]
        with torch.no_grad():
            if coords is None:
                coords = get_uncertain_point_coords_with_randomness(
                    matched, self.num_points, self.oversample_ratio, self.importance_sample_ratio)  # [N, P, 2]
            coords = coords.to(device)
            labels, start = [], 0
            for target, (_, tgt) in zip(targets, indices):
                n = len(tgt)
                masks = target.masks.to(device)[tgt.to(device)][:, None].float()  # each target on its own canvas
                labels.append(point_sample(masks, coords[start:start + n])[:, 0])
                start += n
            labels = torch.cat(labels).to(matched.dtype)  # [N, P]
        logits = point_sample(matched, coords)[:, 0]  # [N, P]
        return sigmoid_bce_loss(logits, labels, num_masks), dice_loss(logits, labels, num_masks)

    def losses_for(self, outputs: dict, targets: Sequence[Instances], num_masks: float, suffix: str = "",
                   unmatched_weight: float = 1.0) -> dict:
        """Weighted loss terms of one prediction set, matched on its own."""
        indices, ignored = split_ignored(targets, self.matcher(outputs, targets))
        loss_ce = self.loss_labels(outputs["pred_logits"], targets, indices, unmatched_weight, ignored)
        loss_mask, loss_dice = self.loss_masks(outputs["pred_masks"], targets, indices, num_masks)
        raw = {"loss_ce": loss_ce, "loss_mask": loss_mask, "loss_dice": loss_dice}
        return {f"{k}{suffix}": v * self.weights[k] for k, v in raw.items()}

    def forward(self, outputs: dict, targets: Sequence[Instances], unmatched_weight: float = 1.0
                ) -> dict[str, torch.Tensor]:
        """unmatched_weight: scales the classification loss of the queries no target matched."""
        if len(targets) != outputs["pred_logits"].shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {outputs['pred_logits'].shape[0]} images")
        num_masks = average_num_masks(targets, outputs["pred_logits"].device)
        losses = self.losses_for(outputs, targets, num_masks, unmatched_weight=unmatched_weight)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update(self.losses_for(aux, targets, num_masks, suffix=f"_{i}", unmatched_weight=unmatched_weight))
        return losses
