"""What every meta-architecture hands to the semi-supervised code (see docs/design.md)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PseudoLabelCandidates:
    """Per-query evidence from a teacher's outputs, turned into pseudo-labels by a filter.

    class_probs: [B, Q, K] class probabilities (Mask2Former: softmax over K+1 without "no object";
                 Mask DINO: sigmoid scores)
    is_object:   [B, Q] bool, whether the query predicts an object at all (Mask2Former: its argmax is
                 not "no object"; Mask DINO: all true)
    mask_logits: [B, Q, h, w] mask logits on the padded canvas at the model's output resolution
    boxes:       [B, Q, 4] xyxy boxes in pixels of the `mask_logits` canvas (h, w), or None when the
                 model predicts no boxes (Mask2Former; a filter then derives them from the masks)
    """

    class_probs: torch.Tensor
    is_object: torch.Tensor
    mask_logits: torch.Tensor
    boxes: torch.Tensor | None = None
