"""Mask2Former instance inference (the reference's `instance_inference` + `sem_seg_postprocess`).

Every (query, class) pair is a candidate: the top-k of the Q x K class probabilities (softmax over
K+1, "no object" dropped) are kept, a query may appear with several labels. Their mask logits are
upsampled to the padded input, cropped to the image, resized to the original size and thresholded
at 0; the score is the class probability times the mean sigmoid inside the binary mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from semiseg.structures import Instances


def resize_mask_logits(mask_logits: torch.Tensor, padded_size: tuple[int, int], image_size: tuple[int, int],
                       orig_size: tuple[int, int]) -> torch.Tensor:
    """[N, h, w] logits on the padded canvas -> [N, orig_h, orig_w] logits of the original image."""
    if mask_logits.shape[0] == 0:
        return mask_logits.new_zeros(0, *orig_size)
    x = F.interpolate(mask_logits[None], size=padded_size, mode="bilinear", align_corners=False)
    x = x[:, :, : image_size[0], : image_size[1]]
    return F.interpolate(x, size=orig_size, mode="bilinear", align_corners=False)[0]


def instance_inference(pred_logits: torch.Tensor, pred_masks: torch.Tensor, padded_size: tuple[int, int],
                       image_size: tuple[int, int], orig_size: tuple[int, int], topk: int = 100) -> Instances:
    """One image: pred_logits [Q, K+1], pred_masks [Q, h, w] -> Instances at `orig_size` with scores.

    padded_size: (H, W) of the network input; image_size: valid (h, w) inside it; orig_size: (h, w)
    of the original image. Returns min(topk, Q*K) instances sorted by class probability.
    """
    num_queries, num_classes = pred_logits.shape[0], pred_logits.shape[1] - 1
    class_probs = pred_logits.float().softmax(-1)[:, :-1]  # [Q, K]
    scores, flat_idx = class_probs.flatten().topk(min(topk, num_queries * num_classes))
    labels = flat_idx % num_classes
    query_idx = flat_idx // num_classes
    logits = resize_mask_logits(pred_masks[query_idx].float(), padded_size, image_size, orig_size)
    masks = logits > 0
    mask_scores = (logits.sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
    return Instances.from_masks(labels, masks, scores=scores * mask_scores)
